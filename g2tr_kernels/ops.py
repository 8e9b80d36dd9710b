"""The Python API: normalise the arguments, pick the backend, call the op. No algorithm
and no argument checks live here: each op checks its arguments once, where it runs (the
native ops in C++, the reference path and the Triton ops in _checks.py); the per-op
records in _registry.py say how to call each backend.

backend:
  "auto"      CPU tensors -> "cpu" (C++ kernels). CUDA tensors -> "cuda" when compiled, else "triton".
  "reference" the readable pure-PyTorch path (g2tr_kernels/reference), any device.
  "cpu"       torch.ops.g2tr on CPU tensors.
  "cuda"      torch.ops.g2tr on CUDA tensors (CUDA C++ kernels).
  "triton"    Triton kernels; on CPU tensors they run under TRITON_INTERPRET=1 (tests).
A backend that cannot run raises; none falls back to another in silence.
"""
from __future__ import annotations

from typing import List, NamedTuple, Sequence, Union

import torch

from . import _checks, _native
from ._registry import BACKENDS, BY_NAME
from .reference.budget import budget

# What `import g2tr_kernels` exports (g2tr_kernels/__init__.py takes this list as it is).
__all__ = ["ReduceOutput", "anchor_scores", "balanced_topk", "budgets", "merge", "reduce", "reduce_padded"]


class ReduceOutput(NamedTuple):
    merged: torch.Tensor  # [K_total, D], input dtype
    keep_idx: torch.Tensor  # [K_total] int64, packed token indices, ascending
    cu_seqlens: torch.Tensor  # [B + 1] int32, offsets of each image's kept rows
    scores: torch.Tensor  # [N] fp32, cosine with the anchor of the token's cell
    assign: torch.Tensor  # [N] int64, output row each token went into


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cpu":
            backend = "cpu"
        elif device.type == "cuda":
            # A failed native load is an error (compiled_backends raises), not a reason to pick Triton.
            backend = "cuda" if "cuda" in _native.compiled_backends() else "triton"
        else:
            raise ValueError(f"backend='auto' has no kernels for device {device}; pass backend='reference'")
    if backend in ("cpu", "cuda"):
        _native.require(backend)
        if device.type != backend:
            raise ValueError(f"backend={backend!r} needs {backend} tensors, got tensors on {device}")
        if backend == "cuda" and "cuda" not in _native.compiled_backends():
            raise RuntimeError("backend='cuda': this build of g2tr_kernels has no CUDA kernels (G2TR_BUILD_CUDA=1)")
    if backend == "triton":
        from . import triton as _triton  # imported lazily: triton is optional

        _triton.require()
    return backend


def _call(name: str, backend: str, args: tuple):
    """Runs op `name` on its schema arguments `args` with the backend the first tensor's device picks."""
    record = BY_NAME[name]
    first = args[0]
    if not isinstance(first, torch.Tensor):
        raise TypeError(f"{record.label}: {record.argument_names[0]} must be a tensor, got {type(first).__name__}")
    return record.kernel(resolve_backend(backend, first.device))(*args)


@_checks.api_errors
def budgets(lengths: Sequence[int], keep_ratio: float = 0.5, min_keep: int = 32) -> List[int]:
    """Per-image K: min(N, max(min_keep, round_half_even(N * keep_ratio)))."""
    op = "g2tr.budgets"
    _checks.ratio(op, keep_ratio, min_keep)
    return [budget(_checks.as_int(op, f"lengths[{b}]", n), keep_ratio, min_keep) for b, n in enumerate(lengths)]


@_checks.api_errors
def reduce(
    tokens: torch.Tensor,
    anchors: torch.Tensor,
    grids,
    anchor_grids,
    keep_ratio: float = 0.5,
    min_keep: int = 32,
    merge_weight: float = 1.0,
    backend: str = "auto",
    check_finite: bool = False,
) -> ReduceOutput:
    """G2TR on a packed batch: tokens [N, D] and anchors [M, D] of B images, packed in order.

    grids / anchor_grids: ViT and anchor grid of each image, as [(h, w), ...] or
    [h0, w0, h1, w1, ...] (host ints). Keeps K_b = min(N_b, max(min_keep,
    round_half_even(N_b * keep_ratio))) tokens of image b: one seed per anchor cell,
    then the best of the rest; merges every dropped token into its most similar kept
    token of the same image. check_finite=True raises on NaN/Inf (reads the data).
    """
    args = BY_NAME["reduce"].normalise(tokens, anchors, grids, anchor_grids, keep_ratio, min_keep, merge_weight)
    if check_finite:
        # Reads the data (a sync), so it is opt-in; the grids are checked first so that it reads valid rows.
        g, a = _checks.reduce_args("g2tr.reduce", *args)
        _check_finite_images("g2tr.reduce", tokens, anchors, g, a)
    return ReduceOutput(*_call("reduce", backend, args))


