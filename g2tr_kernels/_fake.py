"""Fake (meta) kernels of torch.ops.g2tr for torch.compile and opcheck.

Output sizes come from the host-side int lists only, as in the real kernels.
"""
from __future__ import annotations

import torch

from . import _checks
from .reference.budget import budget


@torch.library.register_fake("g2tr::anchor_scores")
def _anchor_scores_fake(tokens, anchors, grids, anchor_grids):
    _checks.images("g2tr.anchor_scores", tokens, anchors, grids, anchor_grids)
    n = tokens.shape[0]
    return tokens.new_empty(n, dtype=torch.float32), tokens.new_empty(n, dtype=torch.int64)


@torch.library.register_fake("g2tr::balanced_topk")
def _balanced_topk_fake(scores, cells, lengths, budgets, cell_counts, cell_quotas):
    _, budgets, _, _ = _checks.balanced_topk_args(
        "g2tr.balanced_topk", scores, cells, lengths, budgets, cell_counts, cell_quotas
    )
    return scores.new_empty(sum(budgets), dtype=torch.int64)


@torch.library.register_fake("g2tr::merge")
def _merge_fake(tokens, keep_idx, lengths, budgets, merge_weight=1.0):
    _, budgets = _checks.merge_args("g2tr.merge", tokens, keep_idx, lengths, budgets, merge_weight)
    return tokens.new_empty(sum(budgets), tokens.shape[1]), tokens.new_empty(tokens.shape[0], dtype=torch.int64)


@torch.library.register_fake("g2tr::reduce")
def _reduce_fake(tokens, anchors, grids, anchor_grids, keep_ratio=0.5, min_keep=32, merge_weight=1.0):
    op = "g2tr.reduce"
    pairs, _ = _checks.images(op, tokens, anchors, grids, anchor_grids)
    _checks.ratio(op, keep_ratio, min_keep)
    _checks.merge_weight(op, merge_weight)
    k = sum(budget(h * w, keep_ratio, min_keep) for h, w in pairs)
    n = tokens.shape[0]
    return (
        tokens.new_empty(k, tokens.shape[1]),
        tokens.new_empty(k, dtype=torch.int64),
        tokens.new_empty(len(pairs) + 1, dtype=torch.int32),
        tokens.new_empty(n, dtype=torch.float32),
        tokens.new_empty(n, dtype=torch.int64),
    )
