"""g2tr_kernels.reduce: kernels against the reference on the SHAPES.md geometries, the
reference against hand-worked SPEC.md examples, and the edge cases of the op contract."""
import math

import pytest
import torch

import g2tr_kernels as g2tr
from g2tr_kernels import reference

from helpers import (
    DTYPE_IDS,
    DTYPE_WORDS,
    DTYPES,
    WORKLOADS,
    Case,
    assert_bitwise_equal,
    assert_close_report,
    assert_outputs_bitwise_equal,
    assert_reduce_matches,
    backend_device,
    check_structure,
    dtypes,
    kernel_device,
    lengths_of,
    make_ternary_workload,
    make_workload,
    setter,
    spec_budget,
    spec_cells,
    spec_selection,
    tensor_setter,
)

NAN, INF = float("nan"), float("inf")


def t(rows, dtype=torch.float32, device="cpu"):
    return torch.tensor(rows, dtype=dtype, device=device)


# ------------------------------------------------------------------ kernels vs reference


@kernel_device
@dtypes
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_workloads_match_reference(workload, dtype, kernel, device):
    grids, anchor_grids, d = WORKLOADS[workload]
    tokens, anchors = make_workload(grids, anchor_grids, d, dtype, seed=sum(map(ord, workload)), device=device)
    out = g2tr.reduce(tokens, anchors, grids, anchor_grids, backend=kernel)
    assert_reduce_matches(out, tokens, anchors, grids, anchor_grids, name=workload)
    # Output sizes follow SHAPES.md's K column rule: max(32, round_half_even(N / 2)) per image.
    expected_k = [spec_budget(n, 0.5, 32) for n in lengths_of(grids)]
    assert out.merged.shape == (sum(expected_k), d)


@kernel_device
@pytest.mark.parametrize("keep_ratio", [0.25, 0.75])
@pytest.mark.parametrize("anchor_pool", [1, 2, 4])
def test_keep_ratio_and_anchor_pool_sweep(keep_ratio, anchor_pool, kernel, device):
    # SHAPES.md sweep: BAGEL 37x37 image, patchified 32x32 latent grid pooled by 1, 2 or 4;
    # pool 1 has more cells than K, so selection is one token per cell there.
    grids = [(37, 37), (27, 27)]
    anchor_grids = [(math.ceil(32 / anchor_pool),) * 2, (math.ceil(24 / anchor_pool),) * 2]
    tokens, anchors = make_workload(grids, anchor_grids, 48, torch.bfloat16, seed=anchor_pool, device=device)
    out = g2tr.reduce(tokens, anchors, grids, anchor_grids, keep_ratio, 32, backend=kernel)
    assert_reduce_matches(out, tokens, anchors, grids, anchor_grids, keep_ratio, 32)


@kernel_device
@pytest.mark.parametrize(
    "workload,dtype",
    [(w, d) for w in ("S1", "S2") for d in DTYPES] + [("M2", torch.bfloat16)],
    ids=[f"{w}-{DTYPE_IDS[d]}" for w in ("S1", "S2") for d in DTYPES] + ["M2-bf16"],
)
def test_exact_ties_are_bitwise_equal(workload, dtype, kernel, device):
    # Ternary rows make every score and similarity exact and tie-heavy: no rounding can
    # excuse a difference, so the tie rules themselves must agree bit for bit.
    grids, anchor_grids, _ = WORKLOADS[workload]
    tokens, anchors = make_ternary_workload(grids, anchor_grids, 16, dtype, seed=3, device=device)
    for merge_weight in (1.0, 3.0):
        got = g2tr.reduce(tokens, anchors, grids, anchor_grids, merge_weight=merge_weight,
                          backend=kernel)
        want = g2tr.reduce(tokens, anchors, grids, anchor_grids, merge_weight=merge_weight, backend="reference")
        assert_outputs_bitwise_equal(f"{workload} weight {merge_weight}", got, want)


@kernel_device
@pytest.mark.parametrize("merge_weight", [0.5, 3.0])
@dtypes
def test_merge_weight_matches_reference(merge_weight, dtype, kernel, device):
    grids, anchor_grids = [(16, 16), (12, 20)], [(8, 8), (6, 10)]
    tokens, anchors = make_workload(grids, anchor_grids, 64, dtype, seed=7, device=device)
    out = g2tr.reduce(tokens, anchors, grids, anchor_grids, 0.25, 8, merge_weight, backend=kernel)
    assert_reduce_matches(out, tokens, anchors, grids, anchor_grids, 0.25, 8, merge_weight)


# ------------------------------------------------------------------ hand-worked examples


@backend_device
@pytest.mark.parametrize(
    "merge_weight,row1",
    [(1.0, [0.0, 2.0 / 3.0]), (3.0, [0.4, 0.8]), (0.5, [-0.2, 0.6])],
)
def test_two_by_two_one_anchor(backend, device, merge_weight, row1):
    # 2x2 tokens, one anchor [1, 0]. Scores cos = 1, 0, 1/sqrt(2), -1; K = round(4 * 0.5) = 2.
    # Seed: the only cell's best, token 0. Fill: the best of the rest, token 2.
    # Token 1 [0, 1]: cos 0 with token 0, 0.707 with token 2 -> row 1.
    # Token 3 [-1, 0]: cos -1 with token 0, -0.707 with token 2 -> row 1.
    # Row 1 = (w * [1, 1] + [0, 1] + [-1, 0]) / (w + 2).
    tokens = t([[1, 0], [0, 1], [1, 1], [-1, 0]], device=device)
    anchors = t([[1, 0]], device=device)
    out = g2tr.reduce(tokens, anchors, [(2, 2)], [(1, 1)], 0.5, 1, merge_weight, backend=backend)
    torch.testing.assert_close(out.scores.cpu(), t([1.0, 0.0, 1 / math.sqrt(2), -1.0]), atol=1e-6, rtol=0)
    assert out.keep_idx.tolist() == [0, 2]
    assert out.assign.tolist() == [0, 1, 1, 1]
    assert out.cu_seqlens.tolist() == [0, 2]
    torch.testing.assert_close(out.merged.cpu(), t([[1.0, 0.0], row1]), atol=1e-6, rtol=1e-6)


