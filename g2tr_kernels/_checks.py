"""Argument checks of the Python API and of the fake kernels.

They say what csrc/include/g2tr/checks.h says for direct torch.ops.g2tr callers: the
same rules, the argument and the image named. Only host-side values are read here
(shapes, dtypes, the int lists), so nothing syncs with a device.
"""
from __future__ import annotations

import math
import operator
from typing import List, Sequence, Tuple

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
Pairs = List[Tuple[int, int]]


def as_int(op: str, what: str, value) -> int:
    """An integer argument, never silently truncated (4.9 is an error, not 4)."""
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{op}: {what} must be an int, got {value!r}") from None


def grid_pairs(op: str, name: str, grids) -> Pairs:
    """Accepts [h0, w0, h1, w1, ...] or [(h0, w0), (h1, w1), ...]; returns pairs."""
    if isinstance(grids, torch.Tensor):
        raise TypeError(f"{op}: {name} must be host-side ints (a list), not a tensor: reading a tensor would sync")
    grids = list(grids)
    if grids and all(isinstance(g, (tuple, list)) for g in grids):
        pairs = []
        for b, g in enumerate(grids):
            if len(g) != 2:
                raise ValueError(f"{op}: {name} of image {b} must be an (h, w) pair, got {tuple(g)}")
            pairs.append((as_int(op, f"{name} of image {b}", g[0]), as_int(op, f"{name} of image {b}", g[1])))
    else:
        if len(grids) % 2:
            raise ValueError(f"{op}: {name} must hold one (h, w) pair per image, got {len(grids)} ints")
        pairs = [
            (as_int(op, f"{name} of image {i // 2}", grids[i]), as_int(op, f"{name} of image {i // 2}", grids[i + 1]))
            for i in range(0, len(grids), 2)
        ]
    for b, (h, w) in enumerate(pairs):
        if h <= 0 or w <= 0:
            raise ValueError(f"{op}: {name} of image {b} must be positive, got {h} x {w}")
    return pairs


def flat(pairs: Pairs) -> List[int]:
    return [v for pair in pairs for v in pair]


