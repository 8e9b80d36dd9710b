"""Layout rebuilding after G2TR (SPEC.md §5): expected outputs written out by hand."""
import pytest
import torch

import g2tr_kernels as g2tr
from g2tr_kernels.layout import flattened_position_ids, image_runs, rebuild_packed, rebuild_padded


def test_flattened_position_ids_are_row_times_max_plus_col():
    assert flattened_position_ids(2, 3, 70).tolist() == [0, 1, 2, 70, 71, 72]


def test_packed_rebuild_bagel_layout_by_hand():
    # image 0: 2 x 3 grid, image 1: 2 x 2 grid, BAGEL ids row * 70 + col
    position_ids = torch.tensor([0, 1, 2, 70, 71, 72, 0, 1, 70, 71])
    keep_idx = torch.tensor([1, 3, 5, 6, 9])  # image 0 keeps 3 of 6, image 1 keeps 2 of 4
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    lay = rebuild_packed(keep_idx, position_ids, key_values_lens=[10, 4], rope=[3, 1], cu_seqlens=cu)

    assert lay.position_ids.tolist() == [1, 70, 72, 0, 71]
    assert lay.cu_seqlens.tolist() == [0, 3, 5] and lay.cu_seqlens.dtype == torch.int32
    assert lay.vit_token_seqlens.tolist() == [3, 2]
    assert lay.query_lens.tolist() == [5, 4]  # [SOI] + K_i + [EOI]
    # sample 0: 10 cached rows (0..9), then its query block at 10..14;
    # sample 1: 4 cached rows (15..18), then its query block at 19..22
    assert lay.key_value_indexes.tolist() == list(range(0, 10)) + list(range(15, 19))
    assert lay.query_indexes.tolist() == list(range(10, 15)) + list(range(19, 23))
    # query sequence: SOI(0) t t t EOI(4) SOI(5) t t EOI(8)
    assert lay.text_indexes.tolist() == [0, 4, 5, 8]
    assert lay.vit_token_indexes.tolist() == [1, 2, 3, 6, 7]
    assert lay.rope_position_ids.tolist() == [3] * 5 + [1] * 4
    assert lay.key_values_lens.tolist() == [10, 4]
    assert lay.new_kv_lens == [15, 8]  # old + K_i + 2, not old + N_i + 2
    assert lay.new_rope == [4, 2]


def test_packed_rebuild_from_reduce_output():
    torch.manual_seed(0)
    grids, anchor_grids = [(4, 5), (3, 3)], [(2, 2), (2, 2)]
    tokens, anchors = torch.randn(29, 8), torch.randn(8, 8)
    out = g2tr.reduce(tokens, anchors, grids, anchor_grids, keep_ratio=0.5, min_keep=1, backend="reference")
    pos = torch.cat([flattened_position_ids(h, w, 70) for h, w in grids])
    lay = rebuild_packed(out, pos, key_values_lens=[7, 0])
    assert lay.vit_token_seqlens.tolist() == [10, 4]  # round(10.0), round(4.5) = 4
    assert lay.new_kv_lens == [7 + 10 + 2, 0 + 4 + 2]
    assert torch.equal(lay.position_ids, pos[out.keep_idx])
    assert lay.rope_position_ids.tolist() == [0] * 12 + [0] * 6


def test_packed_rebuild_rejects_inconsistent_cu_seqlens():
    with pytest.raises(ValueError, match="cu_seqlens"):
        rebuild_packed(torch.tensor([0, 1]), torch.arange(4), cu_seqlens=[0, 3])
    with pytest.raises(ValueError, match="key_values_lens"):
        rebuild_packed(torch.tensor([0, 1]), torch.arange(4), key_values_lens=[1, 2], cu_seqlens=[0, 2])


