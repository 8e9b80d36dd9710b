"""Stage IV: merge every dropped token into its most similar kept token (SPEC.md §4).

Merging stays inside each image (the authors' BAGEL code merges across the packed
batch; this project does not, on purpose).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .anchor_scores import NORM_EPS


def merge_one_image(v: torch.Tensor, kept: torch.Tensor, merge_weight: float):
    """v: [n, D] one image; kept: local kept indices, ascending.

    Returns merged [K, D] (fp32) and assign [n] (local output row of every token).
    """
    n = v.shape[0]
    x = v.float()  # accumulate in fp32 whatever the input dtype
    is_kept = torch.zeros(n, dtype=torch.bool, device=v.device)
    is_kept[kept] = True
    dropped = torch.nonzero(~is_kept).squeeze(1)
    unit = F.normalize(x, dim=-1, eps=NORM_EPS)
    sim = unit[dropped] @ unit[kept].T
    # NaN never wins; argmax returns the first (lowest) index among equal maxima.
    sim = torch.nan_to_num(sim, nan=float("-inf"))
    target = torch.argmax(sim, dim=1) if kept.numel() else torch.zeros_like(dropped)
    assign = torch.empty(n, dtype=torch.int64, device=v.device)
    assign[kept] = torch.arange(kept.numel(), device=v.device)
    assign[dropped] = target
    # (lambda * v_k + sum_{j -> k} v_j) / (lambda + n_k); dropped tokens are added in
    # ascending index order, the order every backend uses.
    total = x[kept] * merge_weight
    total.index_add_(0, target, x[dropped])
    count = torch.full((kept.numel(),), float(merge_weight), device=v.device)
    count.index_add_(0, target, torch.ones_like(target, dtype=torch.float32))
    return total / count[:, None], assign


def merge(tokens, keep_idx, lengths, budgets, merge_weight: float = 1.0):
    """Returns merged [sum(budgets), D] in the input dtype and assign int64 [N] (global output rows)."""
    merged, assign = [], []
    t0 = k0 = 0
    for b, (n, k) in enumerate(zip(lengths, budgets)):
        kept = keep_idx[k0 : k0 + k] - t0
        # Kept indices must be strictly ascending inside the image (reads the data).
        if bool((kept[1:] <= kept[:-1]).any()) or bool(kept[0] < 0) or bool(kept[-1] >= n):
            raise ValueError(
                f"g2tr.merge: keep_idx of image {b} must be strictly ascending within [{t0}, {t0 + n}), "
                f"got {(kept + t0).tolist()[:8]}{'...' if k > 8 else ''}"
            )
        m, a = merge_one_image(tokens[t0 : t0 + n], kept, merge_weight)
        merged.append(m.to(tokens.dtype))
        assign.append(a + k0)
        t0 += n
        k0 += k
    if not merged:
        return tokens.new_empty((0, tokens.shape[-1])), tokens.new_empty(0, dtype=torch.int64)
    return torch.cat(merged), torch.cat(assign)
