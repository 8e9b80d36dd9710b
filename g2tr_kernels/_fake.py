"""Fake (meta) kernels of torch.ops.g2tr for torch.compile and opcheck.

Output sizes come from the host-side int lists only, as in the real kernels. Each fake
kernel runs its op's Python checker (_checks.py), so on meta and fake tensors the same
bad input is refused as by the real kernel (under torch.compile as the ValueError /
TypeError subclasses that dynamo lets through: _checks.surfaced_under_compile).
_registry.py lists them per op.
"""
from __future__ import annotations

import torch

from . import _checks
from .reference.budget import budget


def anchor_scores(tokens, anchors, grids, anchor_grids):
    _checks.anchor_scores_args("g2tr.anchor_scores", tokens, anchors, grids, anchor_grids)
    n = tokens.shape[0]
    return tokens.new_empty(n, dtype=torch.float32), tokens.new_empty(n, dtype=torch.int64)


def balanced_topk(scores, cells, lengths, budgets, cell_counts, cell_quotas):
    _, budgets, _, _ = _checks.balanced_topk_args(
        "g2tr.balanced_topk", scores, cells, lengths, budgets, cell_counts, cell_quotas
    )
    return scores.new_empty(sum(budgets), dtype=torch.int64)


def merge(tokens, keep_idx, lengths, budgets, merge_weight=1.0):
    _, budgets = _checks.merge_args("g2tr.merge", tokens, keep_idx, lengths, budgets, merge_weight)
    return tokens.new_empty(sum(budgets), tokens.shape[1]), tokens.new_empty(tokens.shape[0], dtype=torch.int64)


def reduce(tokens, anchors, grids, anchor_grids, keep_ratio=0.5, min_keep=32, merge_weight=1.0):
    pairs, _ = _checks.reduce_args("g2tr.reduce", tokens, anchors, grids, anchor_grids, keep_ratio, min_keep,
                                   merge_weight)
    k = sum(budget(h * w, keep_ratio, min_keep) for h, w in pairs)
    n = tokens.shape[0]
    return (
        tokens.new_empty(k, tokens.shape[1]),
        tokens.new_empty(k, dtype=torch.int64),
        tokens.new_empty(len(pairs) + 1, dtype=torch.int32),
        tokens.new_empty(n, dtype=torch.float32),
        tokens.new_empty(n, dtype=torch.int64),
    )


def register() -> None:
    """Registers every record's fake kernel for its native op (the Triton ops get theirs
    from torch.library.triton_op)."""
    from ._registry import OPS  # the registry imports this module

    for record in OPS:
        torch.library.register_fake(record.qualname)(_checks.surfaced_under_compile(record.fake))
