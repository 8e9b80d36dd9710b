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

g2tr_kernels.ops calls the ops themselves for backend="triton" (_registry.py OpRecord.kernel).
"""
from __future__ import annotations

try:
    import triton  # noqa: F401

    IMPORT_ERROR = None
except ImportError as error:  # triton is optional
    IMPORT_ERROR = error

if IMPORT_ERROR is None:
    import importlib

    from .. import _registry

    for _name in _registry.NAMES:  # importing triton/<op>.py registers torch.ops.g2tr.triton_<op>
        importlib.import_module(f".{_name}", __name__)
    _registry.register_gradients("triton_")  # the Triton ops share the native ops' schemas and gradients


def require() -> None:
    """Raises a RuntimeError saying why the Triton backend cannot run here."""
    if IMPORT_ERROR is not None:
        raise RuntimeError(
            f"g2tr_kernels: backend 'triton' needs the triton package, which did not import ({IMPORT_ERROR})"
        )


__all__ = ["require"]
