"""Loads g2tr_kernels._C, which registers torch.ops.g2tr, then the records' fake kernels and gradients.

A failed load does not break `import g2tr_kernels`: the reference backend still works,
and asking for a native backend raises with the load error (no silent fallback).
"""
from __future__ import annotations

import functools
from typing import Optional

try:
    from . import _C  # noqa: F401  (registers torch.ops.g2tr)

    LOAD_ERROR: Optional[BaseException] = None
except ImportError as error:  # not built, or built against another torch
    _C = None
    LOAD_ERROR = error

if _C is not None:
    from . import _registry  # noqa: E402

    _registry.register()


def loaded() -> bool:
    return _C is not None


def require(backend: str) -> None:
    if _C is None:
        raise RuntimeError(
            f"g2tr_kernels: backend {backend!r} needs the compiled extension g2tr_kernels._C, which did not load "
            f"({LOAD_ERROR}). Build it with `pip install --no-build-isolation -e .`, or pass backend='reference'."
        )


@functools.lru_cache(maxsize=None)
def compiled_backends() -> frozenset:
    """The backends this build compiled ("cpu", "cuda"), read once: routing asks on every call."""
    require("build_info")
    return frozenset(_C.build_info()["backends"])


def build_info() -> dict:
    """Version, compiled backends (cpu, cuda and its archs), OpenMP threads, CPU merge path."""
    require("build_info")
    return dict(_C.build_info())
