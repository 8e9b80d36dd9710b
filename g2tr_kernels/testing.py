"""Comparing G2TR outputs: the tolerance table and the assert_*_matches helpers that
tests/, benchmarks/ and `g2tr bench` share; failures say where and by how much.

Kernel scores are fp32 sums taken in another order than the reference's, so two tokens whose
scores (or merge similarities) sit within rounding of each other may legitimately swap
(docs/SPEC.md §3). The comparisons accept exactly that and nothing more: a kernel's selection
must be the exact G2TR selection of its own scores, its scores must be within SCORE_ATOL of
the reference, a differing merge target must be no worse than the reference's by more than
SIM_TOL (cosine in fp64), and merged rows must be the mean the kernel's own assignment implies.

    from g2tr_kernels import testing
    testing.assert_reduce_matches(out, tokens, anchors, grids, anchor_grids)  # grids as (h, w) pairs
"""
from __future__ import annotations

import itertools
import math
from typing import List, Optional, Sequence, Tuple

import torch

from . import reference
from .ops import ReduceOutput
from .reference.anchor_scores import NORM_EPS
from .reference.budget import budget, cell_ids

# Scores and merge similarities are fp32 results of the same (dtype-rounded) inputs on every
# backend; only the summation order differs.
SCORE_ATOL = 3e-5
SIM_TOL = 3e-5
# merged is written in the input dtype: one rounding of an fp32 value that may itself differ
# in its last bits, so allow about one ulp of the output dtype.
MERGED_TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


# ---------------------------------------------------------------------------- geometry


def lengths_of(grids: Sequence[Tuple[int, int]]) -> List[int]:
    return [h * w for h, w in grids]


def offsets(lengths: Sequence[int]) -> List[int]:
    """Where each image's run begins in a packed array: [0, n0, n0 + n1, ..., sum]."""
    return list(itertools.accumulate(lengths, initial=0))


def image_of(lengths: Sequence[int]) -> torch.Tensor:
    """Image index of every packed row."""
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.int64))