# Padded layout. image token 9, pad 0.
# row 0: [1, 9, 9, 9, 9, 2, 3, 0]  image tokens 0..3 (columns 1-4), right padded
# row 1: [4, 9, 9, 9, 9, 5, 9, 9]  image tokens 4..7 (columns 1-4) and 8..9 (columns 6-7)
IDS = torch.tensor([[1, 9, 9, 9, 9, 2, 3, 0], [4, 9, 9, 9, 9, 5, 9, 9]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
POS = torch.arange(8).expand(2, 8)
LABELS = torch.tensor([[-100, -100, -100, -100, -100, 2, 3, -100], [10, 11, 12, 13, 14, 15, 16, 17]])
# keep image tokens 0, 2 (row 0 columns 1, 3), 5, 6 (row 1 columns 2, 3) and 9 (row 1 column 7)
KEEP = torch.tensor([0, 2, 5, 6, 9])


def test_padded_rebuild_right_by_hand():
    lay = rebuild_padded(IDS, KEEP, 9, attention_mask=MASK, position_ids=POS, labels=LABELS)
    assert lay.input_ids.tolist() == [[1, 9, 9, 2, 3, 0], [4, 9, 9, 5, 9, 0]]
    assert lay.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]]
    assert lay.position_ids.tolist() == [[0, 1, 3, 5, 6, 7], [0, 2, 3, 5, 7, 0]]
    assert lay.labels.tolist() == [[-100, -100, -100, 2, 3, -100], [10, 12, 13, 15, 17, -100]]
    assert lay.index.tolist() == [[0, 1, 3, 5, 6, 7], [0, 2, 3, 5, 7, -1]]
    assert lay.lengths == [6, 5]
    assert lay.keep.tolist() == [
        [True, True, False, True, False, True, True, True],
        [True, False, True, True, False, True, False, True],
    ]
    # each run of N_i image tokens became K_i
    assert image_runs(IDS, 9) == [[4], [4, 2]]
    assert image_runs(lay.input_ids, 9) == [[2], [2, 1]]


def test_padded_rebuild_left_and_custom_pad_values():
    lay = rebuild_padded(
        IDS, KEEP, 9, attention_mask=MASK, position_ids=POS, labels=LABELS,
        pad_token_id=7, label_pad_id=-1, position_pad_id=1, padding_side="left",
    )
    assert lay.input_ids.tolist() == [[1, 9, 9, 2, 3, 0], [7, 4, 9, 9, 5, 9]]
    assert lay.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]]
    assert lay.position_ids.tolist() == [[0, 1, 3, 5, 6, 7], [1, 0, 2, 3, 5, 7]]
    assert lay.labels.tolist() == [[-100, -100, -100, 2, 3, -100], [-1, 10, 12, 13, 15, 17]]
    assert lay.index.tolist() == [[0, 1, 3, 5, 6, 7], [-1, 0, 2, 3, 5, 7]]


def test_padded_rebuild_mrope_positions_and_no_mask():
    pos3 = torch.stack([POS, POS * 10, POS * 100])  # [3, B, L] like Qwen2-VL's M-RoPE ids
    lay = rebuild_padded(IDS, KEEP, 9, position_ids=pos3)
    assert lay.position_ids.shape == (3, 2, 6)
    assert lay.position_ids[1].tolist() == [[0, 10, 30, 50, 60, 70], [0, 20, 30, 50, 70, 0]]
    # no mask given: every input column counts as attended, the new padding does not
    assert lay.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]
    assert lay.labels is None


def test_padded_rebuild_keep_all_is_identity():
    lay = rebuild_padded(IDS, torch.arange(10), 9, attention_mask=MASK, labels=LABELS)
    assert torch.equal(lay.input_ids, IDS) and torch.equal(lay.attention_mask, MASK) and torch.equal(lay.labels, LABELS)


def test_padded_rebuild_rejects_indices_past_the_image_tokens():
    with pytest.raises(ValueError, match="10 image tokens"):
        rebuild_padded(IDS, torch.tensor([0, 10]), 9)
    with pytest.raises(ValueError, match="padding_side"):
        rebuild_padded(IDS, KEEP, 9, padding_side="middle")
