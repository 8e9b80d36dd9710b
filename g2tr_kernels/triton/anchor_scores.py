"""Stage III score in Triton: one program per block of tokens of one image.

Each token is read once: its dot product with the anchor of its cell and both squared
norms accumulate in fp32 over D, whatever the input dtype. Besides the score and the
local cell id, the kernel can write each token's inverse norm (the merge reuses it) and
fold in the per-cell best: every token atomic_max-es its rank_key (score, then lower
index; _common.py) into its cell's slot. Integer max does not depend on the order
of the atomics, so the result is deterministic.

The score is SPEC.md §3's cosine (g2tr_kernels/reference/anchor_scores.py), evaluated as
(dot * inv_norm(token)) * inv_norm(anchor), inv_norm(x) = 1 / max(|x|, NORM_EPS), with
IEEE sqrt and division (sqrt_rn, div_rn), in the order of csrc/include/g2tr/common.h.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .. import _checks
from ._common import (
    aligned_rows,
    image_table,
    interpreted,
    inv_norm,
    launch,
    launch_guard,
    launchable,
    needs_rescale,
    padded_width,
    rank_key,
    row_pow2,
    starts,
)

Pairs = Sequence[Tuple[int, int]]


@triton.jit
def _score_kernel(
    tokens,  # [N, D]
    anchors,  # [M, D]
    table,  # int64 [B, 8]: tok_begin, n, h, w, h_a, w_a, anchor_begin, cell_begin
    scores,  # fp32 [N] out
    cells,  # int64 [N] out
    inv_norms,  # fp32 [N] out (WRITE_NORMS)
    pow2s,  # fp32 [N] out (WRITE_NORMS): the token's cosine_pow2 (1 for normal rows)
    cell_best,  # int64 [total cells] in/out, starts at int64 min (CELL_BEST)
    D,  # columns to read: padded_width(D), zeros past the true D (_common.aligned_rows)
    token_stride,  # row strides (multiples of 16)
    anchor_stride,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    WRITE_NORMS: tl.constexpr,
    CELL_BEST: tl.constexpr,
):
    block = tl.program_id(0)
    image = tl.program_id(1)
    row = table + image * 8
    n = tl.load(row + 1)
    if block * BLOCK_T >= n:
        return  # grid dim 0 covers the longest image
    tok_begin = tl.load(row + 0)
    h = tl.load(row + 2)
    w = tl.load(row + 3)
    h_a = tl.load(row + 4)
    w_a = tl.load(row + 5)
    anchor_begin = tl.load(row + 6)
    cell_begin = tl.load(row + 7)

    local = block * BLOCK_T + tl.arange(0, BLOCK_T)
    live = local < n
    # Integer floor map, clamped to the last cell (SPEC.md §3).
    a_r = tl.minimum((local // w) * h_a // h, h_a - 1)
    a_c = tl.minimum((local % w) * w_a // w, w_a - 1)
    cell = a_r * w_a + a_c
    token_row = (tok_begin + local).to(tl.int64) * token_stride
    anchor_row = (anchor_begin + cell).to(tl.int64) * anchor_stride

    dot = tl.zeros([BLOCK_T], dtype=tl.float32)
    token_sq = tl.zeros([BLOCK_T], dtype=tl.float32)
    anchor_sq = tl.zeros([BLOCK_T], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = live[:, None] & (d < D)[None, :]
        t = tl.load(tokens + token_row[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
        a = tl.load(anchors + anchor_row[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
        dot += tl.sum(t * a, axis=1)
        token_sq += tl.sum(t * t, axis=1)
        anchor_sq += tl.sum(a * a, axis=1)
    token_pow2 = tl.full([BLOCK_T], 1.0, dtype=tl.float32)
    anchor_pow2 = tl.full([BLOCK_T], 1.0, dtype=tl.float32)
    rescale = live & (needs_rescale(token_sq) | needs_rescale(anchor_sq))
    if tl.max(rescale.to(tl.int32), axis=0) > 0:  # rare: rows of extreme magnitude (common.h)
        token_pow2 = tl.where(needs_rescale(token_sq), row_pow2(tokens, token_row, live, D, BLOCK_D), 1.0)
        anchor_pow2 = tl.where(needs_rescale(anchor_sq), row_pow2(anchors, anchor_row, live, D, BLOCK_D), 1.0)
        dot = tl.zeros([BLOCK_T], dtype=tl.float32)
        token_sq = tl.zeros([BLOCK_T], dtype=tl.float32)
        anchor_sq = tl.zeros([BLOCK_T], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            mask = live[:, None] & (d < D)[None, :]
            t = tl.load(tokens + token_row[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
            a = tl.load(anchors + anchor_row[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
            t = t * token_pow2[:, None]
            a = a * anchor_pow2[:, None]
            dot += tl.sum(t * a, axis=1)
            token_sq += tl.sum(t * t, axis=1)
            anchor_sq += tl.sum(a * a, axis=1)
    token_inv = inv_norm(token_sq, token_pow2)
    score = (dot * token_inv) * inv_norm(anchor_sq, anchor_pow2)

    tl.store(scores + tok_begin + local, score, mask=live)
    tl.store(cells + tok_begin + local, cell, mask=live)
    if WRITE_NORMS:
        tl.store(inv_norms + tok_begin + local, token_inv, mask=live)
        tl.store(pow2s + tok_begin + local, token_pow2, mask=live)
    if CELL_BEST:
        tl.atomic_max(cell_best + cell_begin + cell, rank_key(score, local), mask=live)


def score(
    tokens: torch.Tensor,
    anchors: torch.Tensor,
    grids: Pairs,
    anchor_grids: Pairs,
    want_norms: bool = False,
    want_cell_best: bool = False,
    op: str = "g2tr.triton_anchor_scores",
    pow2s: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Launcher: (scores fp32 [N], cells int64 [N], inv_norms fp32 [N] or None,
    cell_best int64 [sum(h_a * w_a)] or None). grids / anchor_grids: (h, w) pairs.
    pow2s: fp32 [N] that receives each token's cosine_pow2 with the norms (for the merge)."""
    tokens, anchors = aligned_rows(tokens), aligned_rows(anchors)
    n_total, dim = tokens.shape
    device = tokens.device
    scores = torch.empty(n_total, dtype=torch.float32, device=device)
    cells = torch.empty(n_total, dtype=torch.int64, device=device)
    inv_norms = torch.empty(n_total, dtype=torch.float32, device=device) if want_norms else None
    if want_norms and pow2s is None:
        pow2s = torch.empty(n_total, dtype=torch.float32, device=device)
    num_cells = sum(h * w for h, w in anchor_grids)
    cell_best = (
        torch.full((num_cells,), torch.iinfo(torch.int64).min, dtype=torch.int64, device=device)
        if want_cell_best else None
    )
    if not grids:
        return scores, cells, inv_norms, cell_best
    lengths = [h * w for h, w in grids]
    anchor_begin = starts([h_a * w_a for h_a, w_a in anchor_grids])  # anchors and cells are both packed per image
    h, w = zip(*grids)
    h_a, w_a = zip(*anchor_grids)
    table = image_table((starts(lengths), lengths, h, w, h_a, w_a, anchor_begin, anchor_begin), tokens)
    # Two [BLOCK_T, BLOCK_D] fp32 tiles live at once: small on a GPU (registers), large under
    # the interpreter (it pays per op, not per element).
    block_t, block_d = (64, 128) if interpreted() else (32, 64)
    block_d = min(block_d, max(16, triton.next_power_of_2(dim)))
    grid = (triton.cdiv(max(lengths), block_t), len(grids))
    if launchable(tokens, op):
        # Unused outputs get a one-element stand-in, never an alias of another argument
        # (torch.compile's functionalization would treat an alias as a second output).
        norms_arg = torch.empty(1, dtype=torch.float32, device=device) if inv_norms is None else inv_norms
        pow2_arg = torch.empty(1, dtype=torch.float32, device=device) if pow2s is None else pow2s
        best_arg = torch.empty(1, dtype=torch.int64, device=device) if cell_best is None else cell_best
        with launch_guard(tokens):
            launch(_score_kernel)[grid](
                tokens, anchors, table, scores, cells, norms_arg, pow2_arg, best_arg,
                padded_width(dim), tokens.stride(0), anchors.stride(0), BLOCK_T=block_t, BLOCK_D=block_d,
                WRITE_NORMS=inv_norms is not None, CELL_BEST=cell_best is not None, num_warps=4,
            )
    return scores, cells, inv_norms, cell_best


@triton_op("g2tr::triton_anchor_scores", mutates_args=())
def triton_anchor_scores(
    tokens: torch.Tensor, anchors: torch.Tensor, grids: List[int], anchor_grids: List[int]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """torch.ops.g2tr.triton_anchor_scores: same contract as torch.ops.g2tr.anchor_scores."""
    op = "g2tr.triton_anchor_scores"
    grids, anchor_grids = _checks.anchor_scores_args(op, tokens, anchors, grids, anchor_grids)
    scores, cells, _, _ = score(tokens, anchors, grids, anchor_grids, op=op)
    return scores, cells
