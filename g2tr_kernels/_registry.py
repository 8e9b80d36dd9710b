"""One record per op of torch.ops.g2tr: the single description every layer that names the ops reads.

A record holds the op's stem (csrc/cpu/<name>.cpp, csrc/cuda/<name>.cu, triton/<name>.py,
reference/<name>.py, tests/test_<name>.py, benchmarks/bench_<name>.py), its schema as
csrc/ops.cpp defines it, the Python API's argument normaliser, the reference path (the op's
Python checker, then its reference function), the fake kernel and the gradient, each written
below in the op's own section; kernel() gives the native op (torch.ops.g2tr.<name>) or the
Triton op (torch.ops.g2tr.triton_<name>). From OPS:

  - ops.py routes every public call: normalise, pick the backend, call kernel(backend);
  - register() registers the fake kernels and gradients of the native ops (on load of
    g2tr_kernels._C), register_gradients("triton_") those of the Triton ops (same schemas);
  - triton/__init__.py imports triton/<name>.py for every record (which registers its op);
  - the tests take their op list (and tests/test_library.py the schemas) from here, and
    each op's sample and bad inputs from tests/test_<name>.py.

Validation happens once per call, where the op runs: the native ops in C++ (checks.h), the
reference path, the Triton op bodies and the fake kernels through the op's one Python
checker (_checks.py: <op>_args). The normaliser only turns the API's forms into the
schema's (grid pairs into flat lists, numpy numbers into Python ones, "window" quotas into
ints); it rejects only what the schema cannot carry (tensors where host ints belong,
fractional ints). Fake kernels take their output sizes from the host-side int lists only,
as the real kernels do. Gradients hold the discrete choices (selection, assignment) fixed
and differentiate the rest with PyTorch's own formulas (_autograd.py).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Dict, Optional, Tuple

import torch

from . import _autograd, _checks, reference
from .reference.budget import budget

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")


@dataclasses.dataclass(frozen=True)
class OpRecord:
    name: str  # the stem in every layer; torch.ops.g2tr.<name>, torch.ops.g2tr.triton_<name>
    schema: str  # exactly as csrc/ops.cpp defines it (tests/test_library.py compares)
    normalise: Callable[..., tuple]  # API arguments -> the schema's positional arguments
    reference: Callable[..., object]  # schema arguments -> outputs: the op's Python checker, then reference/<name>.py
    fake: Callable[..., object]  # schema arguments -> empty outputs of the right sizes
    backward: Optional[Callable] = None  # torch.library.register_autograd's pair; None: not differentiable
    setup_context: Optional[Callable] = None

    @property
    def qualname(self) -> str:
        return f"g2tr::{self.name}"

    @functools.cached_property
    def argument_names(self) -> Tuple[str, ...]:
        return tuple(a.name for a in torch._C.parse_schema(self.qualname + self.schema[len(self.name):]).arguments)

    @property
    def label(self) -> str:
        """How error messages name the op."""
        return f"g2tr.{self.name}"

    def kernel(self, backend: str) -> Callable:
        """The callable of a resolved backend ("reference", "cpu", "cuda" or "triton")."""
        if backend == "reference":
            return self.reference
        prefix = "triton_" if backend == "triton" else ""  # cpu and cuda: the dispatcher picks by device
        return getattr(torch.ops.g2tr, prefix + self.name).default


# ---------------------------------------------------------------------------- anchor_scores


def _normalise_anchor_scores(tokens, anchors, grids, anchor_grids) -> tuple:
    op = "g2tr.anchor_scores"
    return tokens, anchors, _checks.flat_grid(op, "grids", grids), _checks.flat_grid(op, "anchor_grids", anchor_grids)


def _reference_anchor_scores(tokens, anchors, grids, anchor_grids):
    g, a = _checks.anchor_scores_args("g2tr.anchor_scores", tokens, anchors, grids, anchor_grids)
    return reference.anchor_scores(tokens, anchors, g, a)


def _fake_anchor_scores(tokens, anchors, grids, anchor_grids):
    _checks.anchor_scores_args("g2tr.anchor_scores", tokens, anchors, grids, anchor_grids)
    n = tokens.shape[0]
    return tokens.new_empty(n, dtype=torch.float32), tokens.new_empty(n, dtype=torch.int64)


def _setup_anchor_scores(ctx, inputs, output):
    tokens, anchors, grids, anchor_grids = inputs
    ctx.save_for_backward(tokens, anchors)
    ctx.grids, ctx.anchor_grids = list(grids), list(anchor_grids)


def _backward_anchor_scores(ctx, grad_scores, _cells):
    tokens, anchors = ctx.saved_tensors
    if grad_scores is None:
        return None, None, None, None
    grad_v, grad_a = _autograd.scores_grads(grad_scores, tokens, anchors, ctx.grids, ctx.anchor_grids)
    return grad_v.to(tokens.dtype), grad_a.to(anchors.dtype), None, None


ANCHOR_SCORES = OpRecord(
    name="anchor_scores",
    schema="anchor_scores(Tensor tokens, Tensor anchors, int[] grids, int[] anchor_grids) "
    "-> (Tensor scores, Tensor cells)",
    normalise=_normalise_anchor_scores,
    reference=_reference_anchor_scores,
    fake=_fake_anchor_scores,
    backward=_backward_anchor_scores,
    setup_context=_setup_anchor_scores,
)


# ---------------------------------------------------------------------------- balanced_topk


def _normalise_balanced_topk(scores, cells, lengths, budgets, cell_counts, quota=1) -> tuple:
    op = "g2tr.balanced_topk"
    budgets = _checks.int_list(op, "budgets", budgets)
    cell_counts = _checks.int_list(op, "cell_counts", cell_counts)
    return (scores, cells, _checks.int_list(op, "lengths", lengths), budgets, cell_counts,
            _checks.cell_quotas(op, quota, budgets, cell_counts))


def _reference_balanced_topk(scores, cells, lengths, budgets, cell_counts, cell_quotas):
    args = _checks.balanced_topk_args("g2tr.balanced_topk", scores, cells, lengths, budgets, cell_counts, cell_quotas)
    return reference.balanced_topk(scores, cells, *args)


def _fake_balanced_topk(scores, cells, lengths, budgets, cell_counts, cell_quotas):
    _, budgets, _, _ = _checks.balanced_topk_args(
        "g2tr.balanced_topk", scores, cells, lengths, budgets, cell_counts, cell_quotas
    )
    return scores.new_empty(sum(budgets), dtype=torch.int64)


BALANCED_TOPK = OpRecord(
    name="balanced_topk",
    schema="balanced_topk(Tensor scores, Tensor cells, int[] lengths, int[] budgets, int[] cell_counts, "
    "int[] cell_quotas) -> Tensor keep_idx",
    normalise=_normalise_balanced_topk,
    reference=_reference_balanced_topk,
    fake=_fake_balanced_topk,  # no gradient: the output is indices
)


# ---------------------------------------------------------------------------- merge


def _normalise_merge(tokens, keep_idx, lengths, budgets, merge_weight=1.0) -> tuple:
    op = "g2tr.merge"
    return (tokens, keep_idx, _checks.int_list(op, "lengths", lengths), _checks.int_list(op, "budgets", budgets),
            _checks.as_float(op, "merge_weight", merge_weight))


def _reference_merge(tokens, keep_idx, lengths, budgets, merge_weight=1.0):
    lengths, budgets = _checks.merge_args("g2tr.merge", tokens, keep_idx, lengths, budgets, merge_weight)
    return reference.merge(tokens, keep_idx, lengths, budgets, merge_weight)


def _fake_merge(tokens, keep_idx, lengths, budgets, merge_weight=1.0):
    _, budgets = _checks.merge_args("g2tr.merge", tokens, keep_idx, lengths, budgets, merge_weight)
    return tokens.new_empty(sum(budgets), tokens.shape[1]), tokens.new_empty(tokens.shape[0], dtype=torch.int64)


def _setup_merge(ctx, inputs, output):
    tokens, keep_idx, _, _, merge_weight = inputs
    _, assign = output
    ctx.save_for_backward(tokens, keep_idx, assign)
    ctx.merge_weight = merge_weight


def _backward_merge(ctx, grad_merged, _assign):
    tokens, keep_idx, assign = ctx.saved_tensors
    if grad_merged is None:
        return None, None, None, None, None
    grad = _autograd.merged_grad(grad_merged, tokens, keep_idx, assign, ctx.merge_weight)
    return grad.to(tokens.dtype), None, None, None, None


MERGE = OpRecord(
    name="merge",
    schema="merge(Tensor tokens, Tensor keep_idx, int[] lengths, int[] budgets, float merge_weight=1.0) "
    "-> (Tensor merged, Tensor assign)",
    normalise=_normalise_merge,
    reference=_reference_merge,
    fake=_fake_merge,
    backward=_backward_merge,
    setup_context=_setup_merge,
)


# ---------------------------------------------------------------------------- reduce


def _normalise_reduce(tokens, anchors, grids, anchor_grids, keep_ratio=0.5, min_keep=32, merge_weight=1.0) -> tuple:
    op = "g2tr.reduce"
    # Plain Python numbers: every backend computes K from the same double.
    return (tokens, anchors, _checks.flat_grid(op, "grids", grids), _checks.flat_grid(op, "anchor_grids", anchor_grids),
            _checks.as_float(op, "keep_ratio", keep_ratio), _checks.as_int(op, "min_keep", min_keep),
            _checks.as_float(op, "merge_weight", merge_weight))


def _reference_reduce(tokens, anchors, grids, anchor_grids, keep_ratio=0.5, min_keep=32, merge_weight=1.0):
    g, a = _checks.reduce_args("g2tr.reduce", tokens, anchors, grids, anchor_grids, keep_ratio, min_keep, merge_weight)
    return reference.reduce(tokens, anchors, g, a, keep_ratio, min_keep, merge_weight)


def _fake_reduce(tokens, anchors, grids, anchor_grids, keep_ratio=0.5, min_keep=32, merge_weight=1.0):
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


def _setup_reduce(ctx, inputs, output):
    tokens, anchors, grids, anchor_grids, _, _, merge_weight = inputs
    _, keep_idx, _, _, assign = output
    ctx.save_for_backward(tokens, anchors, keep_idx, assign)
    ctx.grids, ctx.anchor_grids, ctx.merge_weight = list(grids), list(anchor_grids), merge_weight


def _backward_reduce(ctx, grad_merged, _keep, _cu, grad_scores, _assign):
    tokens, anchors, keep_idx, assign = ctx.saved_tensors
    grad_tokens = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
    grad_anchors = None
    if grad_merged is not None:
        grad_tokens += _autograd.merged_grad(grad_merged, tokens, keep_idx, assign, ctx.merge_weight)
    if grad_scores is not None:
        grad_v, grad_a = _autograd.scores_grads(grad_scores, tokens, anchors, ctx.grids, ctx.anchor_grids)
        grad_tokens += grad_v
        grad_anchors = grad_a.to(anchors.dtype)
    return grad_tokens.to(tokens.dtype), grad_anchors, None, None, None, None, None


REDUCE = OpRecord(
    name="reduce",
    schema="reduce(Tensor tokens, Tensor anchors, int[] grids, int[] anchor_grids, float keep_ratio=0.5, "
    "int min_keep=32, float merge_weight=1.0) -> (Tensor merged, Tensor keep_idx, Tensor cu_seqlens, "
    "Tensor scores, Tensor assign)",
    normalise=_normalise_reduce,
    reference=_reference_reduce,
    fake=_fake_reduce,
    backward=_backward_reduce,
    setup_context=_setup_reduce,
)


# ---------------------------------------------------------------------------- the records

OPS: Tuple[OpRecord, ...] = (ANCHOR_SCORES, BALANCED_TOPK, MERGE, REDUCE)
BY_NAME: Dict[str, OpRecord] = {record.name: record for record in OPS}
NAMES: Tuple[str, ...] = tuple(BY_NAME)


def register_gradients(prefix: str = "") -> None:
    """Registers every record's gradient for g2tr::{prefix}<op>: the native ops with prefix "",
    the Triton ops, which share their schemas, with "triton_"."""
    for record in OPS:
        if record.backward is not None:
            torch.library.register_autograd(
                f"g2tr::{prefix}{record.name}", record.backward, setup_context=record.setup_context
            )


def register() -> None:
    """Registers the fake kernels and gradients of the native ops (the Triton ops get their
    fake kernels from torch.library.triton_op). A fake kernel's check errors reach the user
    of torch.compile as the project's own (_checks.surfaced_under_compile)."""
    for record in OPS:
        torch.library.register_fake(record.qualname)(_checks.surfaced_under_compile(record.fake))
    register_gradients()
