"""The whole G2TR reduction in Triton: score (+ per-cell best, + token norms), select, merge.

Eight launches for the whole packed batch, whatever the number of images: _score_kernel;
the three select kernels (seeds straight from the per-cell best the score kernel folded
in, so no per-cell counting); the four merge kernels, reusing the score kernel's inverse
norms. Output sizes come from the host-side grids only; nothing reads device memory on
the host.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch.library import triton_op

from .. import _checks
from ..reference.budget import budget
from ._common import aligned_rows, fresh_table, starts
from .anchor_scores import score
from .balanced_topk import select
from .merge import merge_tokens


def reduce_tokens(
    tokens: torch.Tensor,
    anchors: torch.Tensor,
    grids: List[Tuple[int, int]],
    anchor_grids: List[Tuple[int, int]],
    keep_ratio: float,
    min_keep: int,
    merge_weight: float,
    op: str = "g2tr.triton_reduce",
):
    """Launcher: (merged, keep_idx, cu_seqlens, scores, assign), SPEC.md §6."""
    tokens, anchors = aligned_rows(tokens), aligned_rows(anchors)  # one copy, if any, for all stages
    lengths = [h * w for h, w in grids]
    budgets = [budget(n, keep_ratio, min_keep) for n in lengths]
    cell_counts = [h * w for h, w in anchor_grids]
    scores, cells, inv_norms, cell_best = score(tokens, anchors, grids, anchor_grids, True, True, op)
    keep_idx = select(scores, cells, lengths, budgets, cell_counts, [1] * len(lengths), cell_best, op)
    merged, assign = merge_tokens(tokens, keep_idx, lengths, budgets, merge_weight, inv_norms, op=op)
    cu_seqlens = fresh_table(starts(budgets), tokens, torch.int32)
    return merged, keep_idx, cu_seqlens, scores, assign


@triton_op("g2tr::triton_reduce", mutates_args=())
def triton_reduce(
    tokens: torch.Tensor,
    anchors: torch.Tensor,
    grids: List[int],
    anchor_grids: List[int],
    keep_ratio: float = 0.5,
    min_keep: int = 32,
    merge_weight: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.ops.g2tr.triton_reduce: same contract as torch.ops.g2tr.reduce."""
    op = "g2tr.triton_reduce"
    grids, anchor_grids = _checks.reduce_args(op, tokens, anchors, grids, anchor_grids, keep_ratio, min_keep,
                                              merge_weight)
    return reduce_tokens(tokens, anchors, grids, anchor_grids, keep_ratio, min_keep, merge_weight, op)
