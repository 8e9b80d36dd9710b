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

import functools
import operator
import struct
from typing import Callable, List, Sequence, Tuple

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
Pairs = List[Tuple[int, int]]
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
FLOAT32_MAX = 3.4028234663852886e38


# ---------------------------------------------------------------------------------------
# Bad input under torch.compile. While tracing, dynamo turns an exception into its own:
# one raised by an op's fake kernel into a TorchRuntimeError, one raised by traced Python
# (the API's normalisers) into Unsupported("Observed exception"), our message buried in
# its context; under fullgraph=True there is no eager fallback that would raise ours. The
# one exception type torch 2.14's dynamo lets through unwrapped is IndexError (utils.py
# run_node / convert_frame.py: dim out-of-range errors "reach the user as IndexError"). So
# under tracing a check's ValueError / TypeError is re-raised as a subclass that is also an
# IndexError: the user's `except ValueError` and the message are what eager gives.
# ---------------------------------------------------------------------------------------


class CompileValueError(ValueError, IndexError):
    """A ValueError of the checks, raised while torch.compile traces a call."""


class CompileTypeError(TypeError, IndexError):
    """A TypeError of the checks, raised while torch.compile traces a call."""


def _compile_error(is_type: bool, message: str) -> Exception:
    return (CompileTypeError if is_type else CompileValueError)(message)


def surfaced_under_compile(fake: Callable) -> Callable:
    """The fake kernel `fake`, with the checks' errors re-raised as Compile*Error."""

    @functools.wraps(fake)
    def run(*args, **kwargs):
        try:
            return fake(*args, **kwargs)
        except (CompileValueError, CompileTypeError):
            raise
        except (ValueError, TypeError) as e:
            raise _compile_error(isinstance(e, TypeError), str(e)) from None

    return run


@torch._dynamo.nonstrict_trace
def _raise_traced(is_type: bool, message: str) -> None:
    # nonstrict_trace: dynamo runs this for real while tracing (as it runs fake kernels),
    # so what it raises leaves dynamo as it is, not as an observed exception.
    raise _compile_error(is_type, message)


