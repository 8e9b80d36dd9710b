"""Adapters for FastV- and ToMe-style call sites: hand-worked selections and merges."""
import pytest
import torch

from g2tr_kernels.integrations.pruning import (
    fastv_keep_indexes,
    fastv_scores,
    g2tr_select_with_scores,
    g2tr_soft_matching,
    select_with_scores,
    tome_style_merge,
    window_cells,
)

# A 4 x 4 token grid. 2 x 2 windows / cells: w0 = {0, 1, 4, 5}, w1 = {2, 3, 6, 7},
# w2 = {8, 9, 12, 13}, w3 = {10, 11, 14, 15}. Window 0 holds the four best scores.
SCORES = torch.tensor([
    0.90, 0.80, 0.10, 0.20,
    0.70, 0.60, 0.30, 0.05,
    0.40, 0.35, 0.50, 0.45,
    0.00, 0.01, 0.02, 0.03,
])


def test_window_cells_by_hand():
    cells, count = window_cells(4, 4, 2)
    assert count == 4
    assert cells.tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]
    cells, count = window_cells(3, 5, 2)  # edge windows are smaller
    assert count == 6
    assert cells.tolist() == [0, 0, 1, 1, 2, 0, 0, 1, 1, 2, 3, 3, 4, 4, 5]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_plain_top_k_and_w_fastv_window_quota(backend):
    def select(**kw):
        return select_with_scores(SCORES, [16], backend=backend, **kw).tolist()

    # plain top-4: all of window 0
    assert select(keep=4) == [0, 1, 4, 5]
    # W-FastV K = 4: quota ceil(4 / 4) = 1 -> best of each window: 0 (.9), 6 (.3), 8 (.4), 10 (.5)
    assert select(keep=4, grids=(4, 4), window=2) == [0, 6, 8, 10]
    # K = 6: quota 2. Descending: 0 1 | 4 5 skipped (w0 full) | 10 11 | 8 9 -> first six seeds
    assert select(keep=6, grids=(4, 4), window=2) == [0, 1, 8, 9, 10, 11]
    # K = 10: quota 3. Seeds by score: 0 1 4 10 11 8 9 6 3 2 (15 13 would come next)
    assert select(keep=10, grids=(4, 4), window=2) == [0, 1, 2, 3, 4, 6, 8, 9, 10, 11]
    # keep_ratio goes through the budget rule: round(16 * .25) = 4
    assert select(keep_ratio=0.25, grids=(4, 4), window=2) == [0, 6, 8, 10]


def test_g2tr_balanced_rule_one_seed_per_cell_then_fill():
    # K = 6 with 2 x 2 cells: seeds 0, 10, 8, 6 (one per cell), then the best others: 1 (.8), 4 (.7)
    assert g2tr_select_with_scores(SCORES, [(4, 4)], [(2, 2)], keep=6).tolist() == [0, 1, 4, 6, 8, 10]
    # two images packed: the second is the first reversed in score, indices offset by 16
    both = torch.cat([SCORES, SCORES.flip(0)])
    kept = g2tr_select_with_scores(both, [(4, 4), (4, 4)], (2, 2), keep=4)
    assert kept.tolist() == [0, 6, 8, 10] + [16 + 15 - i for i in (10, 8, 6, 0)]


