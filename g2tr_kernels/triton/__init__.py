"""Triton kernels of G2TR, as torch.library.triton_op ops that torch.compile can see into:

    torch.ops.g2tr.triton_anchor_scores   anchor_scores.py   score, cell id, norm, per-cell best
    torch.ops.g2tr.triton_balanced_topk   balanced_topk.py   seeds + fill, ranks by counting
    torch.ops.g2tr.triton_merge           merge.py           tiled dot + argmax, grouped mean
    torch.ops.g2tr.triton_reduce          reduce.py          all of it, eight launches per batch

Same contracts and results as torch.ops.g2tr.{anchor_scores, balanced_topk, merge, reduce}.
On CUDA tensors the kernels are launched through torch.library.wrap_triton. On other
devices they run under the Triton interpreter, which must be switched on before this
package is first imported (TRITON_INTERPRET=1: @triton.jit decides at decoration time);
that is how the CPU test suite runs them. Any image size works (selection and grouping
count ranks in blocks; see balanced_topk.py).

The functions below are what g2tr_kernels.ops calls for backend="triton"; grids come as
(h, w) pairs there and are flattened into the op schemas here.
"""
from __future__ import annotations

from typing import Sequence, Tuple

try:
    import triton  # noqa: F401

    IMPORT_ERROR = None
except ImportError as error:  # triton is optional
    IMPORT_ERROR = error

if IMPORT_ERROR is None:
    import torch

    # Importing the modules registers the ops. Their names are shadowed by the functions
    # below: reach a module as importlib.import_module("g2tr_kernels.triton.merge").
    from . import anchor_scores as _anchor_scores  # noqa: F401
    from . import balanced_topk as _balanced_topk  # noqa: F401
    from . import merge as _merge  # noqa: F401
    from . import reduce as _reduce  # noqa: F401
    from ._common import interpreted
    from .. import _autograd

    _autograd.register("triton_")  # the Triton ops share the native ops' schemas and gradients

Pairs = Sequence[Tuple[int, int]]


def require() -> None:
    """Raises a RuntimeError saying why the Triton backend cannot run here."""
    if IMPORT_ERROR is not None:
        raise RuntimeError(
            f"g2tr_kernels: backend 'triton' needs the triton package, which did not import ({IMPORT_ERROR})"
        )


def _require_device(op: str, t) -> None:
    require()
    if t.device.type != "cuda" and not interpreted():
        raise RuntimeError(
            f"{op}: backend='triton' on {t.device} tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before g2tr_kernels.triton is first imported, or pass CUDA tensors"
        )


def _flat(pairs: Pairs):
    return [int(v) for pair in pairs for v in pair]


def reduce(tokens, anchors, grids: Pairs, anchor_grids: Pairs, keep_ratio: float, min_keep: int, merge_weight: float):
    """(merged, keep_idx, cu_seqlens, scores, assign) via torch.ops.g2tr.triton_reduce."""
    _require_device("g2tr.reduce", tokens)
    return torch.ops.g2tr.triton_reduce(
        tokens, anchors, _flat(grids), _flat(anchor_grids), float(keep_ratio), int(min_keep), float(merge_weight)
    )


def anchor_scores(tokens, anchors, grids: Pairs, anchor_grids: Pairs):
    """(scores fp32 [N], cells int64 [N]) via torch.ops.g2tr.triton_anchor_scores."""
    _require_device("g2tr.anchor_scores", tokens)
    return torch.ops.g2tr.triton_anchor_scores(tokens, anchors, _flat(grids), _flat(anchor_grids))


def balanced_topk(scores, cells, lengths, budgets, cell_counts, quotas):
    """Global kept indices via torch.ops.g2tr.triton_balanced_topk."""
    _require_device("g2tr.balanced_topk", scores)
    return torch.ops.g2tr.triton_balanced_topk(
        scores, cells, list(lengths), list(budgets), list(cell_counts), list(quotas)
    )


def merge(tokens, keep_idx, lengths, budgets, merge_weight: float):
    """(merged, assign) via torch.ops.g2tr.triton_merge."""
    _require_device("g2tr.merge", tokens)
    return torch.ops.g2tr.triton_merge(tokens, keep_idx, list(lengths), list(budgets), float(merge_weight))


__all__ = ["anchor_scores", "balanced_topk", "merge", "reduce", "require"]
