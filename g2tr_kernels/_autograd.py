"""The gradient formulas of torch.ops.g2tr (the ops are for inference, but must not fail silently).

Selection and assignment are discrete, so they are held fixed: the gradient flows
through the merged rows (a weighted mean of tokens) and through the scores (a cosine of
tokens and anchors). Both are recomputed here with differentiable PyTorch from the saved
keep set and assignment, so the formulas are PyTorch's own. Each op's backward and
setup_context, which call these, sit with its record in _registry.py.
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


def scores_grads(grad_scores, tokens, anchors, grids, anchor_grids):
    """(d tokens, d anchors) in fp32 of scores[i] = cos(tokens[i], anchor of i's cell); flat grids."""
    anchor_rows = _anchor_rows(grids, anchor_grids, tokens.device)
    with torch.enable_grad():
        v = tokens.detach().float().requires_grad_(True)
        a = anchors.detach().float().requires_grad_(True)
        s = (F.normalize(v, dim=-1, eps=NORM_EPS) * F.normalize(a, dim=-1, eps=NORM_EPS)[anchor_rows]).sum(-1)
        grad_v, grad_a = torch.autograd.grad(s, (v, a), grad_scores.float())
    return grad_v, grad_a


def merged_grad(grad_merged, tokens, keep_idx, assign, merge_weight):
    """d tokens in fp32 of merged[r] = (w * v_k + sum_{j -> r} v_j) / (w + n_r), with assign fixed."""
    n = tokens.shape[0]
    weight = torch.ones(n, dtype=torch.float32, device=tokens.device)
    weight[keep_idx] = merge_weight
    denom = torch.zeros(grad_merged.shape[0], dtype=torch.float32, device=tokens.device)
    denom.index_add_(0, assign, weight)
    return grad_merged.float()[assign] * (weight / denom[assign])[:, None]