def test_fastv_keep_indexes_by_hand():
    # L = 8: 2 text tokens, 4 image tokens at 2..5, 2 text tokens. Two heads.
    attn = torch.zeros(1, 2, 8, 8)
    attn[0, 0, -1, 2:6] = torch.tensor([0.1, 0.4, 0.2, 0.3])
    attn[0, 1, -1, 2:6] = torch.tensor([0.1, 0.2, 0.0, 0.5])
    # head mean .1 .3 .1 .4 -> best two are image tokens 3 and 1 -> positions 5 and 3
    assert fastv_scores(attn, 2, 4)[0].tolist() == pytest.approx([0.1, 0.3, 0.1, 0.4])
    # FastV's keep_indexs is 1-D [L'] for its [1, H, L, L] attention, as are [H, L, L] and [L, L]
    assert fastv_keep_indexes(attn, 2, 4, keep_ratio=0.5).tolist() == [0, 1, 3, 5, 6, 7]
    assert fastv_keep_indexes(attn[0], 2, 4, keep_ratio=0.5).tolist() == [0, 1, 3, 5, 6, 7]
    assert fastv_keep_indexes(attn[0].mean(0), 2, 4, keep_ratio=0.5).tolist() == [0, 1, 3, 5, 6, 7]
    # all equal -> ties go to the lower index
    attn[0, :, -1, 2:6] = 0.25
    assert fastv_keep_indexes(attn, 2, 4, keep_ratio=0.5).tolist() == [0, 1, 2, 3, 6, 7]


def test_fastv_keep_indexes_is_a_drop_in_for_fastv_hidden_states():
    # FastV: hidden_states[:, keep_indexs, :] on [1, L, D] and position_ids = keep_indexs.unsqueeze(0)
    torch.manual_seed(0)
    attn = torch.rand(1, 3, 10, 10).softmax(-1)
    hidden = torch.randn(1, 10, 5)
    keep_indexs = fastv_keep_indexes(attn, 2, 6, keep_ratio=0.5)
    assert keep_indexs.shape == (10 - 6 + 3,)
    assert hidden[:, keep_indexs, :].shape == (1, 7, 5)
    assert keep_indexs.unsqueeze(0).shape == (1, 7)
    # the K best image tokens of FastV's score (head mean, last query row), then sorted
    top = attn.mean(dim=1)[0][-1][2:8].topk(3).indices + 2
    expect = torch.cat((torch.arange(2), top, torch.arange(8, 10))).sort().values
    assert torch.equal(keep_indexs, expect)


def test_fastv_keep_indexes_refuses_a_batch_and_bad_spans():
    with pytest.raises(ValueError, match="batch of 2 sequences"):
        fastv_keep_indexes(torch.rand(2, 1, 8, 8), 2, 4)
    with pytest.raises(ValueError, match="do not fit"):
        fastv_keep_indexes(torch.rand(1, 1, 8, 8), 6, 4)
    with pytest.raises(ValueError, match="attention must be"):
        fastv_keep_indexes(torch.rand(1, 1, 8, 7), 2, 4)


def test_pruning_min_keep_default_reproduces_the_replaced_codes_k():
    # min_keep=1: K = round(N * ratio) as FastV / ToMe compute it, even below reduce's floor of 32
    scores = torch.arange(20.0)
    assert select_with_scores(scores, [20], keep_ratio=0.5).numel() == 10
    assert select_with_scores(scores, [20], keep_ratio=0.5, min_keep=32).numel() == 20
    attn = torch.rand(1, 1, 24, 24)
    assert fastv_keep_indexes(attn, 2, 20, keep_ratio=0.5).numel() == 4 + 10
    assert fastv_keep_indexes(attn, 2, 20, keep_ratio=0.5, min_keep=16).numel() == 4 + 16


def test_fastv_with_windows_on_a_grid():
    attn = torch.zeros(1, 1, 19, 19)
    attn[0, 0, -1, 1:17] = SCORES  # 1 text token, a 4 x 4 image, 2 text tokens
    kept = fastv_keep_indexes(attn, 1, 16, keep=4, grid=(4, 4), window=2)
    assert kept.tolist() == [0] + [1 + i for i in (0, 6, 8, 10)] + [17, 18]


def tokens_4():
    # v2 is close to v0, v3 close to v1
    return torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]]])