@backend_device
def test_one_seed_per_cell_beats_plain_topk(backend, device):
    # 2x4 tokens over 1x2 anchors: columns 0-1 -> cell 0 (anchor [1, 0]), 2-3 -> cell 1 ([0, 1]).
    #   token: 0      1      2      3      4      5      6       7
    #   cell:  0      0      1      1      0      0      1       1
    #   score: 1.0    .949   .707   0      .894   0      0       -.707
    # K = 2: seeds are the best of each cell (0 and 2), not the plain top-2 (0 and 1).
    tokens = t([[1, 0], [3, 1], [1, 1], [1, 0], [2, 1], [0, 1], [-1, 0], [1, -1]], device=device)
    anchors = t([[1, 0], [0, 1]], device=device)
    out = g2tr.reduce(tokens, anchors, [(2, 4)], [(1, 2)], 0.25, 1, backend=backend)
    assert out.keep_idx.tolist() == [0, 2]
    # Merge by cosine to kept tokens 0 ([1, 0]) and 2 ([1, 1]):
    #   1 [3,1] .949 vs .894 -> 0; 3 [1,0] 1 vs .707 -> 0; 4 [2,1] .894 vs .949 -> 1;
    #   5 [0,1] 0 vs .707 -> 1; 6 [-1,0] -1 vs -.707 -> 1; 7 [1,-1] .707 vs 0 -> 0.
    assert out.assign.tolist() == [0, 0, 1, 0, 1, 1, 1, 0]
    torch.testing.assert_close(out.merged.cpu(), t([[1.5, 0.0], [0.5, 0.75]]), atol=1e-6, rtol=1e-6)
    # K = 4: seeds 0 and 2, then the fill takes 1 (.949) and 4 (.894).
    out = g2tr.reduce(tokens, anchors, [(2, 4)], [(1, 2)], 0.5, 1, backend=backend)
    assert out.keep_idx.tolist() == [0, 1, 2, 4]
    # K = 5: then three tokens tie at score 0 (3, 5, 6): the lowest index, 3, wins.
    out = g2tr.reduce(tokens, anchors, [(2, 4)], [(1, 2)], 0.625, 1, backend=backend)
    assert out.keep_idx.tolist() == [0, 1, 2, 3, 4]


@backend_device
def test_cell_ranking_ties_go_to_lower_index(backend, device):
    # 2x2 tokens, 2x2 anchors all [1, 0]: one token per cell, so every token is a seed
    # candidate. Tokens 1 and 2 are identical (score .6 exactly tied); token 0 scores .28.
    tokens = t([[7, 24], [3, 4], [3, 4], [-1, 0]], device=device)
    anchors = t([[1, 0]] * 4, device=device)
    out = g2tr.reduce(tokens, anchors, [(2, 2)], [(2, 2)], 0.25, 1, backend=backend)
    assert out.keep_idx.tolist() == [1]
    # Everything joins the single kept token: mean of all four rows.
    torch.testing.assert_close(out.merged.cpu(), t([[3.0, 8.0]]), atol=1e-6, rtol=1e-6)
    out = g2tr.reduce(tokens, anchors, [(2, 2)], [(2, 2)], 0.5, 1, backend=backend)
    assert out.keep_idx.tolist() == [1, 2]
    # Token 0 is closer to 1 and 2 (identical) -> the lower row; token 3 likewise.
    assert out.assign.tolist() == [0, 0, 1, 0]


