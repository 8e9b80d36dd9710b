"""Shared test utilities: workloads, tolerances, a literal SPEC.md selection, and a
tie-aware comparison of kernel outputs with the reference that reports where and by how much.

Kernel scores are fp32 sums taken in another order than the reference's, so two tokens whose
scores (or merge similarities) sit within rounding of each other may legitimately swap. The
comparison accepts exactly that and nothing more: the kernel's selection must be the exact
G2TR selection of its own scores, its scores must be within SCORE_ATOL of the reference, a
differing merge target must be no worse than the reference's by more than SIM_TOL (cosine in
fp64), and merged rows must be the mean the kernel's own assignment implies.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import pytest
import torch

import g2tr_kernels as g2tr
from g2tr_kernels import reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

Pairs = List[Tuple[int, int]]

# Small versions of the SHAPES.md workloads: same grids and anchor grids (the geometry is
# what the selection sees), fewer images where the count only repeats, and a small D.
WORKLOADS: Dict[str, Tuple[Pairs, Pairs, int]] = {
    "S1": ([(16, 16)] * 4, [(32, 32)] * 4, 64),
    "S2": ([(37, 37)] * 2, [(16, 16)] * 2, 96),
    "M1": ([(70, 70)], [(32, 32)], 128),
    "M2": (
        [(70, 70), (52, 70), (70, 52), (39, 70), (37, 37), (27, 27)],
        [(32, 32), (24, 32), (32, 24), (18, 32), (16, 16), (16, 16)],
        64,
    ),
    "L2": (
        [(70, 70), (52, 70), (70, 52), (39, 70)] * 2,
        [(32, 32), (24, 32), (32, 24), (18, 32)] * 2,
        32,
    ),
}

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


def kernel_backend(device) -> str:
    """The native backend to compare with the reference on a device."""
    return "cpu" if torch.device(device).type == "cpu" else "auto"


# ---------------------------------------------------------------------------- workloads


def lengths_of(grids: Sequence[Tuple[int, int]]) -> List[int]:
    return [h * w for h, w in grids]


def offsets(lengths: Sequence[int]) -> List[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def image_of(lengths: Sequence[int]) -> torch.Tensor:
    """Image index of every packed row."""
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.int64))


def make_workload(grids, anchor_grids, d, dtype=torch.float32, seed=0, device="cpu", correlated=True):
    """Random packed tokens [N, D] and anchors [M, D].

    correlated=True makes each token lean towards the anchor of its cell (as real ViT tokens
    lean towards the VAE content), so scores spread over (-1, 1) instead of clustering at 0.
    """
    gen = torch.Generator().manual_seed(seed)
    n = sum(h * w for h, w in grids)
    m = sum(h * w for h, w in anchor_grids)
    anchors = torch.randn(m, d, generator=gen)
    tokens = torch.randn(n, d, generator=gen)
    if correlated and n:
        lean = torch.rand(n, 1, generator=gen) * 2.0
        tokens += lean * anchors[global_cells(grids, anchor_grids)]
    return tokens.to(dtype).to(device), anchors.to(dtype).to(device)


def make_ternary_workload(grids, anchor_grids, d=16, dtype=torch.float32, seed=0, device="cpu", nonzeros=4):
    """Rows of +-1 in `nonzeros` places and 0 elsewhere: with 4 of them every norm is 2, every
    cosine is a multiple of 1/4 and every sum is exact in any order. Ties everywhere, and all
    backends must agree on them bit for bit."""
    gen = torch.Generator().manual_seed(seed)

    def rows(count):
        out = torch.zeros(count, d)
        if count:
            where = torch.rand(count, d, generator=gen).argsort(dim=1)[:, :nonzeros]
            signs = torch.randint(0, 2, (count, nonzeros), generator=gen).float() * 2 - 1
            out.scatter_(1, where, signs)
        return out

    tokens = rows(sum(h * w for h, w in grids))
    anchors = rows(sum(h * w for h, w in anchor_grids))
    return tokens.to(dtype).to(device), anchors.to(dtype).to(device)


def spec_cells(h: int, w: int, h_a: int, w_a: int) -> List[int]:
    """SPEC.md §3 cell map, written out in plain Python."""
    out = []
    for i in range(h * w):
        r, c = divmod(i, w)
        a_r = min(r * h_a // h, h_a - 1)
        a_c = min(c * w_a // w, w_a - 1)
        out.append(a_r * w_a + a_c)
    return out


def local_cells(grids, anchor_grids) -> torch.Tensor:
    """Cell id of every packed token, local to its image (what anchor_scores returns)."""
    out = []
    for (h, w), (h_a, w_a) in zip(grids, anchor_grids):
        out.extend(spec_cells(h, w, h_a, w_a))
    return torch.tensor(out, dtype=torch.int64)


def global_cells(grids, anchor_grids) -> torch.Tensor:
    """Packed anchor row of every token."""
    out, a0 = [], 0
    for (h, w), (h_a, w_a) in zip(grids, anchor_grids):
        out.extend(c + a0 for c in spec_cells(h, w, h_a, w_a))
        a0 += h_a * w_a
    return torch.tensor(out, dtype=torch.int64)


def spec_budget(n: int, keep_ratio: float, min_keep: int) -> int:
    return min(n, max(min_keep, round(n * keep_ratio)))


def spec_selection(scores: Sequence[float], cells: Sequence[int], k: int, num_cells: int) -> List[int]:
    """SPEC.md §3 selection of one image in its own words (quota 1), as an independent check
    of the reference's one-pass formulation: the best token of every occupied cell; the cells
    ranked by that best score; seeds of the top min(K, #occupied); fill with the best of the
    rest. Ties to the lower index, NaN below everything. Returns local indices, ascending."""

    def key(i):
        s = float(scores[i])
        return (-(s if s == s else -math.inf), i)

    best: Dict[int, int] = {}
    for i in sorted(range(len(scores)), key=key):
        c = int(cells[i])
        if 0 <= c < num_cells and c not in best:
            best[c] = i
    seeds = sorted(best.values(), key=key)[: min(k, len(best))]
    taken = set(seeds)
    for i in sorted(range(len(scores)), key=key):
        if len(taken) >= k:
            break
        taken.add(i)
    return sorted(taken)


def cosine64(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine in fp64 with normalize's eps, of the values as stored."""
    x = x.double()
    y = y.double()
    nx = x.norm(dim=-1).clamp_min(1e-12)
    ny = y.norm(dim=-1).clamp_min(1e-12)
    return (x * y).sum(-1) / (nx * ny)


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
    budgets_ = [spec_budget(n, keep_ratio, min_keep) for n in lengths]
    check_structure(out, grids, budgets_)
    t_cpu, a_cpu = tokens.detach().cpu(), anchors.detach().cpu()
    exp = g2tr.ReduceOutput(*reference.reduce(t_cpu, a_cpu, grids, anchor_grids, keep_ratio, min_keep, merge_weight))
    assert_bitwise_equal(f"{name}: cu_seqlens", out.cu_seqlens.cpu(), exp.cu_seqlens)
    assert_close_report(f"{name}: scores", out.scores.cpu(), exp.scores, atol=SCORE_ATOL, rtol=0)
    cells = local_cells(grids, anchor_grids)
    cell_counts = [h * w for h, w in anchor_grids]
    assert_selection_matches(f"{name}: keep_idx", out.keep_idx, out.scores, cells, lengths, budgets_, cell_counts,
                             [1] * len(lengths), exp.keep_idx)
    same_keep = torch.equal(out.keep_idx.cpu(), exp.keep_idx)
    expected_merge = (exp.merged, exp.assign) if same_keep else None
    assert_merge_matches(name, t_cpu, out.keep_idx.cpu(), out.merged, out.assign, lengths, budgets_, merge_weight,
                         expected_merge)


def assert_outputs_bitwise_equal(name, actual, expected) -> None:
    for field in g2tr.ReduceOutput._fields:
        assert_bitwise_equal(f"{name}: {field}", getattr(actual, field), getattr(expected, field))


def occupied_cells(grids, anchor_grids) -> List[int]:
    return [len(set(spec_cells(h, w, ha, wa))) for (h, w), (ha, wa) in zip(grids, anchor_grids)]


def dtype_id(dtype: Optional[torch.dtype]) -> str:
    return DTYPE_IDS.get(dtype, str(dtype))


# (backend, device) pairs every handcrafted case runs on: the oracle itself and each kernel.
BACKEND_DEVICES = [("reference", "cpu"), ("cpu", "cpu")] + (
    [("reference", "cuda"), ("auto", "cuda")] if torch.cuda.is_available() else []
)
BACKEND_DEVICE_IDS = [f"{b}-{d}" for b, d in BACKEND_DEVICES]
# The parametrizations the op test files share.
backend_device = pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_IDS[d] for d in DTYPES])


def tiny_vae():
    """A random-weight AutoencoderKL from a config (nothing downloaded); it downsamples by 2."""
    AutoencoderKL = pytest.importorskip("diffusers").AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, sample_size=32,
    ).eval()
