"""Gradients of torch.ops.g2tr (the ops are for inference, but must not fail silently).

Selection and assignment are discrete, so they are held fixed: the gradient flows
through the merged rows (a weighted mean of tokens) and through the scores (a cosine of
tokens and anchors). Both are recomputed here with differentiable PyTorch from the saved
keep set and assignment, so the formulas are PyTorch's own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference.anchor_scores import NORM_EPS
from .reference.budget import cell_ids


def _anchor_rows(grids, anchor_grids, device):
    """Packed anchor row of every token (host grids -> device indices)."""
    rows, a0 = [], 0
    for b in range(0, len(grids), 2):
        h, w, h_a, w_a = grids[b], grids[b + 1], anchor_grids[b], anchor_grids[b + 1]
        rows.append(cell_ids(h, w, h_a, w_a, device=device) + a0)
        a0 += h_a * w_a
    return torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64, device=device)


def _scores_grads(grad_scores, tokens, anchors, anchor_rows):
    with torch.enable_grad():
        v = tokens.detach().float().requires_grad_(True)
        a = anchors.detach().float().requires_grad_(True)
        s = (F.normalize(v, dim=-1, eps=NORM_EPS) * F.normalize(a, dim=-1, eps=NORM_EPS)[anchor_rows]).sum(-1)
        grad_v, grad_a = torch.autograd.grad(s, (v, a), grad_scores.float())
    return grad_v, grad_a


def _merged_grad(grad_merged, tokens, keep_idx, assign, merge_weight):
    """merged[r] = (w * v_k + sum_{j -> r} v_j) / (w + n_r), with assign fixed."""
    n = tokens.shape[0]
    weight = torch.ones(n, dtype=torch.float32, device=tokens.device)
    weight[keep_idx] = merge_weight
    denom = torch.zeros(grad_merged.shape[0], dtype=torch.float32, device=tokens.device)
    denom.index_add_(0, assign, weight)
    return grad_merged.float()[assign] * (weight / denom[assign])[:, None]


def setup_reduce(ctx, inputs, output):
    tokens, anchors, grids, anchor_grids, _, _, merge_weight = inputs
    _, keep_idx, _, _, assign = output
    ctx.save_for_backward(tokens, anchors, keep_idx, assign)
    ctx.grids, ctx.anchor_grids, ctx.merge_weight = list(grids), list(anchor_grids), merge_weight


def backward_reduce(ctx, grad_merged, _keep, _cu, grad_scores, _assign):
    tokens, anchors, keep_idx, assign = ctx.saved_tensors
    grad_tokens = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
    grad_anchors = None
    if grad_merged is not None:
        grad_tokens += _merged_grad(grad_merged, tokens, keep_idx, assign, ctx.merge_weight)
    if grad_scores is not None:
        rows = _anchor_rows(ctx.grids, ctx.anchor_grids, tokens.device)
        grad_v, grad_a = _scores_grads(grad_scores, tokens, anchors, rows)
        grad_tokens += grad_v
        grad_anchors = grad_a.to(anchors.dtype)
    return grad_tokens.to(tokens.dtype), grad_anchors, None, None, None, None, None


def setup_merge(ctx, inputs, output):
    tokens, keep_idx, _, _, merge_weight = inputs
    _, assign = output
    ctx.save_for_backward(tokens, keep_idx, assign)
    ctx.merge_weight = merge_weight


def backward_merge(ctx, grad_merged, _assign):
    tokens, keep_idx, assign = ctx.saved_tensors
    grad = _merged_grad(grad_merged, tokens, keep_idx, assign, ctx.merge_weight) if grad_merged is not None else None
    return (grad.to(tokens.dtype) if grad is not None else None), None, None, None, None


def setup_anchor_scores(ctx, inputs, output):
    tokens, anchors, grids, anchor_grids = inputs
    ctx.save_for_backward(tokens, anchors)
    ctx.grids, ctx.anchor_grids = list(grids), list(anchor_grids)


def backward_anchor_scores(ctx, grad_scores, _cells):
    tokens, anchors = ctx.saved_tensors
    if grad_scores is None:
        return None, None, None, None
    rows = _anchor_rows(ctx.grids, ctx.anchor_grids, tokens.device)
    grad_v, grad_a = _scores_grads(grad_scores, tokens, anchors, rows)
    return grad_v.to(tokens.dtype), grad_a.to(anchors.dtype), None, None


def register(prefix: str = "") -> None:
    """Registers the gradients the records list (_registry.py) for g2tr::{prefix}<op>: the
    native ops with prefix "", the Triton ops, which share their schemas, with "triton_"."""
    from ._registry import OPS  # the registry imports this module

    for record in OPS:
        if record.backward is not None:
            torch.library.register_autograd(
                f"g2tr::{prefix}{record.name}", record.backward, setup_context=record.setup_context
            )