@backend_device
def test_two_images_stay_apart(backend, device):
    # Image 1's tokens are copies of image 0's kept token, yet they merge within image 1
    # (SPEC.md §4: this project never merges across images), and indices are global.
    tokens = t([[1, 0], [0, 1], [0, 1], [0, 1],  # image 0, 2x2
                [1, 0], [1, 0], [-1, 1], [0, -1]], device=device)  # image 1, 2x2
    anchors = t([[1, 0], [0, -1]], device=device)
    out = g2tr.reduce(tokens, anchors, [2, 2, 2, 2], [1, 1, 1, 1], 0.25, 1, backend=backend)
    # Image 0: best vs [1, 0] is token 0. Image 1: best vs [0, -1] is token 7.
    assert out.keep_idx.tolist() == [0, 7]
    assert out.cu_seqlens.tolist() == [0, 1, 2]
    assert out.assign.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    torch.testing.assert_close(out.merged.cpu(), t([[0.25, 0.75], [0.25, 0.0]]), atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ budgets and geometry


@backend_device
def test_37x37_rounds_half_to_even(backend, device):
    # 1369 * 0.5 = 684.5 -> 684 (Python's round), not 685.
    assert g2tr.budgets([1369], 0.5, 32) == [684]
    grids, anchor_grids = [(37, 37)] * 2, [(16, 16)] * 2
    tokens, anchors = make_workload(grids, anchor_grids, 8, seed=1, device=device)
    out = g2tr.reduce(tokens, anchors, grids, anchor_grids, 0.5, 32, backend=backend)
    assert out.merged.shape == (1368, 8)
    assert out.keep_idx.shape == (1368,)
    assert out.cu_seqlens.tolist() == [0, 684, 1368]
    check_structure(out, grids, [684, 684])


@pytest.mark.parametrize(
    "n,keep_ratio,min_keep,k",
    [(1369, 0.5, 32, 684), (5, 0.5, 1, 2), (7, 0.5, 1, 4), (4900, 0.5, 32, 2450), (4900, 0.25, 32, 1225),
     (17, 0.1, 1, 2), (10, 0.05, 1, 1), (10, 0.25, 1, 2), (16, 1.0, 1, 16), (16, 0.5, 32, 16), (100, 0.01, 3, 3)],
)
def test_budgets(n, keep_ratio, min_keep, k):
    assert g2tr.budgets([n], keep_ratio, min_keep) == [k]
    assert reference.budget(n, keep_ratio, min_keep) == k


@backend_device
def test_budget_sizes_follow_rounding(backend, device):
    # 1x5 and 1x7 grids: 2.5 -> 2 and 3.5 -> 4 (half to even), read from the output shapes.
    grids, anchor_grids = [(1, 5), (1, 7)], [(1, 1), (1, 1)]
    tokens, anchors = make_workload(grids, anchor_grids, 4, seed=2, device=device)
    out = g2tr.reduce(tokens, anchors, grids, anchor_grids, 0.5, 1, backend=backend)
    assert out.cu_seqlens.tolist() == [0, 2, 6]


@kernel_device
@pytest.mark.parametrize("grid,anchor_grid", [((8, 8), (32, 32)), ((16, 16), (32, 32)), ((5, 3), (7, 11))])
def test_anchors_finer_than_vit_grid(grid, anchor_grid, kernel, device):
    # More anchor cells than tokens: each token has a cell of its own (most cells stay
    # empty), K < #occupied cells, so the selection is exactly the top-K tokens by score.
    (h, w), (h_a, w_a) = grid, anchor_grid
    cells = spec_cells(h, w, h_a, w_a)
    assert len(set(cells)) == h * w
    tokens, anchors = make_workload([grid], [anchor_grid], 64, seed=4, device=device)
    for backend in ("reference", kernel):
        out = g2tr.reduce(tokens, anchors, [grid], [anchor_grid], 0.5, 1, backend=backend)
        assert_reduce_matches(out, tokens, anchors, [grid], [anchor_grid], 0.5, 1)
        k = spec_budget(h * w, 0.5, 1)
        expected = torch.sort(torch.sort(out.scores.cpu(), descending=True, stable=True).indices[:k]).values
        assert out.keep_idx.tolist() == expected.tolist()


@kernel_device
@pytest.mark.parametrize("keep_ratio", [0.05, 0.1, 0.2])
def test_budget_below_cells_keeps_one_token_per_cell(keep_ratio, kernel, device):
    # 16x16 tokens over 8x8 anchors: 64 cells of 4 tokens. K = 13, 26 or 51 < 64.
    grids, anchor_grids = [(16, 16)], [(8, 8)]
    tokens, anchors = make_workload(grids, anchor_grids, 32, seed=5, device=device)
    cells = spec_cells(16, 16, 8, 8)
    for backend in ("reference", kernel):
        out = g2tr.reduce(tokens, anchors, grids, anchor_grids, keep_ratio, 1, backend=backend)
        kept = out.keep_idx.tolist()
        assert len({cells[i] for i in kept}) == len(kept), "two kept tokens share a cell"
        assert kept == spec_selection(out.scores.tolist(), cells, len(kept), 64)


@kernel_device
@pytest.mark.parametrize("keep_ratio", [0.25, 0.5, 0.75])
def test_budget_above_cells_covers_every_cell(keep_ratio, kernel, device):
    grids, anchor_grids = [(12, 12)], [(5, 7)]
    tokens, anchors = make_workload(grids, anchor_grids, 32, seed=6, device=device)
    cells = spec_cells(12, 12, 5, 7)
    for backend in ("reference", kernel):
        out = g2tr.reduce(tokens, anchors, grids, anchor_grids, keep_ratio, 1, backend=backend)
        kept = out.keep_idx.tolist()
        assert {cells[i] for i in kept} == set(cells), "an anchor cell kept no token"
        assert kept == spec_selection(out.scores.tolist(), cells, len(kept), 35)


# ------------------------------------------------------------------ edge cases


@backend_device
@dtypes
def test_keep_ratio_one_is_the_identity(backend, device, dtype):
    grids, anchor_grids = [(9, 7), (4, 4)], [(3, 3), (2, 2)]
    tokens, anchors = make_workload(grids, anchor_grids, 24, dtype, seed=8, device=device)
    out = g2tr.reduce(tokens, anchors, grids, anchor_grids, keep_ratio=1.0, min_keep=1, backend=backend)
    assert_bitwise_equal("merged", out.merged, tokens)
    assert out.keep_idx.tolist() == list(range(79))
    assert out.assign.tolist() == list(range(79))
    assert out.cu_seqlens.tolist() == [0, 63, 79]


@backend_device
def test_min_keep_above_n_keeps_everything(backend, device):
    grids, anchor_grids = [(4, 4), (8, 8)], [(2, 2), (4, 4)]
    tokens, anchors = make_workload(grids, anchor_grids, 16, seed=9, device=device)
    out = g2tr.reduce(tokens, anchors, grids, anchor_grids, keep_ratio=0.5, min_keep=20, backend=backend)
    # Image 0: min(16, max(20, 8)) = 16, all of it; image 1: max(20, 32) = 32.
    assert out.cu_seqlens.tolist() == [0, 16, 48]
    assert out.keep_idx[:16].tolist() == list(range(16))
    assert_bitwise_equal("merged of the untouched image", out.merged[:16], tokens[:16])
    assert out.assign[:16].tolist() == list(range(16))


@backend_device
@dtypes
def test_zero_images(backend, device, dtype):
    tokens = torch.empty(0, 32, dtype=dtype, device=device)
    anchors = torch.empty(0, 32, dtype=dtype, device=device)
    out = g2tr.reduce(tokens, anchors, [], [], backend=backend)
    assert out.merged.shape == (0, 32) and out.merged.dtype == dtype
    assert out.keep_idx.shape == (0,) and out.keep_idx.dtype == torch.int64
    assert out.cu_seqlens.tolist() == [0] and out.cu_seqlens.dtype == torch.int32
    assert out.scores.shape == (0,) and out.scores.dtype == torch.float32
    assert out.assign.shape == (0,) and out.assign.dtype == torch.int64


@backend_device
def test_single_token_images(backend, device):
    grids, anchor_grids = [(1, 1), (1, 1), (2, 1)], [(1, 1), (3, 3), (1, 1)]
    tokens, anchors = make_workload(grids, anchor_grids, 8, seed=10, device=device)
    out = g2tr.reduce(tokens, anchors, grids, anchor_grids, 0.5, 1, backend=backend)
    assert out.keep_idx.tolist() == [0, 1, 2 + int(out.scores[3] > out.scores[2])]
    assert out.cu_seqlens.tolist() == [0, 1, 2, 3]
    assert_bitwise_equal("merged of 1-token images", out.merged[:2], tokens[:2])


@backend_device
@dtypes
def test_duplicated_tokens_lower_index_wins(backend, device, dtype):
    # 8 distinct rows repeated over a 12x12 grid: duplicates in one cell score exactly the
    # same, so a later copy may be kept only if every earlier copy in its cell is, and a
    # dropped token whose copies were kept joins the lowest of them.
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(8, 32, generator=gen)
    tokens = base[torch.randint(0, 8, (144,), generator=gen)].to(dtype).to(device)
    anchors = torch.randn(9, 32, generator=gen).to(dtype).to(device)
    cells = spec_cells(12, 12, 3, 3)
    out = g2tr.reduce(tokens, anchors, [(12, 12)], [(3, 3)], 0.1, 1, backend=backend)
    kept = set(out.keep_idx.tolist())
    rows = [tuple(r) for r in tokens.float().cpu().tolist()]
    for j in kept:
        for i in range(j):
            if rows[i] == rows[j] and cells[i] == cells[j]:
                assert i in kept, f"token {j} kept but its earlier copy {i} in the same cell was not"
    keep_list = out.keep_idx.tolist()
    for j in range(144):
        if j in kept:
            continue
        copies = [r for r, k in enumerate(keep_list) if rows[k] == rows[j]]
        if copies:
            assert out.assign[j].item() == copies[0], f"token {j} joined row {out.assign[j].item()}, not {copies[0]}"


@backend_device
def test_non_contiguous_inputs_give_the_contiguous_result(backend, device):
    grids, anchor_grids = [(10, 10), (6, 9)], [(4, 4), (3, 3)]
    tokens, anchors = make_workload(grids, anchor_grids, 40, torch.bfloat16, seed=12, device=device)
    want = g2tr.reduce(tokens, anchors, grids, anchor_grids, backend=backend)
    wide = torch.zeros(tokens.shape[0], 80, dtype=tokens.dtype, device=device)
    wide[:, ::2] = tokens
    tall = torch.zeros(2 * anchors.shape[0], 40, dtype=anchors.dtype, device=device)
    tall[1::2] = anchors
    layouts = {
        "column-major": (tokens.t().contiguous().t(), anchors.t().contiguous().t()),
        "strided slices": (wide[:, ::2], tall[1::2]),
    }
    for name, (x, a) in layouts.items():
        assert not x.is_contiguous() and not a.is_contiguous()
        got = g2tr.reduce(x, a, grids, anchor_grids, backend=backend)
        if backend == "reference":
            # PyTorch's own reductions sum in a layout-dependent order, so the oracle is
            # only equal up to rounding (and near-ties) across layouts.
            assert_reduce_matches(got, tokens, anchors, grids, anchor_grids, name=name)
        else:
            assert_outputs_bitwise_equal(name, got, want)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_deterministic(backend):
    grids, anchor_grids, d = WORKLOADS["M2"]
    tokens, anchors = make_workload(grids, anchor_grids, d, torch.bfloat16, seed=13)
    first = g2tr.reduce(tokens, anchors, grids, anchor_grids, merge_weight=0.5, backend=backend)
    second = g2tr.reduce(tokens.clone(), anchors.clone(), grids, anchor_grids, merge_weight=0.5, backend=backend)
    assert_outputs_bitwise_equal("second run", second, first)


def test_threads_do_not_change_the_result():
    # The CPU kernels split work over threads; the split must not reach the bits.
    grids, anchor_grids, d = WORKLOADS["S2"]
    tokens, anchors = make_workload(grids, anchor_grids, d, torch.bfloat16, seed=14)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = g2tr.reduce(tokens, anchors, grids, anchor_grids, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    many = g2tr.reduce(tokens, anchors, grids, anchor_grids, backend="cpu")
    assert_outputs_bitwise_equal("threads", many, single)


# ------------------------------------------------------------------ non-finite values


def _poisoned(device):
    grids, anchor_grids = [(8, 8)] * 3, [(4, 4)] * 3
    tokens, anchors = make_workload(grids, anchor_grids, 32, seed=15, device=device)
    tokens[70, 3] = float("nan")  # image 1
    tokens[150, :] = float("inf")  # image 2
    tokens[140, 5] = -float("inf")  # image 2
    anchors[5, 0] = float("nan")  # image 0, cell 5: its four tokens score NaN
    return tokens, anchors, grids, anchor_grids


@kernel_device
@pytest.mark.parametrize("keep_ratio", [0.1, 0.5, 1.0])
def test_non_finite_values_never_crash(keep_ratio, kernel, device):
    tokens, anchors, grids, anchor_grids = _poisoned(device)
    outs = {}
    for backend in ("reference", kernel):
        out = g2tr.reduce(tokens, anchors, grids, anchor_grids, keep_ratio, 1, backend=backend)
        check_structure(out, grids, [spec_budget(64, keep_ratio, 1)] * 3)
        for row in (70, 140, 150):
            assert math.isnan(out.scores[row].item())
        outs[backend] = out
    assert_reduce_matches(outs[kernel], tokens, anchors, grids, anchor_grids, keep_ratio, 1)


@backend_device
def test_nan_scores_rank_last(backend, device):
    # One cell; token 1 is NaN. With K = 3 of 4 the NaN token is the one dropped, and as a
    # dropped token with no finite similarity it joins the first kept row.
    tokens = t([[1, 0], [float("nan"), 0], [0, 1], [1, 1]], device=device)
    anchors = t([[1, 0]], device=device)
    out = g2tr.reduce(tokens, anchors, [(2, 2)], [(1, 1)], 0.75, 1, backend=backend)
    assert out.keep_idx.tolist() == [0, 2, 3]
    assert out.assign.tolist() == [0, 0, 1, 2]
    assert torch.isnan(out.merged[0]).any() and torch.isfinite(out.merged[1:]).all()
    # K = 4 keeps the NaN token too, as the last one taken.
    out = g2tr.reduce(tokens, anchors, [(2, 2)], [(1, 1)], 1.0, 1, backend=backend)
    assert out.keep_idx.tolist() == [0, 1, 2, 3]


@backend_device
@pytest.mark.parametrize(
    "where,message",
    [(("tokens", 70), "tokens of image 1"), (("tokens", 150), "tokens of image 2"),
     (("anchors", 5), "anchors of image 0"), (("anchors", 40), "anchors of image 2")],
)
def test_check_finite_names_the_image(backend, device, where, message):
    grids, anchor_grids = [(8, 8)] * 3, [(4, 4)] * 3
    tokens, anchors = make_workload(grids, anchor_grids, 16, seed=16, device=device)
    g2tr.reduce(tokens, anchors, grids, anchor_grids, backend=backend, check_finite=True)
    target = tokens if where[0] == "tokens" else anchors
    target[where[1], 2] = float("inf") if where[1] % 2 else float("nan")
    with pytest.raises(ValueError, match=message):
        g2tr.reduce(tokens, anchors, grids, anchor_grids, backend=backend, check_finite=True)


# ------------------------------------------------------------------ padded form


@backend_device
@dtypes
def test_reduce_padded_equals_packed(backend, device, dtype):
    b, (h, w), (h_a, w_a) = 3, (9, 11), (4, 5)
    tokens, anchors = make_workload([(h, w)] * b, [(h_a, w_a)] * b, 24, dtype, seed=17, device=device)
    packed = g2tr.reduce(tokens, anchors, [(h, w)] * b, [(h_a, w_a)] * b, 0.5, 4, 2.0, backend=backend)
    padded = g2tr.reduce_padded(tokens.reshape(b, h * w, 24), anchors.reshape(b, h_a * w_a, 24), (h, w), (h_a, w_a),
                                0.5, 4, 2.0, backend=backend)
    k = spec_budget(h * w, 0.5, 4)
    image = torch.arange(b, device=device)[:, None]
    assert_bitwise_equal("merged", padded.merged, packed.merged.reshape(b, k, 24))
    assert_bitwise_equal("keep_idx", padded.keep_idx, packed.keep_idx.reshape(b, k) - image * (h * w))
    assert_bitwise_equal("assign", padded.assign, packed.assign.reshape(b, h * w) - image * k)
    assert_bitwise_equal("scores", padded.scores, packed.scores.reshape(b, h * w))
    assert_bitwise_equal("cu_seqlens", padded.cu_seqlens, packed.cu_seqlens)
    assert bool((padded.keep_idx >= 0).all() and (padded.keep_idx < h * w).all())


@pytest.mark.parametrize("backend,dtype,seed", [("reference", torch.float32, 18), ("cpu", torch.bfloat16, 19)],
                         ids=["reference", "cpu"])
def test_stages_agree_with_fused_reduce(backend, dtype, seed):
    # reduce is exactly anchor_scores -> balanced_topk(quota 1) -> merge, on each backend.
    grids, anchor_grids = [(10, 10), (7, 9)], [(5, 5), (3, 4)]
    tokens, anchors = make_workload(grids, anchor_grids, 16, dtype, seed=seed)
    out = g2tr.reduce(tokens, anchors, grids, anchor_grids, 0.3, 4, 1.5, backend=backend)
    scores, cells = g2tr.anchor_scores(tokens, anchors, grids, anchor_grids, backend=backend)
    budgets = g2tr.budgets([100, 63], 0.3, 4)
    keep = g2tr.balanced_topk(scores, cells, [100, 63], budgets, [25, 12], backend=backend)
    merged, assign = g2tr.merge(tokens, keep, [100, 63], budgets, 1.5, backend=backend)
    assert_bitwise_equal("scores", out.scores, scores)
    assert_bitwise_equal("keep_idx", out.keep_idx, keep)
    assert_bitwise_equal("merged", out.merged, merged)
    assert_bitwise_equal("assign", out.assign, assign)


def test_auto_backend_on_cpu_is_the_cpu_kernel():
    grids, anchor_grids = [(6, 6)], [(3, 3)]
    tokens, anchors = make_workload(grids, anchor_grids, 8, seed=20)
    auto = g2tr.reduce(tokens, anchors, grids, anchor_grids)
    assert_outputs_bitwise_equal("auto", auto, g2tr.reduce(tokens, anchors, grids, anchor_grids, backend="cpu"))


def test_scores_match_fp64_cosine():
    # A check of both backends against fp64 math rather than against each other.
    grids, anchor_grids = [(16, 16)], [(4, 4)]
    tokens, anchors = make_workload(grids, anchor_grids, 256, torch.bfloat16, seed=21)
    cells = torch.tensor(spec_cells(16, 16, 4, 4))
    x, a = tokens.double(), anchors.double()[cells]
    want = ((x * a).sum(-1) / (x.norm(dim=-1) * a.norm(dim=-1))).float()
    for backend in ("reference", "cpu"):
        out = g2tr.reduce(tokens, anchors, grids, anchor_grids, backend=backend)
        assert_close_report(f"{backend} scores", out.scores, want, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ small mixed batches (Triton-interpreter sized)

# A packed batch of mixed sizes: anchors coarser than the ViT grid (12x12 over 4x4), finer
# than it (5x9 over 10x18: more cells than tokens) and K below the number of cells (20x20
# over 15x15 at ratio 0.25 keeps 100 of 225 occupied cells).
MIXED = ([(12, 12), (5, 9), (20, 20)], [(4, 4), (10, 18), (15, 15)])


@backend_device
@dtypes
def test_mixed_batch_matches_reference(backend, device, dtype):
    grids, anchor_grids = MIXED
    tokens, anchors = make_workload(grids, anchor_grids, 32, dtype, seed=9, device=device)
    out = g2tr.reduce(tokens, anchors, grids, anchor_grids, 0.25, 8, backend=backend)
    # D = 32: the fp32 sums differ from the reference's by far less than SCORE_ATOL: 1e-5 here.
    assert_close_report("scores", out.scores.cpu(),
                        reference.anchor_scores(tokens.cpu(), anchors.cpu(), grids, anchor_grids)[0], atol=1e-5, rtol=0)
    assert_reduce_matches(out, tokens, anchors, grids, anchor_grids, 0.25, 8, name=f"{backend} {dtype}")


@backend_device
def test_one_37x37_image_matches_reference(backend, device):
    grids, anchor_grids = [(37, 37)], [(16, 16)]
    tokens, anchors = make_workload(grids, anchor_grids, 16, torch.float32, seed=10, device=device)
    out = g2tr.reduce(tokens, anchors, grids, anchor_grids, backend=backend)
    assert out.keep_idx.numel() == 684  # round(684.5) = 684
    assert_reduce_matches(out, tokens, anchors, grids, anchor_grids, name=f"{backend} 37x37")


@backend_device
def test_ternary_mixed_batch_is_bitwise_the_reference(backend, device):
    """Ties everywhere (duplicated tokens included) and exact sums: identical to the reference."""
    # 20 x 20 at 0.4 keeps 160 tokens: equal similarities across column tiles and splits.
    grids, anchor_grids = [(12, 12), (7, 5), (20, 20)], [(4, 4), (14, 10), (5, 5)]
    tokens, anchors = make_ternary_workload(grids, anchor_grids, 16, seed=11)
    tokens[100:120] = tokens[40:60]
    out = g2tr.reduce(tokens.to(device), anchors.to(device), grids, anchor_grids, 0.4, 4, 1.0, backend=backend)
    want = g2tr.ReduceOutput(*reference.reduce(tokens, anchors, grids, anchor_grids, 0.4, 4, 1.0))
    assert_outputs_bitwise_equal(f"{backend} vs reference", g2tr.ReduceOutput(*(t.cpu() for t in out)), want)


@backend_device
@pytest.mark.parametrize("keep_ratio,min_keep", [(1.0, 1), (0.5, 1000)], ids=["ratio-1", "min_keep-above-N"])
def test_budget_of_n_is_the_identity(backend, device, keep_ratio, min_keep):
    """K = N: everything kept, nothing merged, merged == tokens bit for bit."""
    grids, anchor_grids = [(5, 7), (3, 3)], [(2, 2), (6, 6)]
    tokens, anchors = make_workload(grids, anchor_grids, 16, torch.bfloat16, seed=12, device=device)
    out = g2tr.reduce(tokens, anchors, grids, anchor_grids, keep_ratio, min_keep, backend=backend)
    n = tokens.shape[0]
    assert_bitwise_equal("keep_idx", out.keep_idx.cpu(), torch.arange(n))
    assert_bitwise_equal("assign", out.assign.cpu(), torch.arange(n))
    assert_bitwise_equal("merged", out.merged.cpu(), tokens.cpu())
    assert_bitwise_equal("cu_seqlens", out.cu_seqlens.cpu(), torch.tensor([0, 35, 44], dtype=torch.int32))


@backend_device
def test_strided_half_tokens_with_nan(backend, device):
    grids, anchor_grids = [(10, 10), (4, 6)], [(5, 5), (2, 3)]
    wide, anchors = make_workload(grids, anchor_grids, 64, torch.float16, seed=13, device=device)
    tokens = wide[:, 1::2]
    tokens[7] = float("nan")  # ranks last, merges into the first kept token
    out = g2tr.reduce(tokens, anchors[:, 1::2], grids, anchor_grids, 0.5, 4, backend=backend)
    assert_reduce_matches(out, tokens, anchors[:, 1::2], grids, anchor_grids, 0.5, 4, name=f"{backend} non-contiguous")


# ---------------------------------------------------------------------------- the device kernels
# On a GPU kernel_device adds cuda and triton on CUDA: each is compared with the reference
# (tie-aware) and, where the result is exact, with the CPU kernel bit for bit.


def _reduce_on(kernel, device, tokens, anchors, grids, anchor_grids, **kwargs):
    return g2tr.ReduceOutput(*(t.cpu() for t in g2tr.reduce(tokens.to(device), anchors.to(device), grids,
                                                            anchor_grids, backend=kernel, **kwargs)))


@kernel_device
@dtypes
@pytest.mark.parametrize("workload", ["S1", "M2"])
def test_reduce_matches_reference_and_cpu(workload, dtype, kernel, device):
    grids, anchor_grids, d = WORKLOADS[workload]
    tokens, anchors = make_workload(grids, anchor_grids, d, dtype, seed=7)
    out = g2tr.reduce(tokens.to(device), anchors.to(device), grids, anchor_grids, backend=kernel)
    assert out.merged.device.type == device
    assert_reduce_matches(out, tokens, anchors, grids, anchor_grids, name=f"{workload} {kernel}-{device}")
    # The selection of the kernel's scores equals the CPU kernel's selection of the same scores.
    lengths = lengths_of(grids)
    budgets = [spec_budget(n, 0.5, 32) for n in lengths]
    cells = torch.ops.g2tr.anchor_scores(tokens, anchors, [v for p in grids for v in p],
                                         [v for p in anchor_grids for v in p])[1]
    cpu_keep = torch.ops.g2tr.balanced_topk(out.scores.cpu(), cells, lengths, budgets,
                                            [h * w for h, w in anchor_grids], [1] * len(lengths))
    assert_bitwise_equal("keep_idx vs CPU selection of the kernel's scores", out.keep_idx.cpu(), cpu_keep)


@kernel_device
@dtypes
@pytest.mark.parametrize("workload", ["S1", "M2"])
def test_exact_ties_equal_cpu_bit_for_bit(workload, dtype, kernel, device):
    # Ternary rows: every score, similarity and sum is exact in any order, so the tie rules
    # (lower index everywhere) and the merged means must agree with the CPU and the reference exactly.
    grids, anchor_grids, _ = WORKLOADS[workload]
    tokens, anchors = make_ternary_workload(grids, anchor_grids, 16, dtype, seed=5)
    for merge_weight in (1.0, 0.3):
        got = _reduce_on(kernel, device, tokens, anchors, grids, anchor_grids, merge_weight=merge_weight)
        cpu = _reduce_on("cpu", "cpu", tokens, anchors, grids, anchor_grids, merge_weight=merge_weight)
        ref = reference.reduce(tokens, anchors, grids, anchor_grids, merge_weight=merge_weight)
        assert_outputs_bitwise_equal(f"{workload} weight {merge_weight} vs CPU", got, cpu)
        assert_outputs_bitwise_equal(f"{workload} weight {merge_weight} vs reference", got, g2tr.ReduceOutput(*ref))


@kernel_device
@dtypes
def test_misaligned_and_strided_inputs(dtype, kernel, device):
    # A storage offset of one element breaks 16-byte alignment (the element-wise paths run);
    # a column slice is not contiguous (the op copies it).
    grids, anchor_grids, d = [(9, 9)], [(4, 4)], 64
    tokens, anchors = make_workload(grids, anchor_grids, d, dtype, seed=3)
    flat = torch.empty(tokens.numel() + 1, dtype=dtype, device=device)
    flat[1:].copy_(tokens.reshape(-1).to(device))
    misaligned = flat[1:].view(tokens.shape)
    wide = torch.zeros(tokens.shape[0], d + 3, dtype=dtype, device=device)
    wide[:, 1 : d + 1] = tokens.to(device)
    strided = wide[:, 1 : d + 1]
    want = _reduce_on(kernel, device, tokens, anchors, grids, anchor_grids)
    for name, x in (("misaligned", misaligned), ("strided", strided)):
        assert_outputs_bitwise_equal(name, _reduce_on(kernel, device, x, anchors, grids, anchor_grids), want)


@kernel_device
def test_non_finite_tokens_match_cpu(kernel, device):
    # NaN scores rank last, a NaN similarity never wins, an all-NaN row joins the first kept row.
    grids, anchor_grids, d = [(8, 8), (6, 5)], [(4, 4), (3, 3)], 32
    tokens, anchors = make_workload(grids, anchor_grids, d, torch.float32, seed=9)
    tokens[3] = NAN
    tokens[17, 5] = INF
    tokens[70] = 0.0
    anchors[2] = NAN
    got = _reduce_on(kernel, device, tokens, anchors, grids, anchor_grids)
    assert_reduce_matches(got, tokens, anchors, grids, anchor_grids, name="non-finite")


@kernel_device
def test_reduce_empty_batch_and_tiny_images(kernel, device):
    empty = _reduce_on(kernel, device, torch.zeros(0, 8), torch.zeros(0, 8), [], [])
    assert empty.merged.shape == (0, 8) and empty.cu_seqlens.tolist() == [0]
    grids, anchor_grids = [(1, 1), (1, 2), (3, 1)], [(1, 1), (2, 2), (1, 1)]
    tokens, anchors = make_workload(grids, anchor_grids, 8, torch.bfloat16, seed=2)
    got = _reduce_on(kernel, device, tokens, anchors, grids, anchor_grids, keep_ratio=0.5, min_keep=1)
    assert_reduce_matches(got, tokens, anchors, grids, anchor_grids, 0.5, 1, name="tiny images")


@kernel_device
def test_deterministic_across_runs(kernel, device):
    grids, anchor_grids, d = WORKLOADS["M2"]
    tokens, anchors = make_workload(grids, anchor_grids, d, torch.bfloat16, seed=12)
    first = _reduce_on(kernel, device, tokens, anchors, grids, anchor_grids)
    for _ in range(3):
        assert_outputs_bitwise_equal("rerun", _reduce_on(kernel, device, tokens, anchors, grids, anchor_grids), first)


# ---------------------------------------------------------------------------- the op's inputs
# Read by test_library.py (opcheck) and test_errors.py (bad input through every path);
# the form is described in helpers.py.


def opcheck_samples():
    out = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        grids, anchor_grids = [(6, 5), (4, 4), (1, 1)], [(3, 2), (2, 2), (1, 1)]
        tokens, anchors = make_workload(grids, anchor_grids, 12, dtype, seed=1)
        flat_g = [v for p in grids for v in p]
        flat_a = [v for p in anchor_grids for v in p]
        out.append((tokens, anchors, flat_g, flat_a, 0.5, 4, 1.0))
        out.append((tokens, anchors, flat_g, flat_a, 0.25, 1, 3.0))
        out.append((tokens, anchors, flat_g, flat_a, 1.0, 1, 0.5))
    empty = torch.empty(0, 12)
    out.append((empty, empty, [], [], 0.5, 32, 1.0))
    return out


# Two images: 2x4 tokens over 1x2 anchors, 3x2 tokens over 2x1 anchors (N = 14, M = 4).
def valid_args() -> dict:
    gen = torch.Generator().manual_seed(0)
    return dict(
        tokens=torch.randn(14, 8, generator=gen), anchors=torch.randn(4, 8, generator=gen),
        grids=[2, 4, 3, 2], anchor_grids=[1, 2, 2, 1], keep_ratio=0.5, min_keep=1, merge_weight=1.0,
    )


ERROR_CASES = [
    Case("tokens-1d", tensor_setter("tokens", lambda t: t.reshape(-1)), ValueError, ["tokens", "2-D"]),
    Case("tokens-3d", tensor_setter("tokens", lambda t: t[None]), ValueError, ["tokens", "2-D"]),
    Case("anchors-1d", tensor_setter("anchors", lambda t: t.reshape(-1)), ValueError, ["anchors", "2-D"]),
    Case("anchors-3d", tensor_setter("anchors", lambda t: t.reshape(2, 2, 8)), ValueError, ["anchors", "2-D"]),
    Case("mismatched-d", tensor_setter("anchors", lambda t: t[:, :6]), ValueError, ["anchors", "D = 6", "D = 8"]),
    Case("n-not-sum-hw", tensor_setter("tokens", lambda t: torch.cat([t, t[:1]])), ValueError,
         ["tokens", "N = 15", "14"]),
    Case("m-not-sum-hw", tensor_setter("anchors", lambda t: t[:3]), ValueError, ["anchors", "M = 3", "4"]),
    Case("grid-zero", setter(grids=[2, 4, 0, 2]), ValueError, ["grids of image 1", "positive"]),
    Case("grid-negative", setter(grids=[-2, 4, 3, 2]), ValueError, ["grids of image 0", "positive"]),
    Case("anchor-grid-zero", setter(anchor_grids=[1, 2, 2, 0]), ValueError, ["anchor_grids of image 1", "positive"]),
    Case("anchor-grid-negative", setter(anchor_grids=[1, -2, 2, 1]), ValueError, ["anchor_grids of image 0"]),
    Case("grids-odd-length", setter(grids=[2, 4, 3]), ValueError, ["grids", "pair"]),
    Case("anchor-grids-odd-length", setter(anchor_grids=[1, 2, 2]), ValueError, ["anchor_grids", "pair"]),
    Case("image-counts-differ", setter(anchor_grids=[2, 2]), ValueError, ["anchor_grids", "1", "grids", "2"]),
    Case("grids-tensor", setter(grids=torch.tensor([2, 4, 3, 2])), TypeError, ["grids", "tensor"],
         ops_error=RuntimeError, ops_fragments=["grids"]),
    Case("anchor-grids-tensor", setter(anchor_grids=torch.tensor([1, 2, 2, 1])), TypeError, ["anchor_grids", "tensor"],
         ops_error=RuntimeError, ops_fragments=["anchor_grids"]),
    Case("grid-pair-of-three", setter(grids=[(2, 4, 1), (3, 2)]), ValueError, ["grids of image 0", "pair"],
         python_only=True),
    Case("keep-ratio-zero", setter(keep_ratio=0.0), ValueError, ["keep_ratio", "(0, 1]"]),
    Case("keep-ratio-above-one", setter(keep_ratio=1.5), ValueError, ["keep_ratio"]),
    Case("keep-ratio-negative", setter(keep_ratio=-0.5), ValueError, ["keep_ratio"]),
    Case("keep-ratio-nan", setter(keep_ratio=NAN), ValueError, ["keep_ratio"]),
    Case("keep-ratio-inf", setter(keep_ratio=INF), ValueError, ["keep_ratio"]),
    Case("min-keep-zero", setter(min_keep=0), ValueError, ["min_keep", ">= 1"]),
    Case("min-keep-negative", setter(min_keep=-3), ValueError, ["min_keep"]),
    Case("merge-weight-zero", setter(merge_weight=0.0), ValueError, ["merge_weight"]),
    Case("merge-weight-negative", setter(merge_weight=-1.0), ValueError, ["merge_weight"]),
    Case("merge-weight-inf", setter(merge_weight=INF), ValueError, ["merge_weight"]),
    Case("merge-weight-nan", setter(merge_weight=NAN), ValueError, ["merge_weight"]),
    Case("mixed-devices", tensor_setter("anchors", lambda t: t.to("meta")), ValueError, ["tokens", "anchors", "meta"]),
    Case("int-tokens", lambda a: a.update(tokens=a["tokens"].int(), anchors=a["anchors"].int()), TypeError,
         ["tokens"] + DTYPE_WORDS),
    Case("int64-tokens", lambda a: a.update(tokens=a["tokens"].long(), anchors=a["anchors"].long()), TypeError,
         ["tokens"] + DTYPE_WORDS),
    Case("bool-tokens", lambda a: a.update(tokens=a["tokens"] > 0, anchors=a["anchors"] > 0), TypeError, ["tokens"]),
    Case("complex-tokens", lambda a: a.update(tokens=a["tokens"].to(torch.complex64),
                                              anchors=a["anchors"].to(torch.complex64)), TypeError,
         ["tokens"] + DTYPE_WORDS),
    Case("int-anchors", tensor_setter("anchors", lambda t: t.int()), TypeError, ["anchors"] + DTYPE_WORDS),
    Case("anchors-dtype-differs", tensor_setter("anchors", lambda t: t.bfloat16()), TypeError,
         ["anchors dtype", "tokens dtype"]),
]