def api_errors(fn: Callable) -> Callable:
    """Decorates an API function: under torch.compile its ValueError / TypeError (raised
    by traced Python: normalisers) reaches the user as Compile*Error; eager: unchanged."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, TypeError) as e:
            if torch.compiler.is_compiling():
                _raise_traced(isinstance(e, TypeError), str(e))
            raise

    return run


def as_int(op: str, what: str, value) -> int:
    """An integer argument, never silently truncated (4.9 is an error, not 4), that fits
    the int64 the op schemas take (2**63 would otherwise fail inside torch's parser)."""
    if isinstance(value, bool):
        raise TypeError(f"{op}: {what} must be an int, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{op}: {what} must be an int, got {value!r}") from None
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{op}: {what} must fit in int64, got {value}")
    return value


def as_float(op: str, what: str, value) -> float:
    """A real-number argument as the double the ops receive ("0.5", None, tensors: errors)."""
    if isinstance(value, (str, bytes, bool, torch.Tensor)) or value is None:
        raise TypeError(f"{op}: {what} must be a float, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise TypeError(f"{op}: {what} must be a float, got {value!r}") from None


def host_list(op: str, name: str, values) -> list:
    """A host-side list argument: not a tensor (a sync), not a scalar or a string."""
    if isinstance(values, torch.Tensor):
        raise TypeError(f"{op}: {name} must be host-side ints (a list), not a tensor: reading a tensor would sync")
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{op}: {name} must be a list of ints, got {values!r}")
    try:
        return list(values)
    except TypeError:
        raise TypeError(f"{op}: {name} must be a list of ints, got {values!r}") from None


def int_list(op: str, name: str, values) -> List[int]:
    """A host-side int list argument, entry b named "name[b] (image b)"."""
    return [as_int(op, f"{name}[{b}] (image {b})", v) for b, v in enumerate(host_list(op, name, values))]


def image_end(op: str, name: str, tensor: str, b: int, h: int, w: int, begin: int, rows: int) -> int:
    """End row of image b (h x w rows from `begin`), rejected where checks.h's int64 would
    overflow (same rule, same message), so both layers accept exactly the same sizes."""
    end = begin + h * w
    if h * w > INT64_MAX or end > INT64_MAX:
        raise ValueError(
            f"{op}: image {b} of {name} ({h} x {w}) does not fit in {tensor} ({rows} rows): with the {begin} "
            "rows of the images before it, it overflows int64"
        )
    return end


def flat_grid(op: str, name: str, grids) -> List[int]:
    """[h0, w0, h1, w1, ...] or [(h0, w0), (h1, w1), ...] as the flat int list of the op
    schemas. Only the form is judged here; the sizes are the checkers' (grid_pairs)."""
    grids = host_list(op, name, grids)
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
    n = m = 0
    for b, ((h, w), (h_a, w_a)) in enumerate(zip(g, a)):
        n = image_end(op, "grids", "tokens", b, h, w, n, tokens.shape[0])
        m = image_end(op, "anchor_grids", "anchors", b, h_a, w_a, m, anchors.shape[0])
        if h * h_a > INT64_MAX or w * w_a > INT64_MAX:  # the cell map's products
            raise ValueError(
                f"{op}: grids and anchor_grids of image {b} ({h} x {w} over {h_a} x {w_a}) are too large: "
                "h * h_a and w * w_a must fit in int64"
            )
    if tokens.shape[0] != n:
        raise ValueError(
            f"{op}: tokens have N = {tokens.shape[0]} rows but grids describe {n} tokens "
            f"(sum of h * w over {len(g)} images)"
        )
    if anchors.shape[0] != m:
        raise ValueError(
            f"{op}: anchors have M = {anchors.shape[0]} rows but anchor_grids describe {m} anchors "
            f"(sum of h_a * w_a over {len(a)} images)"
        )
    return g, a


def ratio(op: str, keep_ratio: float, min_keep: int) -> Tuple[float, int]:
    """keep_ratio as the double the kernels compute K with, min_keep as an int64; returned."""
    min_keep = as_int(op, "min_keep", min_keep)
    keep_ratio = as_float(op, "keep_ratio", keep_ratio)
    if not (keep_ratio > 0.0 and keep_ratio <= 1.0):
        raise ValueError(f"{op}: keep_ratio must be a number in (0, 1], got {keep_ratio}")
    if min_keep < 1:
        raise ValueError(f"{op}: min_keep must be >= 1, got {min_keep}")
    return keep_ratio, min_keep


def merge_weight(op: str, weight: float) -> float:
    """merge_weight checked as the fp32 the kernels use (checks.h: same rule): 1e-300 rounds
    to 0 and 1e39 to inf in fp32, so both are errors although finite positive doubles."""
    weight = as_float(op, "merge_weight", weight)
    if not (weight > 0.0 and weight <= FLOAT32_MAX and struct.unpack("f", struct.pack("f", weight))[0] > 0.0):
        raise ValueError(
            f"{op}: merge_weight must be a finite positive float32 (in (0, 3.4e38], not 0 when rounded to "
            f"float32), got {weight}"
        )
    return weight


def lengths(op: str, lengths: Sequence[int], total: int) -> List[int]:
    lengths = int_list(op, "lengths", lengths)
    begin = 0
    for b, n in enumerate(lengths):
        if n <= 0:
            raise ValueError(f"{op}: lengths[{b}] (image {b}) must be positive, got {n}")
        begin = image_end(op, "lengths", "the input", b, 1, n, begin, total)
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


def kept_indices(op: str, keep_idx: torch.Tensor, lengths_: Sequence[int], budgets: Sequence[int]) -> None:
    """keep_idx strictly ascending within each image's [start, start + n): the cpu kernel's
    rule and message (csrc/cpu/merge.cpp). Reads the values: on a device tensor that is a
    host sync; while tracing (fake tensors, no values) it does nothing."""
    from torch._subclasses.fake_tensor import is_fake

    if keep_idx.numel() == 0 or is_fake(keep_idx):
        return
    device = keep_idx.device
    starts_ = starts(lengths_)
    k = torch.tensor(budgets, device=device)
    first = torch.repeat_interleave(torch.tensor(starts_, device=device), k)
    end = first + torch.repeat_interleave(torch.tensor(list(lengths_), device=device), k)
    # The previous kept index of the same image; before an image's first, its start - 1.
    prev = torch.cat([keep_idx.new_full((1,), -1), keep_idx[:-1]])
    image_first = torch.zeros_like(keep_idx, dtype=torch.bool)
    image_first[torch.cumsum(k, 0)[:-1]] = True
    image_first[0] = True
    prev = torch.where(image_first, first - 1, prev)
    bad = (keep_idx <= prev) | (keep_idx >= end)
    if bool(bad.any()):
        pos = int(torch.nonzero(bad)[0])
        b = max(i for i, kb in enumerate(starts(budgets)) if kb <= pos)
        raise ValueError(
            f"{op}: keep_idx of image {b} must be strictly ascending within [{starts_[b]}, "
            f"{starts_[b] + lengths_[b]}), got {int(keep_idx[pos])} at position {pos}"
        )


def starts(values: Sequence[int]) -> List[int]:
    """Exclusive prefix sums: where each image's run begins."""
    out = [0]
    for v in values[:-1]:
        out.append(out[-1] + v)
    return out


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
    if isinstance(quota, (str, bytes, bool)) or not hasattr(quota, "__index__"):
        raise TypeError(f"{op}: quota must be an int, a list of ints (one per image) or 'window', got {quota!r}")
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
