"""Stage III select in Triton, as rank-by-counting over packed int64 keys.

The rule is SPEC.md §3 (docs/SPEC.md) as g2tr_kernels/reference/balanced_topk.py walks
it. Said without a walk, with "j before i" meaning rank_key(j) > rank_key(i):

    seed(i) = cell(i) in range and #{j before i in the same cell} < quota
    take(i) = #{seeds j before i} < K                       if seed(i)
              #seeds + #{non-seeds j before i} < K          otherwise

Every count is a sum of integer comparisons, so the result is exact and deterministic on
every device. Three launches, each over (token blocks x images) of the packed batch:

1. _seed_kernel: seed flags. With the per-cell best from the score kernel (quota 1) a
   token is a seed iff its key is its cell's max; otherwise count the same-cell tokens
   ranked before it.
2. _take_kernel: take flags, counting the seeds and non-seeds ranked before each token.
3. _compact_kernel: kept indices in ascending order (prefix sums of the flags).

Why counting and not tl.sort: each program compares a block of tokens against the whole
image, so one large image still spreads over many programs, and there is no size limit:
any N works, with O(N^2) integer comparisons per image (24M per pass for a 70 x 70
image, shared by 77 programs). tl.sort would need the whole image in one program, and
under the Triton interpreter a 2048-element tl.sort takes seconds.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .. import _checks
from ._common import count_blocks, image_table, launch, launch_guard, launchable, rank_key, starts

# The select kernels read one int64 row per image (_image_row):
# tok_begin, n, k, keep_begin, cell_count, quota, cell_begin.


@triton.jit
def _keys(scores, tok_begin, local, n):
    """(live, rank_key) of the image's tokens `local`: the key ranks by score, then local index."""
    live = local < n
    return live, rank_key(tl.load(scores + tok_begin + local, mask=live, other=0.0), local)


@triton.jit
def _image_row(table, image):
    row = table + image * 7
    return (
        tl.load(row + 0), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3),
        tl.load(row + 4), tl.load(row + 5), tl.load(row + 6),
    )


