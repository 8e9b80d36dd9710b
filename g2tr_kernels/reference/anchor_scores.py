"""Stage III, score: cosine of each token with the anchor of its cell (SPEC.md §3)."""
from __future__ import annotations

import torch

from .budget import cell_ids

NORM_EPS = 1e-12  # torch.nn.functional.normalize's default; the one eps of every backend (common.h kNormEps)


def unit(x: torch.Tensor) -> torch.Tensor:
    """x / max(|x|, eps) per row (F.normalize) for every finite fp32 x, up to the fp32 maximum.

    The plain fp32 sum of squares overflows for |x| above ~1.8e19 and underflows below
    ~1e-19. Each row is first multiplied by the exact power of two that brings its max-abs
    near 1: |x * 2^p| = 2^p * |x| exactly, so x / max(|x|, eps) = (x * 2^p) / max(|x * 2^p|,
    eps * 2^p), bit for bit the same on rows that did not overflow. The kernels do the same,
    on the rare rows that need it (csrc/include/g2tr/common.h cosine_pow2).
    """
    if x.shape[-1] == 0:  # D = 0: nothing to scale (and amax has no identity)
        return x.clone()
    _, exponent = torch.frexp(x.abs().amax(dim=-1, keepdim=True))  # max-abs = m * 2^e, m in [0.5, 1)
    p = torch.clamp(-exponent, -126, 127)  # 2^p stays a normal fp32
    p = torch.where(torch.isfinite(x).all(dim=-1, keepdim=True), p, torch.zeros_like(p))  # non-finite: as it is
    # x times the power of two, not ldexp(x, p): the same bits (one exact multiply by a normal
    # 2^p), but torch 2.11's ldexp backward gives a zero gradient for an integer exponent.
    scaled = x * torch.ldexp(torch.ones_like(x[..., :1]), p)
    eps = torch.ldexp(torch.full_like(scaled[..., :1], NORM_EPS), p)
    return scaled / torch.maximum(torch.linalg.vector_norm(scaled, dim=-1, keepdim=True), eps)


def anchor_scores(tokens, anchors, grids, anchor_grids):
    """Returns (scores fp32 [N], cells int64 [N]); cells are local to each image.

    grids / anchor_grids: lists of (h, w) pairs, one per image, packed in order.
    """
    scores, cells = [], []
    t0 = a0 = 0
    for (h, w), (h_a, w_a) in zip(grids, anchor_grids):
        v = tokens[t0 : t0 + h * w].float()  # accumulate in fp32 whatever the input dtype
        a = anchors[a0 : a0 + h_a * w_a].float()
        cell = cell_ids(h, w, h_a, w_a, device=tokens.device)
        s = (unit(v) * unit(a)[cell]).sum(-1)
        scores.append(s)
        cells.append(cell)
        t0 += h * w
        a0 += h_a * w_a
    if not scores:
        return tokens.new_empty(0, dtype=torch.float32), tokens.new_empty(0, dtype=torch.int64)
    return torch.cat(scores), torch.cat(cells)
