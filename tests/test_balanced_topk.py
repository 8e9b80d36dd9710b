"""g2tr_kernels.balanced_topk: per-cell quota in descending score order, then fill.

Selection reads fp32 scores only, so every backend must agree with the reference exactly,
ties and NaN included.
"""
import math

import pytest
import torch

import g2tr_kernels as g2tr
from g2tr_kernels import reference

from helpers import (
    SELECT_MAX_TOKENS,
    Case,
    assert_bitwise_equal,
    backend_device,
    kernel_device,
    offsets,
    setter,
    spec_selection,
    tensor_setter,
)

NAN, INF = float("nan"), float("inf")


def select(backend, device, scores, cells, lengths, budgets, cell_counts, quota=1):
    return g2tr.balanced_topk(
        torch.tensor(scores, dtype=torch.float32, device=device), torch.tensor(cells, dtype=torch.int64, device=device),
        lengths, budgets, cell_counts, quota, backend=backend,
    ).tolist()


@backend_device
@pytest.mark.parametrize(
    "k,kept",
    [
        (1, [0]),  # the best cell's seed
        (2, [0, 3]),  # seeds of cells 0 (.9) and 1 (.7), not the plain top-2 (.9, .8)
        (3, [0, 3, 4]),  # cell 2's best: 4 and 5 tie at .3, the lower index wins
        (4, [0, 1, 3, 4]),  # every cell seeded, fill takes .8
        (5, [0, 1, 3, 4, 5]),  # then .3 (token 5) before .1 (token 2)
        (6, [0, 1, 2, 3, 4, 5]),
    ],
)
def test_one_seed_per_cell_by_hand(backend, device, k, kept):
    #          token:  0    1    2    3    4    5
    scores = [0.9, 0.8, 0.1, 0.7, 0.3, 0.3]
    cells = [0, 0, 1, 1, 2, 2]
    assert select(backend, device, scores, cells, [6], [k], [3]) == kept


@backend_device
@pytest.mark.parametrize(
    "k,quota,kept",
    [
        (4, "window", [0, 1, 4, 5]),  # ceil(4 / 2) = 2 per window, though the top 4 all sit in window 0
        (5, "window", [0, 1, 2, 4, 5]),  # ceil(5 / 2) = 3
        (3, "window", [0, 1, 4]),  # ceil(3 / 2) = 2
        (3, 2, [0, 1, 4]),
        (3, 3, [0, 1, 2]),
        (7, 2, [0, 1, 2, 3, 4, 5, 6]),  # quota filled (0, 1, 4, 5), then fill 2, 3, 6
        (2, 8, [0, 1]),  # a quota above the window size is plain top-K
    ],
)
def test_window_quota_by_hand(backend, device, k, quota, kept):
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    cells = [0, 0, 0, 0, 1, 1, 1, 1]
    assert select(backend, device, scores, cells, [8], [k], [2], quota) == kept


@backend_device
def test_window_quota_per_image(backend, device):
    # Image 0: K 4 over 2 windows -> quota 2. Image 1: K 3 over 3 windows -> quota 1.
    scores = [0.9, 0.8, 0.7, 0.1, 0.2, 0.3] + [0.9, 0.8, 0.7, 0.1, 0.2, 0.3]
    cells = [0, 0, 0, 1, 1, 1] + [0, 0, 1, 1, 2, 2]
    got = select(backend, device, scores, cells, [6, 6], [4, 3], [2, 3], "window")
    assert got == [0, 1, 4, 5] + [6, 8, 11]
    # Explicit per-image quotas, the other way round.
    got = select(backend, device, scores, cells, [6, 6], [4, 3], [2, 3], [1, 2])
    assert got == [0, 1, 2, 5] + [6, 7, 8]


@backend_device
def test_cells_minus_one_is_fill_only(backend, device):
    # No valid cell: the selection is the plain top-K (ties to the lower index, NaN last).
    scores = [0.1, 0.5, 0.5, 0.9, NAN, 0.2]
    cells = [-1] * 6
    assert select(backend, device, scores, cells, [6], [3], [1]) == [1, 2, 3]
    assert select(backend, device, scores, cells, [6], [5], [4]) == [0, 1, 2, 3, 5]
    assert select(backend, device, scores, cells, [6], [6], [4]) == [0, 1, 2, 3, 4, 5]