def test_tome_style_merge_by_hand():
    x, scores = tokens_4(), torch.tensor([[0.9, 0.8, 0.1, 0.2]])
    merge, unmerge = g2tr_soft_matching(x, scores, keep=2)
    assert merge.assign.tolist() == [[0, 1, 0, 1]]
    merged = merge(x)
    assert torch.allclose(merged, torch.tensor([[[1.0, 0.05], [0.05, 1.0]]]))
    assert torch.allclose(merge(x, mode="sum"), torch.tensor([[[2.0, 0.1], [0.1, 2.0]]]))
    assert torch.equal(unmerge(merged), merged[:, [0, 1, 0, 1]])
    # size-weighted (ToMe's proportional attention): sizes 1, 3, 1, 1
    out, size = tome_style_merge(x, scores, keep=2, size=torch.tensor([[[1.0], [3.0], [1.0], [1.0]]]))
    assert size.tolist() == [[[2.0], [4.0]]]
    # (v0 + v2) / 2 and (3 v1 + v3) / 4
    assert torch.allclose(out, torch.tensor([[[1.0, 0.05], [0.025, 1.0]]]))


def test_merge_weight_and_tome_merge_wavg_drop_in():
    x, scores = tokens_4(), torch.tensor([[0.9, 0.8, 0.1, 0.2]])
    merge, _ = g2tr_soft_matching(x, scores, keep=2, merge_weight=3.0)
    # (3 v0 + v2) / 4 and (3 v1 + v3) / 4
    assert torch.allclose(merge(x), torch.tensor([[[1.0, 0.025], [0.025, 1.0]]]))

    def merge_wavg(merge, x, size=None):  # ToMe's helper, as its call sites use it
        if size is None:
            size = torch.ones_like(x[..., 0, None])
        x = merge(x * size, mode="sum")
        size = merge(size, mode="sum")
        return x / size, size

    torch.manual_seed(0)
    x = torch.randn(3, 10, 8)
    scores = torch.rand(3, 10)
    merge, _ = g2tr_soft_matching(x, scores, keep_ratio=0.5)
    ref, ref_size = merge_wavg(merge, x)
    out, size = tome_style_merge(x, scores, keep_ratio=0.5)
    assert torch.allclose(out, ref) and torch.equal(size, ref_size)
    assert out.shape == (3, 5, 8) and size.sum().item() == 30


def test_class_token_is_kept_and_never_merged():
    # token 0 (CLS) has the lowest score and is identical to token 3: it must stay alone
    x = torch.tensor([[[1.0, 0.1], [1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]]])
    scores = torch.tensor([[-1.0, 0.9, 0.8, 0.1, 0.2]])
    merge, unmerge = g2tr_soft_matching(x, scores, keep=2, class_token=True)
    assert merge.assign.tolist() == [[0, 1, 2, 1, 2]]
    merged = merge(x)
    assert merged.shape == (1, 3, 2)
    assert torch.equal(merged[0, 0], x[0, 0])
    assert torch.allclose(merged[0, 1], torch.tensor([1.0, 0.05]))


def test_rows_are_independent_in_a_batch():
    torch.manual_seed(1)
    x = torch.randn(2, 9, 4)
    scores = torch.rand(2, 9)
    merge, _ = g2tr_soft_matching(x, scores, keep=3)
    for b in range(2):
        single, _ = g2tr_soft_matching(x[b : b + 1], scores[b : b + 1], keep=3)
        assert torch.equal(merge.assign[b], single.assign[0])
        assert torch.allclose(merge(x)[b], single(x[b : b + 1])[0])


def test_bad_arguments():
    with pytest.raises(ValueError, match="not both"):
        select_with_scores(SCORES, [16], keep=4, grids=(4, 4), window=2, cell_grids=(2, 2))
    with pytest.raises(ValueError, match="need grids"):
        select_with_scores(SCORES, [16], keep=4, window=2)
    with pytest.raises(ValueError, match="do not match"):
        select_with_scores(SCORES, [16], keep=4, grids=(3, 4), window=2)
    with pytest.raises(ValueError, match="scores must be"):
        g2tr_soft_matching(torch.randn(1, 4, 2), torch.rand(1, 3), keep=2)
