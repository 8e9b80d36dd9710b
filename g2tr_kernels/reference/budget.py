"""Per-image budget and cell map: the integer rules every backend shares (SPEC.md §3)."""
from __future__ import annotations

import torch


def budget(num_tokens: int, keep_ratio: float, min_keep: int) -> int:
    """K = min(N, max(min_keep, round_half_even(N * keep_ratio))).

    Python's round() of the double product is the contract: 1369 * 0.5 -> 684.
    K depends on N and the arguments only, so output shapes are known on the host.
    """
    n = int(num_tokens)
    return min(n, max(int(min_keep), round(n * float(keep_ratio))))  # the product in double, like the C++ ops


def cell_ids(h: int, w: int, h_a: int, w_a: int, device=None) -> torch.Tensor:
    """Local anchor cell of each token of an h x w grid, raster order (int64 [h*w]).

    Integer floor mapping, clamped: a_r = min(r * h_a // h, h_a - 1), likewise for columns.
    """
    r = torch.arange(h, device=device, dtype=torch.int64)
    c = torch.arange(w, device=device, dtype=torch.int64)
    a_r = torch.clamp(r * h_a // h, max=h_a - 1)
    a_c = torch.clamp(c * w_a // w, max=w_a - 1)
    return (a_r[:, None] * w_a + a_c[None, :]).reshape(-1)