@_checks.api_errors
def reduce_padded(
    tokens: torch.Tensor,
    anchors: torch.Tensor,
    grid,
    anchor_grid,
    keep_ratio: float = 0.5,
    min_keep: int = 32,
    merge_weight: float = 1.0,
    backend: str = "auto",
    check_finite: bool = False,
) -> ReduceOutput:
    """G2TR on a padded batch of same-size images: tokens [B, N, D], anchors [B, M, D].

    grid = (h, w) with h * w = N and anchor_grid = (h_a, w_a) with h_a * w_a = M, for all
    images. Returns merged [B, K, D], keep_idx [B, K] and assign [B, N] with indices local
    to each image, scores [B, N], cu_seqlens [B + 1].
    """
    op = "g2tr.reduce_padded"
    for name, t in (("tokens", tokens), ("anchors", anchors)):
        _checks.float_tensor(op, name, t, 3)
    if anchors.shape[0] != tokens.shape[0]:
        raise ValueError(f"{op}: anchors hold {anchors.shape[0]} images but tokens hold {tokens.shape[0]}")
    (h, w), (h_a, w_a) = (_one_pair(op, name, g) for name, g in (("grid", grid), ("anchor_grid", anchor_grid)))
    b, n, d = tokens.shape
    out = reduce(
        tokens.reshape(b * n, d), anchors.reshape(b * anchors.shape[1], anchors.shape[2]),
        [(h, w)] * b, [(h_a, w_a)] * b,
        keep_ratio, min_keep, merge_weight, backend, check_finite,
    )
    k = budget(n, keep_ratio, min_keep)
    image = torch.arange(b, device=tokens.device)[:, None]
    return ReduceOutput(
        merged=out.merged.reshape(b, k, d),
        keep_idx=out.keep_idx.reshape(b, k) - image * n,
        cu_seqlens=out.cu_seqlens,
        scores=out.scores.reshape(b, n),
        assign=out.assign.reshape(b, n) - image * k,
    )


@_checks.api_errors
def anchor_scores(tokens, anchors, grids, anchor_grids, backend: str = "auto"):
    """Stage III score: (scores fp32 [N], cells int64 [N], local cell id of each token)."""
    return _call("anchor_scores", backend, BY_NAME["anchor_scores"].normalise(tokens, anchors, grids, anchor_grids))


@_checks.api_errors
def balanced_topk(
    scores: torch.Tensor,
    cells: torch.Tensor,
    lengths: Sequence[int],
    budgets: Sequence[int],
    cell_counts: Sequence[int],
    quota: Union[int, Sequence[int], str] = 1,
    backend: str = "auto",
) -> torch.Tensor:
    """Stage III select with any fp32 score ("bring your own score").

    Per image b (lengths[b] tokens, local cell ids in [0, cell_counts[b])): walk tokens
    in descending score order (ties: lower index), take one while its cell holds fewer
    than quota[b] taken tokens, until budgets[b]; then fill with the best of the rest.
    quota=1 is G2TR (one seed per cell); quota="window" is W-FastV's window quota
    ceil(budgets[b] / cell_counts[b]). Cell ids outside the range only take part in the
    fill. Returns global kept indices (int64), ascending.
    """
    args = BY_NAME["balanced_topk"].normalise(scores, cells, lengths, budgets, cell_counts, quota)
    return _call("balanced_topk", backend, args)


@_checks.api_errors
def merge(
    tokens: torch.Tensor,
    keep_idx: torch.Tensor,
    lengths: Sequence[int],
    budgets: Sequence[int],
    merge_weight: float = 1.0,
    backend: str = "auto",
):
    """Stage IV for any keep set: (merged [sum(budgets), D], assign int64 [N]).

    keep_idx: global indices, strictly ascending within each image, budgets[b] of them
    for image b. Each dropped token joins the kept token of its image with the highest
    cosine (ties: lower index); merged = (merge_weight * v_k + sum v_j) / (merge_weight + n_k).
    """
    return _call("merge", backend, BY_NAME["merge"].normalise(tokens, keep_idx, lengths, budgets, merge_weight))


def _one_pair(op: str, name: str, grid):
    pairs = _checks.grid_pairs(op, name, grid)
    if len(pairs) != 1:
        raise ValueError(f"{op}: {name} must be one (h, w) pair shared by every image, got {len(pairs)} pairs")
    return pairs[0]


def _check_finite_images(op, tokens, anchors, grids, anchor_grids) -> None:
    begins, start = [], 0
    for h, w in grids:
        begins.append(start)
        start += h * w
    _checks.finite(op, "tokens", tokens, begins)
    begins, start = [], 0
    for h, w in anchor_grids:
        begins.append(start)
        start += h * w
    _checks.finite(op, "anchors", anchors, begins)