@backend_device
def test_cells_outside_the_range_take_part_in_the_fill_only(backend, device):
    # Tokens 0 and 1 score best but sit in no valid cell (-1, and 2 >= cell_counts = 2):
    # with K = 2 the seeds of cells 0 and 1 come first.
    scores = [0.9, 0.8, 0.1, 0.2, 0.3]
    cells = [-1, 2, 0, 1, 1]
    assert select(backend, device, scores, cells, [5], [2], [2]) == [2, 4]
    assert select(backend, device, scores, cells, [5], [3], [2]) == [0, 2, 4]
    assert select(backend, device, scores, cells, [5], [4], [2]) == [0, 1, 2, 4]


@backend_device
def test_nan_ranks_last(backend, device):
    # Cells 0 and 1 hold only NaN: their seeds rank below cell 2's, and the NaN tokens are
    # taken lowest index first when K reaches them.
    scores = [NAN, NAN, 0.1, -0.5]
    cells = [0, 1, 2, 2]
    assert select(backend, device, scores, cells, [4], [1], [3]) == [2]
    assert select(backend, device, scores, cells, [4], [2], [3]) == [0, 2]
    assert select(backend, device, scores, cells, [4], [3], [3]) == [0, 1, 2]
    # Infinities are ordinary values: +inf first.
    scores = [0.5, INF, -INF, 0.7]
    assert select(backend, device, scores, [-1] * 4, [4], [2], [1]) == [1, 3]
    assert select(backend, device, scores, [-1] * 4, [4], [3], [1]) == [0, 1, 3]


@backend_device
def test_ties_go_to_the_lower_index(backend, device):
    scores = [0.5] * 12
    cells = [0, 1, 2] * 4
    # Every cell's best is its first token (0, 1, 2); fill continues in index order.
    assert select(backend, device, scores, cells, [12], [2], [3]) == [0, 1]
    assert select(backend, device, scores, cells, [12], [5], [3]) == [0, 1, 2, 3, 4]
    # Signed zeros compare equal: -0.0 at index 0 ties with +0.0 at index 1.
    assert select(backend, device, [-0.0, 0.0, 0.0], [-1] * 3, [3], [1], [1]) == [0]


@backend_device
def test_indices_are_global(backend, device):
    scores = [0.1, 0.9, 0.5] + [0.3, 0.2, 0.8, 0.8]
    cells = [0, 0, 0] + [0, 0, 1, 1]
    got = select(backend, device, scores, cells, [3, 4], [1, 2], [1, 2])
    assert got == [1] + [3, 5]


@backend_device
def test_budget_equal_to_length_keeps_all(backend, device):
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(30, generator=gen).tolist()
    cells = torch.randint(0, 4, (30,), generator=gen).tolist()
    assert select(backend, device, scores, cells, [10, 20], [10, 20], [4, 4]) == list(range(30))


@backend_device
def test_zero_images(backend, device):
    keep = g2tr.balanced_topk(torch.empty(0, device=device), torch.empty(0, dtype=torch.int64, device=device), [], [],
                              [], backend=backend)
    assert keep.shape == (0,) and keep.dtype == torch.int64


