"""g2tr_kernels.anchor_scores: the cell map and the cosine of each token with its cell's anchor."""
import math

import pytest
import test_reduce
import torch

import g2tr_kernels as g2tr
from g2tr_kernels import reference

from helpers import (
    SCORE_ATOL,
    WORKLOADS,
    assert_bitwise_equal,
    assert_close_report,
    backend_device,
    dtypes,
    global_cells,
    kernel_device,
    make_workload,
    spec_cells,
)


@pytest.mark.parametrize(
    "grid,anchor_grid,cells",
    [
        ((3, 3), (2, 2), [0, 0, 1, 0, 0, 1, 2, 2, 3]),  # rows/cols 0,1 -> 0 and 2 -> 1 (floor of r*2/3)
        ((4, 4), (2, 2), [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]),
        ((2, 2), (4, 4), [0, 2, 8, 10]),  # finer anchors: a_r = 2r, a_c = 2c of a 4-wide grid
        ((1, 5), (1, 2), [0, 0, 0, 1, 1]),  # floor(c * 2 / 5): 0, 0, 0, 1, 1
        ((5, 1), (3, 1), [0, 0, 1, 1, 2]),  # floor(r * 3 / 5): 0, 0, 1, 1, 2
        ((2, 3), (1, 1), [0] * 6),
    ],
)
def test_cell_map_by_hand(grid, anchor_grid, cells):
    assert spec_cells(*grid, *anchor_grid) == cells
    assert reference.cell_ids(*grid, *anchor_grid).tolist() == cells


@kernel_device
@pytest.mark.parametrize(
    "grid,anchor_grid",
    [((16, 16), (32, 32)), ((37, 37), (16, 16)), ((70, 70), (32, 32)), ((52, 70), (24, 32)), ((70, 52), (32, 24)),
     ((39, 70), (18, 32)), ((27, 27), (16, 16)), ((8, 8), (32, 32)), ((1, 1), (5, 5)), ((7, 3), (2, 9))],
)
def test_cell_map_follows_spec(grid, anchor_grid, kernel, device):
    tokens, anchors = make_workload([grid], [anchor_grid], 4, seed=0, device=device)
    want = spec_cells(*grid, *anchor_grid)
    assert reference.cell_ids(*grid, *anchor_grid).tolist() == want
    for backend in ("reference", kernel):
        _, cells = g2tr.anchor_scores(tokens, anchors, [grid], [anchor_grid], backend=backend)
        assert cells.dtype == torch.int64
        assert cells.tolist() == want


@backend_device
def test_scores_by_hand(backend, device):
    # Image 0 (1x4, one anchor [0, 0, 1]): cos of [1, 2, 2] = 2/3, of [3, 0, 4] = 4/5,
    # of the zero vector 0 (normalize's eps turns 0/0 into 0), of [0, 0, -1000] = -1.
    # Image 1 (1x2, anchors [1, 0, 0] then the zero anchor): [5, 0, 0] -> 1, [1, 1, 1] -> 0.
    tokens = torch.tensor([[1, 2, 2], [3, 0, 4], [0, 0, 0], [0, 0, -1000], [5, 0, 0], [1, 1, 1]],
                          dtype=torch.float32, device=device)
    anchors = torch.tensor([[0, 0, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.float32, device=device)
    scores, cells = g2tr.anchor_scores(tokens, anchors, [1, 4, 1, 2], [1, 1, 1, 2], backend=backend)
    torch.testing.assert_close(scores.cpu(), torch.tensor([2 / 3, 0.8, 0.0, -1.0, 1.0, 0.0]), atol=1e-6, rtol=0)
    assert cells.tolist() == [0, 0, 0, 0, 0, 1]


@backend_device
def test_each_image_uses_its_own_anchors(backend, device):
    # Identical tokens in two images score against different anchors: offsets must not leak.
    tokens = torch.tensor([[1.0, 0.0]] * 8, device=device)
    anchors = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], device=device)
    scores, cells = g2tr.anchor_scores(tokens, anchors, [(2, 2), (2, 2)], [(1, 2), (1, 2)], backend=backend)
    torch.testing.assert_close(scores.cpu(), torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, -1.0, 0.0, -1.0]), atol=1e-6,
                               rtol=0)
    assert cells.tolist() == [0, 1, 0, 1, 0, 1, 0, 1]


@backend_device
@dtypes
@pytest.mark.parametrize("d", [1, 3, 16, 37, 200])
def test_scores_are_fp32_cosines(backend, device, dtype, d):
    # Whatever the input dtype, the score is the fp32 cosine of the values as stored;
    # d covers a single lane, odd tails and several vector widths.
    grids, anchor_grids = [(6, 5), (4, 4)], [(3, 2), (1, 1)]
    tokens, anchors = make_workload(grids, anchor_grids, d, dtype, seed=d, device=device)
    scores, cells = g2tr.anchor_scores(tokens, anchors, grids, anchor_grids, backend=backend)
    assert scores.dtype == torch.float32 and scores.shape == (46,)
    assert cells.dtype == torch.int64 and scores.device == tokens.device
    x = tokens.cpu().double()
    a = anchors.cpu().double()[global_cells(grids, anchor_grids)]
    want = ((x * a).sum(-1) / (x.norm(dim=-1) * a.norm(dim=-1))).float()
    assert_close_report("scores", scores.cpu(), want, atol=2e-6 * max(1.0, math.sqrt(d)), rtol=0)


