"""The structure of the authors' published G2TR code, rendered in plain PyTorch as a baseline.

This is not the authors' code; it reproduces how their implementation spends its time,
so that `g2tr bench` can say what replacing it buys:

- Stage III runs per image, and finds each anchor cell's best token with a Python loop
  over the cells: a mask of the cell's tokens, a host-side "is the cell occupied"
  test, a masked fill and an argmax. That is a handful of small ops (and on a GPU a
  device-to-host sync) per cell: 1,024 cells for one BAGEL 1024x1024 image.
- The seeds are ranked by their score (a sort), and the budget is filled with a topk
  over the remaining tokens.
- Stage IV normalises the whole packed batch in the input dtype (bf16 in the models)
  and forms ONE dense similarity dropped x kept over ALL images at once, so a dropped
  token may merge into a kept token of another image. That is the published
  behaviour; the project merges within the image on purpose (SPEC.md section 4). On
  M2 the matrix is 8,505 x 8,503; on L2 it would hold 3.6e9 entries (about 7 GB bf16).
- The mean is taken with index_add. The scores and the mean are computed in fp32
  here, so that the differences `g2tr bench` reports against the reference come from
  the merge assignment (similarity in the input dtype, merges across images), not
  from precision choices this rendering would have to guess. (bf16 scores would tie
  massively: bf16 has 256 steps between 0.5 and 1.)

Returns the five outputs of the op contract, so the bench compares it row for row.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference.budget import budget, cell_ids


def _select_one_image(scores: torch.Tensor, cells: torch.Tensor, num_cells: int, k: int) -> torch.Tensor:
    seed_tokens, seed_scores = [], []
    for c in range(num_cells):
        in_cell = cells == c
        if not bool(in_cell.any()):  # host sync per cell, as in the published loop
            continue
        masked = scores.masked_fill(~in_cell, float("-inf"))
        best = torch.argmax(masked)
        seed_tokens.append(best)
        seed_scores.append(masked[best])
    seed_tokens = torch.stack(seed_tokens)
    ranked = torch.argsort(torch.stack(seed_scores), descending=True)
    seeds = seed_tokens[ranked[: min(k, seed_tokens.numel())]]
    fill = k - seeds.numel()
    if fill > 0:
        rest = scores.clone()
        rest[seeds] = float("-inf")
        seeds = torch.cat([seeds, torch.topk(rest, fill).indices])
    return torch.sort(seeds).values


def reduce(tokens, anchors, grids, anchor_grids, keep_ratio=0.5, min_keep=32, merge_weight=1.0):
    """tokens [N, D], anchors [M, D] packed; grids / anchor_grids lists of (h, w).

    Returns (merged [K_total, D], keep_idx [K_total], cu_seqlens [B+1], scores fp32 [N], assign [N]).
    """
    device = tokens.device
    keep, scores_all, budgets = [], [], []
    t0 = a0 = 0
    for (h, w), (h_a, w_a) in zip(grids, anchor_grids):
        n, m = h * w, h_a * w_a
        k = budget(n, keep_ratio, min_keep)
        cells = cell_ids(h, w, h_a, w_a, device=device)
        scores = F.cosine_similarity(tokens[t0 : t0 + n].float(), anchors[a0 : a0 + m][cells].float(), dim=-1)
        keep.append(_select_one_image(scores, cells, m, k) + t0)
        scores_all.append(scores)
        budgets.append(k)
        t0 += n
        a0 += m
    keep_idx = torch.cat(keep)

    n_total = tokens.shape[0]
    is_kept = torch.zeros(n_total, dtype=torch.bool, device=device)
    is_kept[keep_idx] = True
    dropped = torch.nonzero(~is_kept).squeeze(1)
    unit = F.normalize(tokens, dim=-1)  # input dtype, whole packed batch
    similarity = unit[dropped] @ unit[keep_idx].T  # (N - K) x K over all images at once
    target = similarity.argmax(dim=1)

    x = tokens.float()
    total = x[keep_idx] * merge_weight
    total.index_add_(0, target, x[dropped])
    count = torch.full((keep_idx.numel(),), float(merge_weight), device=device)
    count.index_add_(0, target, torch.ones_like(target, dtype=torch.float32))
    merged = (total / count[:, None]).to(tokens.dtype)

    assign = torch.empty(n_total, dtype=torch.int64, device=device)
    assign[keep_idx] = torch.arange(keep_idx.numel(), device=device)
    assign[dropped] = target
    cu_seqlens = torch.zeros(len(budgets) + 1, dtype=torch.int32, device=device)
    cu_seqlens[1:] = torch.cumsum(torch.tensor(budgets, dtype=torch.int32, device=device), 0)
    return merged, keep_idx, cu_seqlens, torch.cat(scores_all), assign


def occupied_cells(h: int, w: int, h_a: int, w_a: int) -> int:
    rows = len({min(r * h_a // h, h_a - 1) for r in range(h)})
    cols = len({min(c * w_a // w, w_a - 1) for c in range(w)})
    return rows * cols


def launches_per_call(grids, anchor_grids) -> dict:
    """Kernel launches and host syncs of one call of this structure on a GPU (eager PyTorch).

    Counted from the code above. Every anchor cell costs 2 launches (eq, any) and a
    sync; an occupied one 4 more (logical_not, masked_fill, argmax, the scalar gather).
    Per image: scoring 4 (cell ids, gather, cosine, cast), ranking and fill 8 (stack x2,
    argsort, gather, clone, scatter, topk, cat), sort 1. The merge over the whole batch:
    about 16 (mask, scatter, nonzero, normalize, two gathers, matmul, argmax, cast,
    gather, scale, index_add x2, full, divide, cast), plus the assign and cu_seqlens
    writes (about 6). nonzero syncs once.
    """
    cells = sum(h_a * w_a for h_a, w_a in anchor_grids)
    occupied = sum(occupied_cells(h, w, h_a, w_a) for (h, w), (h_a, w_a) in zip(grids, anchor_grids))
    images = len(grids)
    launches = 2 * cells + 4 * occupied + images * (4 + 8 + 1) + 16 + 6
    return {"launches": launches, "host_syncs": cells + 1, "cells": cells, "occupied_cells": occupied}