def _random_case(seed, device):
    """Many images; scores from a handful of values (ties), with NaN and infinities; cells
    in [-1, C] so some are out of range; random budgets and quotas."""
    gen = torch.Generator().manual_seed(seed)
    b = int(torch.randint(1, 6, (1,), generator=gen))
    lengths = torch.randint(1, 200, (b,), generator=gen).tolist()
    cell_counts = [int(torch.randint(1, max(2, n // 2), (1,), generator=gen)) for n in lengths]
    budgets = [int(torch.randint(1, n + 1, (1,), generator=gen)) for n in lengths]
    quotas = [int(torch.randint(1, 4, (1,), generator=gen)) for _ in lengths]
    n = sum(lengths)
    palette = torch.tensor([NAN, -INF, INF, -1.0, -0.0, 0.0, 0.25, 0.5, 0.75])
    scores = torch.where(torch.rand(n, generator=gen) < 0.5, palette[torch.randint(0, 9, (n,), generator=gen)],
                         torch.randn(n, generator=gen))
    cells = torch.cat([torch.randint(-1, c + 1, (m,), generator=gen) for m, c in zip(lengths, cell_counts)])
    return scores.to(device), cells.to(device), lengths, budgets, cell_counts, quotas


@kernel_device
@pytest.mark.parametrize("seed", range(25))
def test_kernel_matches_reference_exactly(seed, kernel, device):
    scores, cells, lengths, budgets, cell_counts, quotas = _random_case(seed, device)
    want = g2tr.balanced_topk(scores, cells, lengths, budgets, cell_counts, quotas, backend="reference")
    got = g2tr.balanced_topk(scores, cells, lengths, budgets, cell_counts, quotas, backend=kernel)
    assert_bitwise_equal("keep_idx", got.cpu(), want.cpu())
    got = g2tr.balanced_topk(scores, cells, lengths, budgets, cell_counts, "window", backend=kernel)
    want = g2tr.balanced_topk(scores, cells, lengths, budgets, cell_counts, "window", backend="reference")
    assert_bitwise_equal("keep_idx (window quota)", got.cpu(), want.cpu())


@pytest.mark.parametrize("seed", range(10))
def test_reference_follows_the_spec_wording(seed):
    # The reference's one-pass rule against SPEC.md §3 as written (cell bests, ranked
    # cells, top min(K, #cells) seeds, fill), on tie-heavy scores.
    scores, cells, lengths, budgets, cell_counts, _ = _random_case(100 + seed, "cpu")
    got = reference.balanced_topk(scores, cells, lengths, budgets, cell_counts, [1] * len(lengths))
    t_off, k_off = offsets(lengths), offsets(budgets)
    for b in range(len(lengths)):
        s = scores[t_off[b] : t_off[b + 1]].tolist()
        c = cells[t_off[b] : t_off[b + 1]].tolist()
        want = [i + t_off[b] for i in spec_selection(s, c, budgets[b], cell_counts[b])]
        assert got[k_off[b] : k_off[b + 1]].tolist() == want, f"image {b}"


@backend_device
def test_non_contiguous_scores_and_cells(backend, device):
    scores, cells, lengths, budgets, cell_counts, quotas = _random_case(7, device)
    want = g2tr.balanced_topk(scores, cells, lengths, budgets, cell_counts, quotas, backend=backend)
    s2 = torch.stack([scores, torch.zeros_like(scores)], 1)[:, 0]
    c2 = torch.stack([torch.zeros_like(cells), cells], 1)[:, 1]
    assert not s2.is_contiguous() and not c2.is_contiguous()
    got = g2tr.balanced_topk(s2, c2, lengths, budgets, cell_counts, quotas, backend=backend)
    assert_bitwise_equal("keep_idx", got, want)


def test_quota_window_is_ceil_of_budget_over_cells():
    scores, cells, lengths, budgets, cell_counts, _ = _random_case(3, "cpu")
    quotas = [math.ceil(k / c) for k, c in zip(budgets, cell_counts)]
    for backend in ("reference", "cpu"):
        assert_bitwise_equal(
            backend,
            g2tr.balanced_topk(scores, cells, lengths, budgets, cell_counts, "window", backend=backend),
            g2tr.balanced_topk(scores, cells, lengths, budgets, cell_counts, quotas, backend=backend),
        )


# ---------------------------------------------------------------------------- the device kernels
# On a GPU kernel_device adds cuda and triton on CUDA: each is compared with the CPU kernel
# bit for bit (the selection is exact given the scores), and every kernel with the reference.


def _select_case(lengths, seed):
    """Scores full of ties, NaN, +-0 and infinities; cells with out-of-range ids."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    scores = torch.randint(-4, 5, (n,), generator=gen).float() / 4
    special = torch.tensor([NAN, -0.0, 0.0, INF, -INF])
    pick = torch.rand(n, generator=gen) < 0.1
    scores[pick] = special[torch.randint(0, len(special), (int(pick.sum()),), generator=gen)]
    cells = torch.randint(-2, 40, (n,), generator=gen)
    return scores, cells


def _assert_equals_cpu_and_reference(kernel, device, scores, cells, *args):
    got = g2tr.balanced_topk(scores.to(device), cells.to(device), *args, backend=kernel).cpu()
    assert_bitwise_equal("keep_idx vs reference", got, reference.balanced_topk(scores, cells, *args))
    assert_bitwise_equal("keep_idx vs CPU", got, torch.ops.g2tr.balanced_topk(scores, cells, *args))


@kernel_device
@pytest.mark.parametrize("lengths", [[1], [5, 300], [2048, 2049], [SELECT_MAX_TOKENS]], ids=str)
@pytest.mark.parametrize("quota", [1, 3])
def test_balanced_topk_equals_cpu_bit_for_bit(lengths, quota, kernel, device):
    # Both CUDA block configurations (<= 2048 tokens and larger), padding, one-token images.
    scores, cells = _select_case(lengths, seed=sum(lengths) + quota)
    budgets = [max(1, n // 3) for n in lengths]
    _assert_equals_cpu_and_reference(kernel, device, scores, cells, lengths, budgets, [37] * len(lengths),
                                     [quota] * len(lengths))


@kernel_device
def test_balanced_topk_more_than_64_images(kernel, device):
    # A batch over the CUDA per-launch image table (64 images) runs one launch per 64 images.
    lengths = [3 + (b % 11) for b in range(150)]
    scores, cells = _select_case(lengths, seed=11)
    budgets = [max(1, n // 2) for n in lengths]
    _assert_equals_cpu_and_reference(kernel, device, scores, cells, lengths, budgets, [5] * len(lengths),
                                     [1] * len(lengths))


# ---------------------------------------------------------------------------- the op's inputs
# Read by test_library.py (opcheck) and test_errors.py (bad input through every path);
# the form is described in helpers.py.


def opcheck_samples():
    gen = torch.Generator().manual_seed(2)
    scores = torch.randn(30, generator=gen)
    cells = torch.randint(-1, 5, (30,), generator=gen)
    return [
        (scores, cells, [10, 20], [3, 7], [4, 5], [1, 1]),
        (scores, cells, [10, 20], [3, 7], [4, 5], [2, 3]),
        (scores, torch.full((30,), -1), [30], [9], [1], [1]),
        (torch.empty(0), torch.empty(0, dtype=torch.int64), [], [], [], []),
    ]


def valid_args() -> dict:
    gen = torch.Generator().manual_seed(1)
    return dict(scores=torch.randn(10, generator=gen), cells=torch.randint(0, 2, (10,), generator=gen),
                lengths=[4, 6], budgets=[2, 3], cell_counts=[2, 2], quota=[1, 1])


ERROR_CASES = [
    Case("budget-above-length", setter(budgets=[5, 3]), ValueError, ["budgets[0]", "image 0", "[1, 4]"]),
    Case("budget-zero", setter(budgets=[2, 0]), ValueError, ["budgets[1]", "image 1"]),
    Case("budgets-count", setter(budgets=[2]), ValueError, ["budgets", "1", "2 images"]),
    Case("cell-counts-zero", setter(cell_counts=[2, 0]), ValueError, ["cell_counts[1]", "image 1"]),
    Case("cell-counts-negative", setter(cell_counts=[-1, 2]), ValueError, ["cell_counts[0]", "image 0"]),
    Case("cell-counts-count", setter(cell_counts=[2, 2, 2]), ValueError, ["cell_counts", "3", "2 images"]),
    Case("quota-zero", setter(quota=[0, 1]), ValueError, ["cell_quotas[0]", "image 0"]),
    Case("quota-negative", setter(quota=[1, -2]), ValueError, ["cell_quotas[1]", "image 1"]),
    Case("quota-count", setter(quota=[1]), ValueError, ["cell_quotas", "2 images"]),
    Case("lengths-do-not-sum", setter(lengths=[4, 5]), ValueError, ["lengths sum", "9", "10"]),
    Case("length-zero", setter(lengths=[10, 0], budgets=[2, 1]), ValueError, ["lengths[1]", "image 1"]),
    Case("lengths-tensor", setter(lengths=torch.tensor([4, 6])), TypeError, ["lengths", "tensor"],
         ops_error=RuntimeError, ops_fragments=["lengths"]),
    Case("scores-fp16", tensor_setter("scores", lambda t: t.half()), TypeError, ["scores", "float32"]),
    Case("scores-2d", tensor_setter("scores", lambda t: t[None]), TypeError, ["scores", "1-D"]),
    Case("scores-int", tensor_setter("scores", lambda t: t.int()), TypeError, ["scores"]),
    Case("cells-int32", tensor_setter("cells", lambda t: t.int()), TypeError, ["cells", "int64"]),
    Case("cells-float", tensor_setter("cells", lambda t: t.float()), TypeError, ["cells", "int64"]),
    Case("cells-2d", tensor_setter("cells", lambda t: t[None]), TypeError, ["cells", "1-D"]),
    Case("cells-length", tensor_setter("cells", lambda t: t[:9]), ValueError, ["cells", "9"]),
    Case("mixed-devices", tensor_setter("cells", lambda t: t.to("meta")), ValueError, ["scores", "cells", "meta"]),
]