@triton.jit
def _seed_kernel(
    scores,  # fp32 [N]
    cells,  # int64 [N], local cell ids
    cell_best,  # int64 [total cells]: each cell's max rank_key (CELL_BEST only)
    table,  # int64 [B, 7]
    seed,  # int8 [N] out
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    CELL_BEST: tl.constexpr,
):
    block = tl.program_id(0)
    image = tl.program_id(1)
    tok_begin, n, k, keep_begin, cell_count, quota, cell_begin = _image_row(table, image)
    if block * BLOCK_I >= n:
        return  # grid dim 0 covers the longest image
    i = block * BLOCK_I + tl.arange(0, BLOCK_I)
    live_i, key_i = _keys(scores, tok_begin, i, n)
    cell_i = tl.load(cells + tok_begin + i, mask=live_i, other=-1)
    valid_i = live_i & (cell_i >= 0) & (cell_i < cell_count)
    if CELL_BEST:
        # Quota 1: the seed of a cell is its best token, whose key is the cell's max.
        best = tl.load(cell_best + cell_begin + cell_i, mask=valid_i, other=0)
        is_seed = valid_i & (key_i == best)
    else:
        ahead = tl.zeros([BLOCK_I], dtype=tl.int32)  # same-cell tokens ranked before i
        for j0 in range(0, n, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            live_j, key_j = _keys(scores, tok_begin, j, n)
            cell_j = tl.load(cells + tok_begin + j, mask=live_j, other=-1)
            before = live_j[None, :] & (cell_j[None, :] == cell_i[:, None]) & (key_j[None, :] > key_i[:, None])
            ahead += tl.sum(before.to(tl.int32), axis=1)
        is_seed = valid_i & (ahead < quota)
    tl.store(seed + tok_begin + i, is_seed.to(tl.int8), mask=live_i)


@triton.jit
def _take_kernel(
    scores,  # fp32 [N]
    seed,  # int8 [N], from _seed_kernel
    table,  # int64 [B, 7]
    take,  # int8 [N] out
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    block = tl.program_id(0)
    image = tl.program_id(1)
    tok_begin, n, k, keep_begin, cell_count, quota, cell_begin = _image_row(table, image)
    if block * BLOCK_I >= n:
        return
    i = block * BLOCK_I + tl.arange(0, BLOCK_I)
    live_i, key_i = _keys(scores, tok_begin, i, n)
    seed_i = tl.load(seed + tok_begin + i, mask=live_i, other=0) != 0

    seeds_before = tl.zeros([BLOCK_I], dtype=tl.int32)
    others_before = tl.zeros([BLOCK_I], dtype=tl.int32)
    num_seeds = tl.zeros([BLOCK_J], dtype=tl.int32)
    for j0 in range(0, n, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        live_j, key_j = _keys(scores, tok_begin, j, n)
        seed_j = tl.load(seed + tok_begin + j, mask=live_j, other=0) != 0
        before = live_j[None, :] & (key_j[None, :] > key_i[:, None])
        seeds_before += tl.sum((before & seed_j[None, :]).to(tl.int32), axis=1)
        others_before += tl.sum((before & ~seed_j[None, :]).to(tl.int32), axis=1)
        num_seeds += seed_j.to(tl.int32)
    total_seeds = tl.sum(num_seeds, axis=0)
    # Seeds go first in score order, then everything else in score order; the first K stay.
    taken = live_i & tl.where(seed_i, seeds_before < k, total_seeds + others_before < k)
    tl.store(take + tok_begin + i, taken.to(tl.int8), mask=live_i)


@triton.jit
def _compact_kernel(
    take,  # int8 [N]
    table,  # int64 [B, 7]
    keep_idx,  # int64 [K_total] out
    BLOCK_I: tl.constexpr,
):
    block = tl.program_id(0)
    image = tl.program_id(1)
    tok_begin, n, k, keep_begin, cell_count, quota, cell_begin = _image_row(table, image)
    if block * BLOCK_I >= n:
        return
    # Kept tokens in earlier blocks of the image come first: ascending token order.
    earlier = tl.zeros([BLOCK_I], dtype=tl.int32)
    for j0 in range(0, block * BLOCK_I, BLOCK_I):
        earlier += tl.load(take + tok_begin + j0 + tl.arange(0, BLOCK_I)).to(tl.int32)
    i = block * BLOCK_I + tl.arange(0, BLOCK_I)
    live_i = i < n
    flag = tl.load(take + tok_begin + i, mask=live_i, other=0).to(tl.int32)
    out = tl.sum(earlier, axis=0) + tl.cumsum(flag, 0) - flag
    tl.store(keep_idx + keep_begin + out, tok_begin + i, mask=(flag != 0) & (out < k))


def select(
    scores: torch.Tensor,
    cells: torch.Tensor,
    lengths: Sequence[int],
    budgets: Sequence[int],
    cell_counts: Sequence[int],
    quotas: Sequence[int],
    cell_best: Optional[torch.Tensor] = None,
    op: str = "g2tr.triton_balanced_topk",
) -> torch.Tensor:
    """Launcher: global kept indices (int64 [sum(budgets)]), ascending within each image.

    cell_best: int64 [sum(cell_counts)], each cell's max rank_key (the score kernel's);
    given, every quota must be 1 and seeds need no counting.
    """
    lengths, budgets = list(lengths), list(budgets)
    device = scores.device
    keep_idx = torch.empty(sum(budgets), dtype=torch.int64, device=device)
    if not lengths:
        return keep_idx
    if cell_best is not None and any(q != 1 for q in quotas):
        raise ValueError(f"{op}: the per-cell best decides seeds only when every quota is 1")
    table = image_table(
        (starts(lengths), lengths, budgets, starts(budgets), cell_counts, quotas, starts(cell_counts)), scores
    )
    scores, cells = scores.contiguous(), cells.contiguous()
    seed = torch.empty(scores.shape[0], dtype=torch.int8, device=device)
    take = torch.empty(scores.shape[0], dtype=torch.int8, device=device)
    if not launchable(scores, op):
        return keep_idx
    block_i, block_j = count_blocks()
    grid = (triton.cdiv(max(lengths), block_i), len(lengths))
    with launch_guard(scores):
        launch(_seed_kernel)[grid](
            scores, cells, cell_best if cell_best is not None else torch.empty(1, dtype=torch.int64, device=device),
            table, seed,
            BLOCK_I=block_i, BLOCK_J=block_j, CELL_BEST=cell_best is not None,
        )
        launch(_take_kernel)[grid](scores, seed, table, take, BLOCK_I=block_i, BLOCK_J=block_j)
        launch(_compact_kernel)[grid](take, table, keep_idx, BLOCK_I=block_i)
    return keep_idx


@triton_op("g2tr::triton_balanced_topk", mutates_args=())
def triton_balanced_topk(
    scores: torch.Tensor,
    cells: torch.Tensor,
    lengths: List[int],
    budgets: List[int],
    cell_counts: List[int],
    cell_quotas: List[int],
) -> torch.Tensor:
    """torch.ops.g2tr.triton_balanced_topk: same contract as torch.ops.g2tr.balanced_topk."""
    op = "g2tr.triton_balanced_topk"
    lengths, budgets, cell_counts, cell_quotas = _checks.balanced_topk_args(
        op, scores, cells, lengths, budgets, cell_counts, cell_quotas
    )
    return select(scores, cells, lengths, budgets, cell_counts, cell_quotas, op=op)
