"""Properties over random small geometries (hypothesis): the op contract of SPEC.md §3-§6
must hold for any grids, anchor grids, D, keep_ratio, min_keep and merge_weight."""
import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

import g2tr_kernels as g2tr
from g2tr_kernels import reference

from helpers import (
    DTYPES,
    MERGED_TOL,
    assert_bitwise_equal,
    assert_close_report,
    assert_merge_matches,
    assert_reduce_matches,
    check_structure,
    kernel_device,
    lengths_of,
    make_ternary_workload,
    make_workload,
    merge_from_assign,
    offsets,
    spec_budget,
    spec_cells,
    spec_selection,
)


@st.composite
def reduce_cases(draw):
    b = draw(st.integers(1, 3))
    grids = [(draw(st.integers(1, 12)), draw(st.integers(1, 12))) for _ in range(b)]
    anchor_grids = [(draw(st.integers(1, 10)), draw(st.integers(1, 10))) for _ in range(b)]
    case = dict(
        grids=grids,
        anchor_grids=anchor_grids,
        d=draw(st.integers(1, 40)),
        keep_ratio=draw(st.sampled_from([0.25, 0.5, 0.75, 1.0]) | st.floats(0.0, 1.0, exclude_min=True)),
        min_keep=draw(st.integers(1, 40)),
        merge_weight=draw(st.sampled_from([1.0, 0.5, 3.0]) | st.floats(0.05, 20.0)),
        dtype=draw(st.sampled_from(DTYPES)),
        seed=draw(st.integers(0, 2**16)),
        # +-1 rows: exact, tie-heavy scores and similarities
        ternary=draw(st.booleans()),
    )
    note(f"case {case}")
    return case


def run(case, backend, device="cpu"):
    make = make_ternary_workload if case["ternary"] else make_workload
    d = max(case["d"], 4) if case["ternary"] else case["d"]
    tokens, anchors = make(case["grids"], case["anchor_grids"], d, case["dtype"], seed=case["seed"], device=device)
    out = g2tr.reduce(tokens, anchors, case["grids"], case["anchor_grids"], case["keep_ratio"], case["min_keep"],
                      case["merge_weight"], backend=backend)
    return tokens, anchors, out


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@given(case=reduce_cases())
def test_reduce_contract(backend, case):
    tokens, anchors, out = run(case, backend)
    lengths = lengths_of(case["grids"])
    budgets = [spec_budget(n, case["keep_ratio"], case["min_keep"]) for n in lengths]
    # Sizes K_b follow the budgets; keep_idx ascending within each image; assign sends kept
    # tokens to their own row and every token to a row of its own image.
    check_structure(out, case["grids"], budgets)
    assert out.merged.shape == (sum(budgets), tokens.shape[1]) and out.merged.dtype == tokens.dtype
    t_off, k_off = offsets(lengths), offsets(budgets)
    for b, ((h, w), (h_a, w_a)) in enumerate(zip(case["grids"], case["anchor_grids"])):
        cells = spec_cells(h, w, h_a, w_a)
        occupied = set(cells)
        kept_cells = [cells[i - t_off[b]] for i in out.keep_idx[k_off[b] : k_off[b + 1]].tolist()]
        if budgets[b] >= len(occupied):
            assert set(kept_cells) == occupied, f"image {b}: an occupied cell kept no token"
        if budgets[b] <= len(occupied):
            assert len(set(kept_cells)) == len(kept_cells), f"image {b}: two kept tokens share a cell"
    # merged is the mean its own assignment implies.
    assert_close_report("merged", out.merged, merge_from_assign(tokens, out.keep_idx, out.assign, case["merge_weight"]),
                        **MERGED_TOL[case["dtype"]])


@kernel_device
@given(case=reduce_cases())
def test_kernel_matches_reference(kernel, device, case):
    tokens, anchors, out = run(case, kernel, device)
    assert_reduce_matches(out, tokens, anchors, case["grids"], case["anchor_grids"], case["keep_ratio"],
                          case["min_keep"], case["merge_weight"])
    if case["ternary"]:
        # Exact inputs leave no room for rounding: bit for bit.
        _, _, want = run(case, "reference", device)
        for field in g2tr.ReduceOutput._fields:
            assert_bitwise_equal(field, getattr(out, field).cpu(), getattr(want, field).cpu())


@given(case=reduce_cases())
def test_reference_selection_is_the_spec_wording(case):
    tokens, anchors, out = run(case, "reference")
    lengths = lengths_of(case["grids"])
    budgets = [spec_budget(n, case["keep_ratio"], case["min_keep"]) for n in lengths]
    t_off, k_off = offsets(lengths), offsets(budgets)
    for b, ((h, w), (h_a, w_a)) in enumerate(zip(case["grids"], case["anchor_grids"])):
        scores = out.scores[t_off[b] : t_off[b + 1]].tolist()
        want = spec_selection(scores, spec_cells(h, w, h_a, w_a), budgets[b], h_a * w_a)
        assert [i - t_off[b] for i in out.keep_idx[k_off[b] : k_off[b + 1]].tolist()] == want, f"image {b}"


