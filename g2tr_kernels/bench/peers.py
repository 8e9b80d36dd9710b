"""Peers: what a user would otherwise reach for, run on the same inputs as the G2TR ops.

- merge assignment: FAISS exact inner-product search (faiss-cpu IndexFlatIP) over the
  unit vectors of each image's kept tokens, then an index_add mean;
- selection: torch.topk and torch.sort of each image's scores (plain top-K: the cost of
  selecting without the one-seed-per-cell rule);
- accumulation, given the assignment: torch scatter_reduce("mean") and index_add;
- the whole reduction: torch.compile of the reference path (built in runner.py), and
  ToMe's bipartite soft matching, the merge most token-pruning codebases use.

Every function takes the packed layout and returns tensors in the conventions of the op
contract where it computes the same thing, so the bench can measure its error.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F

from ..reference.anchor_scores import NORM_EPS
from ..reference.budget import budget


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _mean_into_kept(x: torch.Tensor, keep_idx: torch.Tensor, target: torch.Tensor, dropped: torch.Tensor):
    total = x[keep_idx].clone()
    total.index_add_(0, target, x[dropped])
    count = torch.ones(keep_idx.numel(), device=x.device)
    count.index_add_(0, target, torch.ones_like(target, dtype=torch.float32))
    return total / count[:, None]


def faiss_merge(tokens: torch.Tensor, keep_idx: torch.Tensor, lengths: Sequence[int], budgets: Sequence[int]):
    """Stage IV with FAISS doing the nearest-kept search: (merged [K_total, D], assign [N]).

    FAISS takes fp32 numpy on the CPU, so the cast and the normalisation are part of
    the cost, as they would be for a user. Inner product of unit vectors = cosine.
    """
    import faiss

    if tokens.device.type != "cpu":
        raise RuntimeError("faiss-cpu runs on CPU tensors only")
    x = tokens.float()
    unit = F.normalize(x, dim=-1, eps=NORM_EPS)
    n_total, d = x.shape
    assign = torch.empty(n_total, dtype=torch.int64)
    is_kept = torch.zeros(n_total, dtype=torch.bool)
    is_kept[keep_idx] = True
    targets, droppeds = [], []
    t0 = k0 = 0
    for n, k in zip(lengths, budgets):
        kept = keep_idx[k0 : k0 + k]
        dropped = torch.nonzero(~is_kept[t0 : t0 + n]).squeeze(1) + t0
        index = faiss.IndexFlatIP(d)
        index.add(unit[kept].numpy())
        _, nearest = index.search(unit[dropped].numpy(), 1)
        target = torch.from_numpy(nearest[:, 0]).to(torch.int64) + k0
        assign[kept] = torch.arange(k0, k0 + k)
        assign[dropped] = target
        targets.append(target)
        droppeds.append(dropped)
        t0 += n
        k0 += k
    merged = _mean_into_kept(x, keep_idx, torch.cat(targets), torch.cat(droppeds))
    return merged.to(tokens.dtype), assign


def topk_select(scores: torch.Tensor, lengths: Sequence[int], budgets: Sequence[int]) -> torch.Tensor:
    """Plain top-K per image (no per-cell seeds), indices ascending: global keep_idx."""
    kept, t0 = [], 0
    for n, k in zip(lengths, budgets):
        kept.append(torch.sort(torch.topk(scores[t0 : t0 + n], k).indices).values + t0)
        t0 += n
    return torch.cat(kept)


def sort_select(scores: torch.Tensor, lengths: Sequence[int], budgets: Sequence[int]) -> torch.Tensor:
    """Full stable sort per image, first K taken, indices ascending: global keep_idx."""
    kept, t0 = [], 0
    for n, k in zip(lengths, budgets):
        order = torch.sort(scores[t0 : t0 + n], descending=True, stable=True).indices
        kept.append(torch.sort(order[:k]).values + t0)
        t0 += n
    return torch.cat(kept)


def scatter_reduce_mean(tokens: torch.Tensor, assign: torch.Tensor, k_total: int) -> torch.Tensor:
    """Merged rows from a given assignment with scatter_reduce("mean") (merge_weight 1)."""
    x = tokens.float()
    out = torch.zeros(k_total, x.shape[1], device=x.device)
    out.scatter_reduce_(0, assign[:, None].expand_as(x), x, reduce="mean", include_self=False)
    return out.to(tokens.dtype)


def index_add_mean(tokens: torch.Tensor, assign: torch.Tensor, k_total: int) -> torch.Tensor:
    """Merged rows from a given assignment with two index_add (sum and count), merge_weight 1."""
    x = tokens.float()
    total = torch.zeros(k_total, x.shape[1], device=x.device)
    total.index_add_(0, assign, x)
    count = torch.zeros(k_total, device=x.device)
    count.index_add_(0, assign, torch.ones(assign.numel(), device=x.device))
    return (total / count[:, None]).to(tokens.dtype)


def tome_bipartite(tokens: torch.Tensor, lengths: Sequence[int], keep_ratio: float = 0.5, min_keep: int = 32):
    """ToMe-style bipartite soft matching down to the same K per image: (merged [K_total, D], keep_idx).

    Per image and round: the tokens alternate into sets A (even positions) and B (odd);
    every A token finds its most similar B token (cosine, in the input dtype); the
    r = min(count - K, |A|) A tokens with the strongest match are averaged into their
    B token (a plain mean: the first merge of a fresh sequence has no sizes to track),
    the other A tokens stay. One round reaches K for keep_ratio >= 0.5; lower ratios
    take more rounds. keep_idx lists the survivors' original positions, ascending; the
    merged rows follow ToMe's order (unmerged A, then B), not keep_idx order.
    """
    merged: List[torch.Tensor] = []
    kept: List[torch.Tensor] = []
    t0 = 0
    for n in lengths:
        k = budget(n, keep_ratio, min_keep)
        v = tokens[t0 : t0 + n].float()
        position = torch.arange(n, device=tokens.device)
        while v.shape[0] > k:
            unit = F.normalize(v.to(tokens.dtype), dim=-1, eps=NORM_EPS)
            a, b = unit[0::2], unit[1::2]
            r = min(v.shape[0] - k, a.shape[0])
            best, partner = (a @ b.T).max(dim=-1)
            order = torch.argsort(best, descending=True)
            src, stay = order[:r], order[r:]
            va, vb = v[0::2], v[1::2]
            vb = vb.scatter_reduce(0, partner[src][:, None].expand(-1, v.shape[1]), va[src], reduce="mean", include_self=True)
            v = torch.cat([va[stay], vb])
            position = torch.cat([position[0::2][stay], position[1::2]])
        merged.append(v.to(tokens.dtype))
        kept.append(torch.sort(position).values + t0)
        t0 += n
    return torch.cat(merged), torch.cat(kept)
