"""G2TR token reduction, the whole algorithm in plain PyTorch: the oracle of the tests.

tokens [N, D] of B images packed in order (image b has h_b * w_b tokens in raster order),
anchors [M, D] packed likewise (h_a * w_a per image).
  1. score each token against the anchor of its cell        (anchor_scores.py)
  2. keep K_b tokens per image: one seed per cell, then fill  (balanced_topk.py)
  3. merge each dropped token into its nearest kept token     (merge.py)
"""
from __future__ import annotations

import torch

from .anchor_scores import anchor_scores
from .balanced_topk import balanced_topk
from .budget import budget
from .merge import merge


def reduce(tokens, anchors, grids, anchor_grids, keep_ratio=0.5, min_keep=32, merge_weight=1.0):
    """grids / anchor_grids: lists of (h, w) pairs. Returns the five outputs of SPEC.md §6."""
    lengths = [h * w for h, w in grids]
    budgets = [budget(n, keep_ratio, min_keep) for n in lengths]
    cell_counts = [h * w for h, w in anchor_grids]
    scores, cells = anchor_scores(tokens, anchors, grids, anchor_grids)
    keep_idx = balanced_topk(scores, cells, lengths, budgets, cell_counts, [1] * len(lengths))
    merged, assign = merge(tokens, keep_idx, lengths, budgets, merge_weight)
    cu_seqlens = torch.zeros(len(budgets) + 1, dtype=torch.int32, device=tokens.device)
    if budgets:
        cu_seqlens[1:] = torch.cumsum(torch.tensor(budgets, dtype=torch.int32, device=tokens.device), 0)
    return merged, keep_idx, cu_seqlens, scores, assign
