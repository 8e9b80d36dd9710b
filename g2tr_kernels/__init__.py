"""g2tr_kernels: fast, exact G2TR visual token reduction for PyTorch.

    import g2tr_kernels as g2tr
    out = g2tr.reduce(tokens, anchors, grids=[(70, 70)], anchor_grids=[(32, 32)])
    out.merged, out.keep_idx, out.cu_seqlens, out.scores, out.assign

The ops are torch.ops.g2tr.{reduce, anchor_scores, balanced_topk, merge}.
"""
from . import reference
from ._native import build_info
from .ops import ReduceOutput, anchor_scores, balanced_topk, budgets, merge, reduce, reduce_padded
from .version import __version__

__all__ = [
    "ReduceOutput",
    "__version__",
    "anchor_scores",
    "balanced_topk",
    "budgets",
    "build_info",
    "merge",
    "reduce",
    "reduce_padded",
    "reference",
]