# Ratios k / 2^s put n * ratio on exact halves often, where half-to-even matters.
dyadic_ratios = st.integers(0, 8).flatmap(lambda s: st.integers(1, 2**s).map(lambda k: k / 2**s))


@given(n=st.integers(1, 3000), keep_ratio=dyadic_ratios | st.floats(0.0, 1.0, exclude_min=True),
       min_keep=st.integers(1, 50))
def test_budget_rounding_agrees_between_python_and_cpp(n, keep_ratio, min_keep):
    # The C++ budget (csrc/include/g2tr/common.h) shows in the output size; it must be
    # Python's round() of the double product, as the Python API and the fakes compute it.
    k = spec_budget(n, keep_ratio, min_keep)
    assert g2tr.budgets([n], keep_ratio, min_keep) == [k]
    out = g2tr.reduce(torch.ones(n, 1), torch.ones(1, 1), [(1, n)], [(1, 1)], keep_ratio, min_keep, backend="cpu")
    assert out.cu_seqlens.tolist() == [0, k]


@st.composite
def topk_cases(draw):
    b = draw(st.integers(0, 4))
    lengths = [draw(st.integers(1, 60)) for _ in range(b)]
    budgets = [draw(st.integers(1, n)) for n in lengths]
    cell_counts = [draw(st.integers(1, 20)) for _ in range(b)]
    value = st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 0.5, -0.5, 1.0]) | st.floats(
        -1.0, 1.0, width=32)
    scores = [draw(value) for _ in range(sum(lengths))]
    cells = [draw(st.integers(-1, c)) for n, c in zip(lengths, cell_counts) for _ in range(n)]
    quota = draw(st.sampled_from(["window", 1]) | st.lists(st.integers(1, 5), min_size=b, max_size=b))
    return torch.tensor(scores, dtype=torch.float32), torch.tensor(cells, dtype=torch.int64), lengths, budgets, \
        cell_counts, quota


@kernel_device
@given(case=topk_cases())
def test_balanced_topk_kernel_equals_reference(kernel, device, case):
    scores, cells, lengths, budgets, cell_counts, quota = case
    got = g2tr.balanced_topk(scores.to(device), cells.to(device), lengths, budgets, cell_counts, quota,
                             backend=kernel)
    want = g2tr.balanced_topk(scores, cells, lengths, budgets, cell_counts, quota, backend="reference")
    assert_bitwise_equal("keep_idx", got.cpu(), want)
    t_off, k_off = offsets(lengths), offsets(budgets)
    for b in range(len(lengths)):
        kb = want[k_off[b] : k_off[b + 1]]
        assert bool((kb >= t_off[b]).all() and (kb < t_off[b + 1]).all() and (kb[1:] > kb[:-1]).all())
        if quota == 1:
            want_b = spec_selection(scores[t_off[b] : t_off[b + 1]].tolist(), cells[t_off[b] : t_off[b + 1]].tolist(),
                                    budgets[b], cell_counts[b])
            assert (kb - t_off[b]).tolist() == want_b, f"image {b}"


@st.composite
def merge_cases(draw):
    b = draw(st.integers(1, 3))
    lengths = [draw(st.integers(1, 80)) for _ in range(b)]
    keep, budgets, start = [], [], 0
    for n in lengths:
        kept = sorted(draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n)))
        keep.extend(i + start for i in kept)
        budgets.append(len(kept))
        start += n
    return dict(lengths=lengths, keep=keep, budgets=budgets, d=draw(st.integers(1, 40)),
                dtype=draw(st.sampled_from(DTYPES)), merge_weight=draw(st.floats(0.05, 20.0)),
                seed=draw(st.integers(0, 2**16)))


@kernel_device
@given(case=merge_cases())
def test_merge_kernel_matches_reference(kernel, device, case):
    gen = torch.Generator().manual_seed(case["seed"])
    tokens = torch.randn(sum(case["lengths"]), case["d"], generator=gen).to(case["dtype"])
    keep = torch.tensor(case["keep"], dtype=torch.int64)
    merged, assign = g2tr.merge(tokens.to(device), keep.to(device), case["lengths"], case["budgets"],
                                case["merge_weight"], backend=kernel)
    assert_merge_matches("merge", tokens, keep, merged.cpu(), assign.cpu(), case["lengths"], case["budgets"],
                         case["merge_weight"])
    want = reference.merge(tokens, keep, case["lengths"], case["budgets"], case["merge_weight"])
    assert want[0].dtype == tokens.dtype
