"""g2tr_kernels: fast, exact G2TR visual token reduction for PyTorch.

    import g2tr_kernels as g2tr
    out = g2tr.reduce(tokens, anchors, grids=[(70, 70)], anchor_grids=[(32, 32)])
    out.merged, out.keep_idx, out.cu_seqlens, out.scores, out.assign

The ops are torch.ops.g2tr.{reduce, anchor_scores, balanced_topk, merge}.
"""
from . import ops, reference
from ._native import build_info
from .ops import *  # noqa: F403  (the public functions: ops.__all__)
from .version import __version__

__all__ = ["__version__", "build_info", "reference"]
__all__ += ops.__all__