def cosine64(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine in fp64 with normalize's eps, of the values as stored."""
    x = x.double()
    y = y.double()
    nx = x.norm(dim=-1).clamp_min(NORM_EPS)
    ny = y.norm(dim=-1).clamp_min(NORM_EPS)
    return (x * y).sum(-1) / (nx * ny)


# ---------------------------------------------------------------------------- measures (g2tr bench)


def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> Optional[float]:
    """Largest |actual - expected| in fp32; None when the shapes differ."""
    if actual.shape != expected.shape:
        return None
    if actual.numel() == 0:
        return 0.0
    return float((actual.float() - expected.float()).abs().max())


def count_different(actual: torch.Tensor, expected: torch.Tensor) -> Optional[int]:
    """Elements that differ; None when the shapes differ."""
    if actual.shape != expected.shape:
        return None
    return int((actual != expected).sum())


def missing_kept(keep_idx: torch.Tensor, expected_keep_idx: torch.Tensor) -> int:
    """Expected kept tokens this keep set lacks (0 iff the sets agree, for sets of one size)."""
    return int((~torch.isin(expected_keep_idx, keep_idx)).sum())


# ---------------------------------------------------------------------------- reports


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor, so NaNs and signed zeros compare exactly."""
    t = t.detach().cpu().contiguous()
    if t.is_floating_point():
        return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])
    return t


def assert_bitwise_equal(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {list(actual.shape)} != {list(expected.shape)}"
    a, e = bits(actual), bits(expected)
    if not torch.equal(a, e):
        raise AssertionError(mismatch_report(name, actual, expected, a != e))


def assert_close_report(name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> None:
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {list(actual.shape)} != {list(expected.shape)}"
    a = actual.detach().cpu().double()
    e = expected.detach().cpu().double()
    bad = ~torch.isclose(a, e, atol=atol, rtol=rtol, equal_nan=True)
    if bool(bad.any()):
        raise AssertionError(mismatch_report(name, actual, expected, bad, f" (atol={atol:g}, rtol={rtol:g})"))


def mismatch_report(name, actual, expected, bad: torch.Tensor, tol: str = "", limit: int = 8) -> str:
    """Where and by how much: the count, the largest error, and the worst positions."""
    a = actual.detach().cpu()
    e = expected.detach().cpu()
    where = torch.nonzero(bad)
    lines = [f"{name}: {len(where)} of {bad.numel()} elements differ{tol}"]
    if a.is_floating_point() or a.is_complex():
        diff = (a.double() - e.double()).abs()
        diff = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff)
        lines[0] += f"; max |diff| {float(diff[bad].max()):.3e}"
        order = diff[bad].argsort(descending=True)[:limit]
        where = where[order]
    for idx in where[:limit].tolist():
        idx = tuple(idx)
        va, ve = a[idx].item(), e[idx].item()
        extra = f" |diff| {abs(va - ve):.3e}" if isinstance(va, float) else ""
        lines.append(f"  at {list(idx)}: actual {va!r}, expected {ve!r}{extra}")
    return "\n".join(lines)


def check_structure(out, grids, budgets_) -> None:
    """Invariants every backend owes regardless of the data (SPEC.md §3, §6)."""
    lengths = lengths_of(grids)
    t_off, k_off = offsets(lengths), offsets(budgets_)
    keep, assign, cu = out.keep_idx.cpu(), out.assign.cpu(), out.cu_seqlens.cpu()
    assert cu.dtype == torch.int32 and cu.tolist() == k_off, f"cu_seqlens {cu.tolist()} != {k_off}"
    assert keep.dtype == torch.int64 and keep.shape == (k_off[-1],)
    assert assign.dtype == torch.int64 and assign.shape == (t_off[-1],)
    assert out.scores.dtype == torch.float32 and out.scores.shape == (t_off[-1],)
    for b in range(len(lengths)):
        kb = keep[k_off[b] : k_off[b + 1]]
        assert bool((kb >= t_off[b]).all() and (kb < t_off[b + 1]).all()), f"image {b}: keep_idx outside the image"
        assert bool((kb[1:] > kb[:-1]).all()), f"image {b}: keep_idx not strictly ascending: {kb.tolist()}"
        ab = assign[t_off[b] : t_off[b + 1]]
        assert bool((ab >= k_off[b]).all() and (ab < k_off[b + 1]).all()), f"image {b}: assign leaves the image"
        rows = torch.arange(k_off[b], k_off[b + 1])
        assert torch.equal(assign[kb], rows), f"image {b}: a kept token is not assigned to its own row"


def merge_from_assign(tokens, keep_idx, assign, merge_weight) -> torch.Tensor:
    """The merged rows a given assignment implies, accumulated as SPEC.md §4 says: fp32,
    merge_weight * v_k first, then absorbed tokens in ascending index order."""
    x = tokens.detach().cpu().float()
    keep = keep_idx.cpu()
    assign = assign.cpu()
    is_kept = torch.zeros(x.shape[0], dtype=torch.bool)
    is_kept[keep] = True
    dropped = torch.nonzero(~is_kept).squeeze(1)
    total = x[keep] * merge_weight
    total.index_add_(0, assign[dropped], x[dropped])
    count = torch.full((keep.numel(),), float(merge_weight))
    count.index_add_(0, assign[dropped], torch.ones(dropped.numel()))
    return (total / count[:, None]).to(tokens.dtype)


def assert_selection_matches(name, keep, scores, cells, lengths, budgets_, cell_counts, quotas, expected_keep):
    """keep_idx equal to the reference's, or, where scores differ in their last bits, equal to
    the exact selection of the kernel's own scores (so only near-ties may have swapped)."""
    keep = keep.cpu()
    if torch.equal(keep, expected_keep.cpu()):
        return
    own = reference.balanced_topk(scores.cpu(), cells.cpu(), lengths, budgets_, cell_counts, quotas)
    if torch.equal(keep, own):
        return
    lines = [f"{name}: the kernel's selection is neither the reference's nor the selection of its own scores"]
    k_off, t_off = offsets(budgets_), offsets(lengths)
    s = scores.cpu()
    for b in range(len(lengths)):
        got = set(keep[k_off[b] : k_off[b + 1]].tolist())
        want = set(own[k_off[b] : k_off[b + 1]].tolist())
        if got != want:
            only_got = sorted(got - want)[:6]
            only_want = sorted(want - got)[:6]
            lines.append(
                f"  image {b}: kept only by the kernel {[(i - t_off[b], float(s[i])) for i in only_got]}, "
                f"only by the rule {[(i - t_off[b], float(s[i])) for i in only_want]} (local index, kernel score)"
            )
    raise AssertionError("\n".join(lines))


def assert_merge_matches(name, tokens, keep_idx, merged, assign, lengths, budgets_, merge_weight, expected=None):
    """merged/assign of a kernel against the reference merge of the same keep set.

    A dropped token may join another kept token than the reference's only if its cosine with
    it (fp64) is within SIM_TOL of the reference choice's: a near-tie. merged must then be the
    mean that the kernel's own assignment implies."""
    if expected is None:
        expected = reference.merge(tokens, keep_idx, lengths, budgets_, merge_weight)
    exp_merged, exp_assign = expected
    assign_c, exp_assign_c = assign.cpu(), exp_assign.cpu()
    assert assign.dtype == torch.int64 and assign.shape == exp_assign.shape, f"{name}: assign dtype/shape"
    assert merged.dtype == tokens.dtype and merged.shape == exp_merged.shape, f"{name}: merged dtype/shape"
    keep = keep_idx.cpu()
    if not torch.equal(assign_c, exp_assign_c):
        t = tokens.detach().cpu()
        diff = torch.nonzero(assign_c != exp_assign_c).squeeze(1)
        img = image_of(lengths)
        k_off = offsets(budgets_)
        lo = torch.tensor(k_off[:-1])[img[diff]]
        hi = torch.tensor(k_off[1:])[img[diff]]
        got = assign_c[diff]
        inside = (got >= lo) & (got < hi)
        got_c = got.clamp(0, max(keep.numel() - 1, 0))
        sim_got = cosine64(t[diff], t[keep[got_c]])
        sim_exp = cosine64(t[diff], t[keep[exp_assign_c[diff]]])
        gap = sim_exp - sim_got
        finite = torch.isfinite(sim_exp) & torch.isfinite(sim_got)
        # A kept token must own its row, a target must be in the same image, and outside
        # near-ties (or with non-finite similarities, where the rule is exact) no change.
        ok = inside & finite & (gap <= SIM_TOL) & ~torch.isin(diff, keep)
        if not bool(ok.all()):
            lines = [f"{name}: {int((~ok).sum())} of {len(diff)} differing merge targets are not near-ties "
                     f"(SIM_TOL={SIM_TOL:g})"]
            for r in torch.nonzero(~ok).squeeze(1)[:8].tolist():
                j = int(diff[r])
                lines.append(
                    f"  token {j} (image {int(img[j])}): kernel row {int(got[r])} cos {float(sim_got[r]):.8f}, "
                    f"reference row {int(exp_assign_c[j])} cos {float(sim_exp[r]):.8f}, gap {float(gap[r]):.3e}"
                    + ("" if bool(inside[r]) else "  <- row outside the token's image")
                )
            raise AssertionError("\n".join(lines))
        exp_merged = merge_from_assign(tokens, keep_idx, assign_c, merge_weight)
    assert_close_report(f"{name}: merged", merged.cpu(), exp_merged.cpu(), **MERGED_TOL[tokens.dtype])


def assert_reduce_matches(out, tokens, anchors, grids, anchor_grids, keep_ratio=0.5, min_keep=32, merge_weight=1.0,
                          name="reduce"):
    """A kernel's ReduceOutput against the reference, tie-aware (see the module docstring)."""
    lengths = lengths_of(grids)
    budgets_ = [budget(n, keep_ratio, min_keep) for n in lengths]
    check_structure(out, grids, budgets_)
    t_cpu, a_cpu = tokens.detach().cpu(), anchors.detach().cpu()
    exp = ReduceOutput(*reference.reduce(t_cpu, a_cpu, grids, anchor_grids, keep_ratio, min_keep, merge_weight))
    assert_bitwise_equal(f"{name}: cu_seqlens", out.cu_seqlens.cpu(), exp.cu_seqlens)
    assert_close_report(f"{name}: scores", out.scores.cpu(), exp.scores, atol=SCORE_ATOL, rtol=0)
    cells = torch.cat([cell_ids(h, w, ha, wa) for (h, w), (ha, wa) in zip(grids, anchor_grids)] or
                      [torch.zeros(0, dtype=torch.int64)])
    cell_counts = [h * w for h, w in anchor_grids]
    assert_selection_matches(f"{name}: keep_idx", out.keep_idx, out.scores, cells, lengths, budgets_, cell_counts,
                             [1] * len(lengths), exp.keep_idx)
    same_keep = torch.equal(out.keep_idx.cpu(), exp.keep_idx)
    expected_merge = (exp.merged, exp.assign) if same_keep else None
    assert_merge_matches(name, t_cpu, out.keep_idx.cpu(), out.merged, out.assign, lengths, budgets_, merge_weight,
                         expected_merge)


def assert_outputs_bitwise_equal(name, actual, expected) -> None:
    for field in ReduceOutput._fields:
        assert_bitwise_equal(f"{name}: {field}", getattr(actual, field), getattr(expected, field))
