"""Stage III, select: one seed per cell, then fill (SPEC.md §3).

The G2TR rule, said as one pass over the tokens in descending score order (ties: lower
index first): take a token if its cell still has room (``quota``, 1 for G2TR) until K
are taken, then fill with the best tokens not yet taken. With quota 1 the first token
met of each cell is that cell's best, and cells are met in the order of their best
score, so this is exactly "rank the cells by their best token, keep the top
min(K, #cells) seeds, then fill". A larger quota is the window-quota mode (W-FastV).
"""
from __future__ import annotations

import torch


def descending_order(scores: torch.Tensor) -> torch.Tensor:
    """Token order by score, highest first, ties to the lower index; NaN ranks last."""
    key = torch.nan_to_num(scores.float(), nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    return torch.sort(key, descending=True, stable=True).indices


def select_one_image(scores, cells, budget: int, num_cells: int, quota: int) -> torch.Tensor:
    """Local kept indices (ascending) of one image."""
    n = scores.numel()
    order = descending_order(scores)
    cell_in_order = cells[order]
    valid = (cell_in_order >= 0) & (cell_in_order < num_cells)
    # Rank of each token inside its cell, counted in score order: a stable sort by cell
    # keeps score order within a cell, so rank = position - start of the cell's run.
    group_key = torch.where(valid, cell_in_order, torch.full_like(cell_in_order, num_cells))
    by_cell = torch.sort(group_key, stable=True).indices
    sorted_cells = group_key[by_cell]
    position = torch.arange(n, device=scores.device)
    run_start = torch.searchsorted(sorted_cells, sorted_cells, right=False)
    rank = torch.empty_like(position)
    rank[by_cell] = position - run_start
    seed = valid & (rank < quota)
    # Seeds in score order first, then everything else in score order: the first
    # `budget` of that sequence are the kept tokens.
    priority = torch.cat([order[seed], order[~seed]])
    kept = priority[:budget]
    return torch.sort(kept).values


def balanced_topk(scores, cells, lengths, budgets, cell_counts, cell_quotas):
    """Global kept indices (int64 [sum(budgets)]), ascending within and across images."""
    kept, start = [], 0
    for n, k, c, q in zip(lengths, budgets, cell_counts, cell_quotas):
        kept.append(select_one_image(scores[start : start + n], cells[start : start + n], k, c, q) + start)
        start += n
    if not kept:
        return scores.new_empty(0, dtype=torch.int64)
    return torch.cat(kept)
