"""Stage III, score: cosine of each token with the anchor of its cell (SPEC.md §3)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .budget import cell_ids

NORM_EPS = 1e-12  # torch.nn.functional.normalize's default; the one eps of every backend (common.h kNormEps)


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
        s = (F.normalize(v, dim=-1, eps=NORM_EPS) * F.normalize(a, dim=-1, eps=NORM_EPS)[cell]).sum(-1)
        scores.append(s)
        cells.append(cell)
        t0 += h * w
        a0 += h_a * w_a
    if not scores:
        return tokens.new_empty(0, dtype=torch.float32), tokens.new_empty(0, dtype=torch.int64)
    return torch.cat(scores), torch.cat(cells)