@kernel_device
@dtypes
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_kernel_matches_reference(workload, dtype, kernel, device):
    grids, anchor_grids, d = WORKLOADS[workload]
    tokens, anchors = make_workload(grids, anchor_grids, d, dtype, seed=1, device=device)
    got_s, got_c = g2tr.anchor_scores(tokens, anchors, grids, anchor_grids, backend=kernel)
    want_s, want_c = g2tr.anchor_scores(tokens, anchors, grids, anchor_grids, backend="reference")
    assert_bitwise_equal("cells", got_c.cpu(), want_c.cpu())
    assert_close_report("scores", got_s.cpu(), want_s.cpu(), atol=SCORE_ATOL, rtol=0)


@backend_device
def test_scale_does_not_change_the_score(backend, device):
    grids, anchor_grids = [(5, 5)], [(2, 2)]
    tokens, anchors = make_workload(grids, anchor_grids, 32, seed=2, device=device)
    base, _ = g2tr.anchor_scores(tokens, anchors, grids, anchor_grids, backend=backend)
    # Powers of two scale exactly, so the cosine must not move at all.
    scaled, _ = g2tr.anchor_scores(tokens * 1024.0, anchors / 64.0, grids, anchor_grids, backend=backend)
    assert_bitwise_equal("scores under exact rescaling", scaled, base)


@backend_device
def test_non_finite_rows_score_nan(backend, device):
    tokens = torch.tensor([[1.0, 0.0], [float("nan"), 0.0], [float("inf"), 1.0], [0.0, 1.0]], device=device)
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]], device=device)
    scores, _ = g2tr.anchor_scores(tokens, anchors, [(2, 2)], [(1, 2)], backend=backend)
    assert scores[0].item() == pytest.approx(1.0) and scores[3].item() == pytest.approx(1.0)
    assert math.isnan(scores[1].item()) and math.isnan(scores[2].item())


@backend_device
def test_non_contiguous_inputs(backend, device):
    grids, anchor_grids = [(9, 9)], [(3, 3)]
    tokens, anchors = make_workload(grids, anchor_grids, 24, torch.float16, seed=3, device=device)
    want_s, want_c = g2tr.anchor_scores(tokens, anchors, grids, anchor_grids, backend=backend)
    got_s, got_c = g2tr.anchor_scores(tokens.t().contiguous().t(), torch.cat([anchors, anchors], 1)[:, 24:],
                                      grids, anchor_grids, backend=backend)
    assert_bitwise_equal("cells", got_c, want_c)
    assert_close_report("scores", got_s, want_s, atol=SCORE_ATOL if backend == "reference" else 0.0, rtol=0)


@backend_device
def test_zero_images(backend, device):
    scores, cells = g2tr.anchor_scores(torch.empty(0, 8, device=device), torch.empty(0, 8, device=device), [], [],
                                       backend=backend)
    assert scores.shape == (0,) and scores.dtype == torch.float32
    assert cells.shape == (0,) and cells.dtype == torch.int64


@backend_device
def test_strided_d_is_copied(backend, device):
    # Stride 2 along D: the kernels copy (or read strided); the scores are the same. D = 16
    # sums differ from the reference's by far less than SCORE_ATOL: 1e-5 here.
    grids, anchor_grids = [(37, 37)], [(16, 16)]
    wide, anchors = make_workload(grids, anchor_grids, 32, torch.bfloat16, seed=2)
    tokens = wide[:, ::2]
    assert not tokens.is_contiguous()
    scores, cells = g2tr.anchor_scores(tokens.to(device), anchors[:, ::2].to(device), grids, anchor_grids,
                                       backend=backend)
    ref_scores, ref_cells = reference.anchor_scores(tokens, anchors[:, ::2], grids, anchor_grids)
    assert_close_report("scores", scores.cpu(), ref_scores, atol=1e-5, rtol=0)
    assert_bitwise_equal("cells", cells.cpu(), ref_cells)


# ---------------------------------------------------------------------------- the device kernels
# On a GPU kernel_device adds cuda and triton on CUDA, compared with the CPU kernel.


@kernel_device
@dtypes
@pytest.mark.parametrize("dim", [64, 67, 0], ids=["d64", "d67-unvectorised", "d0"])
def test_anchor_scores_close_to_cpu(dtype, dim, kernel, device):
    grids, anchor_grids = [(5, 7), (16, 16)], [(2, 3), (8, 8)]
    tokens, anchors = make_workload(grids, anchor_grids, dim, dtype, seed=dim) if dim else (
        torch.zeros(35 + 256, 0, dtype=dtype), torch.zeros(6 + 64, 0, dtype=dtype))
    flat_g, flat_a = [v for p in grids for v in p], [v for p in anchor_grids for v in p]
    got_s, got_c = g2tr.anchor_scores(tokens.to(device), anchors.to(device), grids, anchor_grids, backend=kernel)
    for oracle, (want_s, want_c) in (("CPU", torch.ops.g2tr.anchor_scores(tokens, anchors, flat_g, flat_a)),
                                     ("reference", reference.anchor_scores(tokens, anchors, grids, anchor_grids))):
        assert_bitwise_equal(f"cells vs {oracle}", got_c.cpu(), want_c)
        assert_close_report(f"scores vs {oracle}", got_s.cpu(), want_s, atol=SCORE_ATOL, rtol=0)


# ---------------------------------------------------------------------------- the op's inputs
# Read by test_library.py (opcheck) and test_errors.py (bad input through every path);
# the form is described in helpers.py.


def opcheck_samples():
    return [s[:4] for s in test_reduce.opcheck_samples()]


def valid_args() -> dict:
    # reduce's geometry: anchor_scores shares its geometry and tensor checks; it has no ratio or weight.
    args = test_reduce.valid_args()
    return {k: args[k] for k in ("tokens", "anchors", "grids", "anchor_grids")}


ERROR_CASES = [c for c in test_reduce.ERROR_CASES if not c.id.startswith(("keep-ratio", "min-keep", "merge-weight"))]
