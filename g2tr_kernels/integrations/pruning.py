"""Adapters for other token-pruning codebases: bring your own score (SPEC.md §3, §4).

The selection and the merge of G2TR are ops of their own (g2tr_kernels.balanced_topk /
merge); these helpers put them behind the call shapes that FastV- and ToMe-style code uses.

FastV (drop the least-attended image tokens after layer K; batch 1, as FastV's code)::

    # last_layer_attention: [1, H, L, L] -> keep_indexs: [L'], sorted, as FastV builds it
    keep_indexs = fastv_keep_indexes(last_layer_attention, image_start, image_len, keep_ratio=0.5)
    # W-FastV: at most ceil(K / #windows) per w x w window of the h x w image grid, then fill
    keep_indexs = fastv_keep_indexes(attn, image_start, image_len, 0.5, grid=(24, 24), window=4)
    hidden_states = hidden_states[:, keep_indexs, :]      # [1, L', D]
    position_ids = keep_indexs.unsqueeze(0)

ToMe (merge instead of drop; any score decides which tokens stay)::

    merge, unmerge = g2tr_soft_matching(metric, scores, keep_ratio=0.5)
    x, size = merge_wavg(merge, x, size)          # ToMe's own helper works unchanged
    x, size = tome_style_merge(x, scores, keep_ratio=0.5, size=size)   # or both in one call

Selection rule (all of them): walk tokens in descending score (ties: lower index, NaN
last), take one while its cell has room, until K; then fill with the best of the rest;
kept indices ascending. Cells: none (plain top-K), G2TR anchor cells (one per cell), or
W-FastV windows (ceil(K / #windows) per window). Merge: every dropped token joins its most
cosine-similar kept token of the same image (ties: lower index).

K per image: `keep` when given, else min(N, max(min_keep, round_half_even(N * keep_ratio))).
min_keep defaults to 1 here, not to reduce's 32: these helpers stand in for FastV / ToMe
code whose K is round(N * ratio) with no floor, so the default reproduces that K (pass
`keep=` for FastV's exact int(N * ratio) when N * ratio is not an integer, or
`min_keep=32` for G2TR's floor).
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from .. import ops
from ..reference.budget import cell_ids

Grid = Tuple[int, int]


def window_cells(h: int, w: int, window: int, device=None) -> Tuple[torch.Tensor, int]:
    """W-FastV windows of an h x w raster grid: (cell id of each token, number of windows).

    Window (i, j) covers rows [i*window, (i+1)*window) and columns likewise; edge windows
    may be smaller. Ids run row-major over the ceil(h/window) x ceil(w/window) windows.
    """
    if window < 1:
        raise ValueError(f"g2tr.pruning: window must be >= 1, got {window}")
    per_row = math.ceil(w / window)
    r = torch.arange(h, device=device, dtype=torch.int64)
    c = torch.arange(w, device=device, dtype=torch.int64)
    cells = (r[:, None] // window) * per_row + (c[None, :] // window)
    return cells.reshape(-1), math.ceil(h / window) * per_row


def _grids(op: str, grids, lengths: List[int]) -> List[Grid]:
    if grids is None:
        return None
    pairs = [tuple(g) for g in grids] if grids and isinstance(grids[0], (tuple, list)) else [tuple(grids)]
    if len(pairs) == 1 and len(lengths) > 1:
        pairs = pairs * len(lengths)
    if [h * w for h, w in pairs] != lengths:
        raise ValueError(f"{op}: grids {pairs} do not match the tokens per image {lengths}")
    return pairs


def select_with_scores(
    scores: torch.Tensor,
    lengths: Sequence[int],
    keep_ratio: Optional[float] = 0.5,
    keep: Optional[Union[int, Sequence[int]]] = None,
    grids=None,
    cell_grids=None,
    window: Optional[int] = None,
    min_keep: int = 1,
    backend: str = "auto",
) -> torch.Tensor:
    """Kept token indices (global, ascending per image) chosen by any fp32 score.

    scores: [sum(lengths)] (one value per token, images packed in order). K per image:
    `keep` (an int or one per image), else min(N, max(min_keep, round_half_even(N * keep_ratio))).
    grids: the (h, w) token grid of each image (one pair for all, or a list), needed for:
      cell_grids: (h_a, w_a) per image -> G2TR's balanced rule, one seed per cell, then fill;
      window: w -> W-FastV, at most ceil(K / #windows) per w x w window, then fill.
    Neither: plain top-K (ties to the lower index).
    """
    op = "g2tr.pruning.select_with_scores"
    lengths = [int(n) for n in lengths]
    scores = scores.reshape(-1).float().contiguous()
    if keep is not None:
        budgets = [int(keep)] * len(lengths) if isinstance(keep, int) else [int(k) for k in keep]
        budgets = [min(k, n) for k, n in zip(budgets, lengths)]
    else:
        budgets = ops.budgets(lengths, keep_ratio, min_keep)
    if cell_grids is not None and window is not None:
        raise ValueError(f"{op}: pass cell_grids (G2TR cells) or window (W-FastV), not both")
    grids = _grids(op, grids, lengths)
    if (cell_grids is not None or window is not None) and grids is None:
        raise ValueError(f"{op}: cell_grids / window need grids, the (h, w) token grid of each image")

    device = scores.device
    if window is not None:
        pieces = [window_cells(h, w, int(window), device) for h, w in grids]
        cells = torch.cat([p[0] for p in pieces])
        counts, quota = [p[1] for p in pieces], "window"
    elif cell_grids is not None:
        cell_grids = [tuple(g) for g in cell_grids] if isinstance(cell_grids[0], (tuple, list)) else [tuple(cell_grids)]
        if len(cell_grids) == 1:
            cell_grids = cell_grids * len(grids)
        if len(cell_grids) != len(grids) or any(ha < 1 or wa < 1 for ha, wa in cell_grids):
            raise ValueError(f"{op}: need one positive cell grid per image, got {cell_grids} for {len(grids)} images")
        cells = torch.cat([cell_ids(h, w, ha, wa, device=device) for (h, w), (ha, wa) in zip(grids, cell_grids)])
        counts, quota = [ha * wa for ha, wa in cell_grids], 1
    else:
        # Every token outside the cell range: only the fill runs, which is plain top-K.
        cells = torch.full((scores.numel(),), -1, dtype=torch.int64, device=device)
        counts, quota = [1] * len(lengths), 1
    return ops.balanced_topk(scores, cells, lengths, budgets, counts, quota=quota, backend=backend)


# G2TR's name for it in other codebases: select with G2TR's balanced rule, your score.
def g2tr_select_with_scores(scores, grids, cell_grids, keep_ratio: float = 0.5, min_keep: int = 1, keep=None,
                            backend: str = "auto") -> torch.Tensor:
    """select_with_scores with G2TR's one-seed-per-cell rule; scores packed per image."""
    grid_pairs = [tuple(g) for g in grids] if isinstance(grids[0], (tuple, list)) else [tuple(grids)]
    return select_with_scores(
        scores, [h * w for h, w in grid_pairs], keep_ratio, keep, grid_pairs, cell_grids, None, min_keep, backend
    )


# -- FastV ---------------------------------------------------------------------------------
def fastv_scores(attention: torch.Tensor, image_start: int, image_len: int, query: str = "last") -> torch.Tensor:
    """FastV's score: the attention image tokens receive, averaged over heads. fp32 [B, image_len].

    attention: [B, H, L, L], [H, L, L] or [L, L] weights of one layer. query="last" uses
    the last query row (FastV), "mean" averages over all query rows after the image.
    """
    a = attention.float()
    while a.dim() < 4:
        a = a.unsqueeze(0)
    a = a.mean(dim=1)  # heads
    if query == "last":
        rows = a[:, -1]
    elif query == "mean":
        rows = a[:, image_start + image_len :].mean(dim=1)
    else:
        raise ValueError(f"g2tr.pruning.fastv_scores: query must be 'last' or 'mean', got {query!r}")
    return rows[:, image_start : image_start + image_len].contiguous()


def fastv_keep_indexes(
    attention: torch.Tensor,
    image_start: int,
    image_len: int,
    keep_ratio: float = 0.5,
    grid: Optional[Grid] = None,
    window: Optional[int] = None,
    cell_grid: Optional[Grid] = None,
    query: str = "last",
    keep: Optional[int] = None,
    min_keep: int = 1,
    backend: str = "auto",
) -> torch.Tensor:
    """FastV's keep_indexs: every text position plus the K best image tokens, ascending, [L - image_len + K].

    attention: one layer's weights, [1, H, L, L] as FastV's LlamaModel gets them
    (output_attentions=True), or [H, L, L] / [L, L]. FastV keeps one index list for the
    whole batch (its code reads batch 0), so a batch of more than one sequence is refused
    rather than silently pruned by the first row: score each row with fastv_scores and
    select with select_with_scores instead. The result indexes dim 1 of FastV's
    hidden_states ([1, L, D] -> hidden_states[:, keep_indexs, :]) and is its new
    position_ids once unsqueezed. window (with grid) gives W-FastV, cell_grid (with grid)
    G2TR's balanced rule on the attention score.
    """
    op = "g2tr.pruning.fastv_keep_indexes"
    if attention.dim() not in (2, 3, 4) or attention.shape[-1] != attention.shape[-2]:
        raise ValueError(f"{op}: attention must be [1, H, L, L], [H, L, L] or [L, L], got {list(attention.shape)}")
    if attention.dim() == 4 and attention.shape[0] != 1:
        raise ValueError(
            f"{op}: attention holds a batch of {attention.shape[0]} sequences; FastV's keep_indexs is one index "
            "list for batch 1. Use fastv_scores (one row per sequence) with select_with_scores for a batch"
        )
    length = attention.shape[-1]
    if not (0 <= image_start and image_len >= 1 and image_start + image_len <= length):
        raise ValueError(f"{op}: image tokens [{image_start}, {image_start + image_len}) do not fit in L = {length}")
    scores = fastv_scores(attention, image_start, image_len, query)[0]
    kept = select_with_scores(
        scores, [image_len], keep_ratio, keep, None if grid is None else [tuple(grid)],
        None if cell_grid is None else [tuple(cell_grid)], window, min_keep, backend,
    )
    device = kept.device
    return torch.cat([
        torch.arange(image_start, device=device), kept + image_start,
        torch.arange(image_start + image_len, length, device=device),
    ])


# -- ToMe ----------------------------------------------------------------------------------
def g2tr_soft_matching(
    metric: torch.Tensor,
    scores: torch.Tensor,
    keep_ratio: Optional[float] = 0.5,
    keep: Optional[int] = None,
    grid: Optional[Grid] = None,
    cell_grid: Optional[Grid] = None,
    window: Optional[int] = None,
    class_token: bool = False,
    merge_weight: float = 1.0,
    min_keep: int = 1,
    backend: str = "auto",
) -> Tuple[Callable, Callable]:
    """A drop-in for ToMe's bipartite_soft_matching(metric, r): returns (merge, unmerge).

    metric: [B, N, C] (ToMe: the keys); scores: [B, N], any score, higher = keep. The
    kept tokens are chosen by the score (plain top-K, or balanced with grid + cell_grid /
    window); every other token joins its most cosine-similar kept token of the same row.
    merge(x, mode="mean"|"sum") -> [B, K, C'] for any x [B, N, C'] (kept tokens in ascending
    order; "mean" is (merge_weight * x_k + sum x_j) / (merge_weight + n_k), G2TR's merge);
    unmerge(y [B, K, C']) -> [B, N, C'] (each token gets its group's row).
    class_token=True keeps token 0 out of the selection and the merge, as ToMe does.
    """
    op = "g2tr.pruning.g2tr_soft_matching"
    if metric.dim() != 3:
        raise ValueError(f"{op}: metric must be [B, N, C], got {list(metric.shape)}")
    b, n, _ = metric.shape
    if scores.shape != (b, n):
        raise ValueError(f"{op}: scores must be [B, N] = {[b, n]}, got {list(scores.shape)}")
    protected = 1 if class_token else 0
    m = n - protected
    if m < 1:
        raise ValueError(f"{op}: no tokens to merge")
    body = metric[:, protected:]
    keep_idx = select_with_scores(
        scores[:, protected:], [m] * b, keep_ratio, keep, None if grid is None else [tuple(grid)] * b,
        None if cell_grid is None else [tuple(cell_grid)] * b, window, min_keep, backend,
    )
    k = keep_idx.numel() // b
    packed = body.reshape(b * m, -1)
    if not packed.is_contiguous():
        packed = packed.contiguous()
    _, assign = ops.merge(packed, keep_idx, [m] * b, [k] * b, merge_weight, backend)
    # Row-local output rows, shifted past the protected token.
    assign = assign.reshape(b, m) - torch.arange(b, device=assign.device)[:, None] * k + protected
    if protected:
        assign = torch.cat([torch.zeros(b, 1, dtype=assign.dtype, device=assign.device), assign], dim=1)
    is_kept = torch.zeros(b, n, dtype=torch.bool, device=metric.device)
    rows = keep_idx.reshape(b, k) - torch.arange(b, device=keep_idx.device)[:, None] * m + protected
    is_kept.scatter_(1, rows, True)
    if protected:
        is_kept[:, 0] = True
    out_rows = k + protected
    weight = torch.where(is_kept, torch.full_like(is_kept, merge_weight, dtype=torch.float32), 1.0)

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        if mode not in ("mean", "sum"):
            raise ValueError(f"{op}: merge mode must be 'mean' or 'sum', got {mode!r}")
        xf = x.float() * weight[..., None]
        total = xf.new_zeros(b, out_rows, x.shape[-1])
        total.scatter_add_(1, assign[..., None].expand(-1, -1, x.shape[-1]), xf)
        if mode == "mean":
            count = weight.new_zeros(b, out_rows).scatter_add_(1, assign, weight)
            total = total / count[..., None]
        return total.to(x.dtype)

    def unmerge(y: torch.Tensor) -> torch.Tensor:
        return y.gather(1, assign[..., None].expand(-1, -1, y.shape[-1]))

    merge.assign = assign  # [B, N]: the output row of every token, for visualisation
    return merge, unmerge


def tome_style_merge(
    x: torch.Tensor,
    scores: torch.Tensor,
    keep_ratio: Optional[float] = 0.5,
    size: Optional[torch.Tensor] = None,
    metric: Optional[torch.Tensor] = None,
    **matching,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """ToMe's `merge_wavg(bipartite_soft_matching(metric, r)[0], x, size)` with a score-driven keep set.

    x: [B, N, C]; scores: [B, N]; size: [B, N, 1] token sizes (ToMe's proportional
    attention), ones when None; metric: what similarity is measured on (default x).
    Returns (x merged [B, K, C] as size-weighted means, size [B, K, 1]).
    """
    merge, _ = g2tr_soft_matching(x if metric is None else metric, scores, keep_ratio, **matching)
    if size is None:
        size = torch.ones_like(x[..., :1])
    merged = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return merged / size, size


__all__ = [
    "fastv_keep_indexes",
    "fastv_scores",
    "g2tr_select_with_scores",
    "g2tr_soft_matching",
    "select_with_scores",
    "tome_style_merge",
    "window_cells",
]