def float_tensor(op: str, name: str, t, dim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{op}: {name} must be {dim}-D, got shape {list(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")


def same_device(op: str, name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"{op}: {name_a} is on {a.device} but {name_b} is on {b.device}")


def images(op: str, tokens, anchors, grids, anchor_grids) -> Tuple[Pairs, Pairs]:
    float_tensor(op, "tokens", tokens, 2)
    float_tensor(op, "anchors", anchors, 2)
    same_device(op, "tokens", tokens, "anchors", anchors)
    if anchors.dtype != tokens.dtype:
        raise TypeError(f"{op}: anchors dtype {anchors.dtype} must match tokens dtype {tokens.dtype}")
    if anchors.shape[1] != tokens.shape[1]:
        raise ValueError(f"{op}: anchors have D = {anchors.shape[1]} but tokens have D = {tokens.shape[1]}")
    g = grid_pairs(op, "grids", grids)
    a = grid_pairs(op, "anchor_grids", anchor_grids)
    if len(a) != len(g):
        raise ValueError(f"{op}: anchor_grids describe {len(a)} images but grids describe {len(g)}")
    n = sum(h * w for h, w in g)
    if tokens.shape[0] != n:
        raise ValueError(
            f"{op}: tokens have N = {tokens.shape[0]} rows but grids describe {n} tokens "
            f"(sum of h * w over {len(g)} images)"
        )
    m = sum(h * w for h, w in a)
    if anchors.shape[0] != m:
        raise ValueError(
            f"{op}: anchors have M = {anchors.shape[0]} rows but anchor_grids describe {m} anchors "
            f"(sum of h_a * w_a over {len(a)} images)"
        )
    return g, a


def ratio(op: str, keep_ratio: float, min_keep: int) -> None:
    as_int(op, "min_keep", min_keep)
    if not (keep_ratio > 0.0 and keep_ratio <= 1.0):
        raise ValueError(f"{op}: keep_ratio must be in (0, 1], got {keep_ratio}")
    if min_keep < 1:
        raise ValueError(f"{op}: min_keep must be >= 1, got {min_keep}")


def merge_weight(op: str, weight: float) -> None:
    if not (math.isfinite(weight) and weight > 0.0):
        raise ValueError(f"{op}: merge_weight must be a finite number > 0, got {weight}")


def lengths(op: str, lengths: Sequence[int], total: int) -> List[int]:
    if isinstance(lengths, torch.Tensor):
        raise TypeError(f"{op}: lengths must be host-side ints (a list), not a tensor: reading a tensor would sync")
    lengths = [as_int(op, f"lengths[{b}] (image {b})", n) for b, n in enumerate(lengths)]
    for b, n in enumerate(lengths):
        if n <= 0:
            raise ValueError(f"{op}: lengths[{b}] (image {b}) must be positive, got {n}")
    if sum(lengths) != total:
        raise ValueError(f"{op}: the input has {total} tokens but lengths sum to {sum(lengths)}")
    return lengths


def per_image(op: str, name: str, values: Sequence[int], lengths_: Sequence[int], low: int = 1, high=None) -> List[int]:
    values = [as_int(op, f"{name}[{b}] (image {b})", v) for b, v in enumerate(values)]
    if len(values) != len(lengths_):
        raise ValueError(f"{op}: {name} has {len(values)} entries but there are {len(lengths_)} images")
    for b, v in enumerate(values):
        top = lengths_[b] if high == "length" else high
        if v < low or (top is not None and v > top):
            bound = f"[{low}, {top}]" if top is not None else f">= {low}"
            raise ValueError(f"{op}: {name}[{b}] (image {b}) must be {'in ' if top is not None else ''}{bound}, got {v}")
    return values


def index_tensor(op: str, name: str, t, size: int) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != torch.int64:
        desc = f"{t.dtype} of shape {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{op}: {name} must be a 1-D int64 tensor, got {desc}")
    if t.shape[0] != size:
        raise ValueError(f"{op}: {name} has {t.shape[0]} entries but {size} were expected")


def finite(op: str, name: str, t: torch.Tensor, begins: Sequence[int]) -> None:
    """check_finite=True: names the first image with a NaN or Inf (reads the data: a sync)."""
    bad = ~torch.isfinite(t).all(dim=-1)
    if bool(bad.any()):
        row = int(torch.nonzero(bad)[0])
        image = max(b for b, start in enumerate(begins) if start <= row)
        raise ValueError(f"{op}: {name} of image {image} has a non-finite value (row {row})")


def balanced_topk_args(op: str, scores, cells, lengths_, budgets, cell_counts, cell_quotas):
    """Checks of balanced_topk (API and fake kernel); returns the int lists."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1 or scores.dtype != torch.float32:
        desc = f"{scores.dtype} of shape {list(scores.shape)}" if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise TypeError(f"{op}: scores must be a 1-D float32 tensor, got {desc}")
    index_tensor(op, "cells", cells, scores.shape[0])
    same_device(op, "scores", scores, "cells", cells)
    lengths_ = lengths(op, lengths_, scores.shape[0])
    budgets = per_image(op, "budgets", budgets, lengths_, high="length")
    cell_counts = per_image(op, "cell_counts", cell_counts, lengths_, high=1 << 26)
    if cell_quotas == "window":  # W-FastV: each window keeps at most ceil(K / #windows)
        cell_quotas = [math.ceil(k / c) for k, c in zip(budgets, cell_counts)]
    elif isinstance(cell_quotas, int):
        cell_quotas = [cell_quotas] * len(lengths_)
    cell_quotas = per_image(op, "cell_quotas", cell_quotas, lengths_)
    return lengths_, budgets, cell_counts, cell_quotas


def merge_args(op: str, tokens, keep_idx, lengths_, budgets, weight):
    """Checks of merge (API and fake kernel); returns the int lists."""
    float_tensor(op, "tokens", tokens, 2)
    lengths_ = lengths(op, lengths_, tokens.shape[0])
    budgets = per_image(op, "budgets", budgets, lengths_, high="length")
    index_tensor(op, "keep_idx", keep_idx, sum(budgets))
    same_device(op, "tokens", tokens, "keep_idx", keep_idx)
    merge_weight(op, weight)
    return lengths_, budgets
