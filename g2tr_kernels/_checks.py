"""Argument checks of the reference path, the Triton ops and the fake kernels, and the
normalisers of the Python API.

The checkers (one per op: anchor_scores_args, balanced_topk_args, merge_args, reduce_args) say what
csrc/include/g2tr/checks.h says for the native ops: the same rules, the same exception
types (TORCH_CHECK_VALUE -> ValueError, TORCH_CHECK_TYPE -> TypeError) and messages, the
argument and the image named. Each call is checked once, by the path that runs it
(_registry.py). The normalisers (as_int, as_float, int_list, grid_pairs' flat form,
cell_quotas) only turn the API's argument forms into the op schemas'. Only host-side values
are read here (shapes, dtypes, the int lists), so nothing syncs with a device.
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


def as_float(op: str, what: str, value) -> float:
    """A real-number argument as the double the ops receive."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{op}: {what} must be a float, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: {what} must be a float, got {value!r}") from None


def int_list(op: str, name: str, values) -> List[int]:
    """A host-side int list argument, entry b named "name[b] (image b)"."""
    if isinstance(values, torch.Tensor):
        raise TypeError(f"{op}: {name} must be host-side ints (a list), not a tensor: reading a tensor would sync")
    return [as_int(op, f"{name}[{b}] (image {b})", v) for b, v in enumerate(values)]


def flat_grid(op: str, name: str, grids) -> List[int]:
    """[h0, w0, h1, w1, ...] or [(h0, w0), (h1, w1), ...] as the flat int list of the op
    schemas. Only the form is judged here; the sizes are the checkers' (grid_pairs)."""
    if isinstance(grids, torch.Tensor):
        raise TypeError(f"{op}: {name} must be host-side ints (a list), not a tensor: reading a tensor would sync")
    grids = list(grids)
    if grids and all(isinstance(g, (tuple, list)) for g in grids):
        out = []
        for b, g in enumerate(grids):
            if len(g) != 2:
                raise ValueError(f"{op}: {name} of image {b} must be an (h, w) pair, got {tuple(g)}")
            out += [as_int(op, f"{name} of image {b}", g[0]), as_int(op, f"{name} of image {b}", g[1])]
        return out
    return [as_int(op, f"{name} of image {i // 2}", v) for i, v in enumerate(grids)]


def grid_pairs(op: str, name: str, grids) -> Pairs:
    """Accepts [h0, w0, h1, w1, ...] or [(h0, w0), (h1, w1), ...]; returns checked pairs."""
    grids = flat_grid(op, name, grids)
    if len(grids) % 2:
        raise ValueError(f"{op}: {name} must hold one (h, w) pair per image, got {len(grids)} ints")
    pairs = list(zip(grids[0::2], grids[1::2]))
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
    lengths = int_list(op, "lengths", lengths)
    for b, n in enumerate(lengths):
        if n <= 0:
            raise ValueError(f"{op}: lengths[{b}] (image {b}) must be positive, got {n}")
    if sum(lengths) != total:
        raise ValueError(f"{op}: the input has {total} tokens but lengths sum to {sum(lengths)}")
    return lengths


def per_image(op: str, name: str, values: Sequence[int], lengths_: Sequence[int], low: int = 1, high=None) -> List[int]:
    values = int_list(op, name, values)
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


def cell_quotas(op: str, quota, budgets: Sequence[int], cell_counts: Sequence[int]) -> List[int]:
    """The API's quota as the op's cell_quotas, one int per image: an int for every image, a
    list, or "window" (W-FastV: each window keeps at most ceil(K / #windows)). A cell count
    that the checker will reject gets quota 1 here, so that the checker is the one to name it."""
    if isinstance(quota, str) and quota == "window":
        return [-(-k // c) if c > 0 else 1 for k, c in zip(budgets, cell_counts)]
    if isinstance(quota, (list, tuple, torch.Tensor)):
        return int_list(op, "cell_quotas", quota)
    return [as_int(op, "quota", quota)] * len(budgets)


def balanced_topk_args(op: str, scores, cells, lengths_, budgets, cell_counts, cell_quotas):
    """The checker of balanced_topk (checks.h check_balanced_topk); returns the int lists."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1 or scores.dtype != torch.float32:
        desc = f"{scores.dtype} of shape {list(scores.shape)}" if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise TypeError(f"{op}: scores must be a 1-D float32 tensor, got {desc}")
    index_tensor(op, "cells", cells, scores.shape[0])
    same_device(op, "scores", scores, "cells", cells)
    lengths_ = lengths(op, lengths_, scores.shape[0])
    budgets = per_image(op, "budgets", budgets, lengths_, high="length")
    cell_counts = per_image(op, "cell_counts", cell_counts, lengths_, high=1 << 26)
    cell_quotas = per_image(op, "cell_quotas", cell_quotas, lengths_)
    return lengths_, budgets, cell_counts, cell_quotas


def merge_args(op: str, tokens, keep_idx, lengths_, budgets, weight):
    """The checker of merge (checks.h check_merge); returns the int lists."""
    float_tensor(op, "tokens", tokens, 2)
    lengths_ = lengths(op, lengths_, tokens.shape[0])
    budgets = per_image(op, "budgets", budgets, lengths_, high="length")
    index_tensor(op, "keep_idx", keep_idx, sum(budgets))
    same_device(op, "tokens", tokens, "keep_idx", keep_idx)
    merge_weight(op, weight)
    return lengths_, budgets


def anchor_scores_args(op: str, tokens, anchors, grids, anchor_grids) -> Tuple[Pairs, Pairs]:
    """The checker of anchor_scores (checks.h check_images); returns the grid pairs."""
    return images(op, tokens, anchors, grids, anchor_grids)


def reduce_args(op: str, tokens, anchors, grids, anchor_grids, keep_ratio, min_keep, weight) -> Tuple[Pairs, Pairs]:
    """The checker of reduce (checks.h check_reduce); returns the grid pairs."""
    pairs = images(op, tokens, anchors, grids, anchor_grids)
    ratio(op, keep_ratio, min_keep)
    merge_weight(op, weight)
    return pairs
