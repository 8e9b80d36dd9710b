"""Cosines at every finite magnitude (SPEC.md §3): inputs from the smallest subnormal up
to the fp32 maximum give the float64 cosine within 1e-6 on every backend, scores and
merge assignment alike; normal rows are untouched by the rescaling (bit for bit). Every
(backend, device) pair of helpers.py: on a GPU the CUDA and Triton kernels too.
"""
import math

import pytest
import torch

import g2tr_kernels as g2tr
from g2tr_kernels import reference

from helpers import BACKEND_DEVICES, backend_device


def cosine64(x, y):
    """The cosine in float64 of rows x and y, with F.normalize's eps, scaled exactly first."""
    x, y = x.double(), y.double()
    sx = x.abs().amax(-1, keepdim=True).clamp_min(1e-300)
    sy = y.abs().amax(-1, keepdim=True).clamp_min(1e-300)
    nx = torch.linalg.vector_norm(x / sx, dim=-1) * sx.squeeze(-1)
    ny = torch.linalg.vector_norm(y / sy, dim=-1) * sy.squeeze(-1)
    dot = ((x / sx) * (y / sy)).sum(-1) * (sx * sy).squeeze(-1)
    return dot / (nx.clamp_min(1e-12) * ny.clamp_min(1e-12))


def magnitudes(dtype):
    info = torch.finfo(dtype)
    return [info.max / 4, 1e30 if dtype != torch.float16 else 6e4, 1e20 if dtype != torch.float16 else 1e4,
            1e-20 if dtype != torch.float16 else 1e-4, info.tiny, info.tiny / 8]


def rows(n, d, scale, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    x = x / x.abs().amax(-1, keepdim=True)  # max-abs 1, so `scale` is each row's max-abs
    return (x * scale).to(dtype)


@backend_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_scores_match_float64_at_every_magnitude(backend, device, dtype):
    # D = 64 (vector loads) and D = 67 (element loads, a partial last vector on CUDA).
    for i, (scale, d) in enumerate((s, d) for s in magnitudes(dtype) for d in (64, 67)):
        tokens = rows(64, d, scale, dtype, seed=i)
        anchors = rows(4, d, scale, dtype, seed=100 + i)
        # Mixed magnitudes too: anchors of another scale than the tokens.
        for anchor_scale in (scale, 1.0):
            a = anchors if anchor_scale == scale else rows(4, d, 1.0, dtype, seed=200 + i)
            scores, cells = g2tr.anchor_scores(tokens.to(device), a.to(device), [(8, 8)], [(2, 2)], backend=backend)
            scores, cells = scores.cpu(), cells.cpu()
            want = cosine64(tokens, a[cells])
            assert torch.isfinite(scores).all(), (scale, scores)
            err = (scores.double() - want).abs().max().item()
            assert err <= 1e-6, f"{backend} {dtype} D {d} scale {scale:g} (anchors {anchor_scale:g}): error {err:.3g}"


def test_the_issue_case_gives_the_true_cosine():
    # Issue 8, point 5: all-NaN on cpu and all-zero on the reference before.
    torch.manual_seed(0)
    t, a = torch.randn(64, 64) * 1e20, torch.randn(4, 64) * 1e20
    for backend, device in (p.values for p in BACKEND_DEVICES if not p.marks):
        scores, cells = g2tr.anchor_scores(t.to(device), a.to(device), [(8, 8)], [(2, 2)], backend=backend)
        want = cosine64(t, a[cells.cpu()])
        assert (scores.cpu().double() - want).abs().max() <= 1e-6, (backend, device)


@backend_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merge_assignment_at_every_magnitude(backend, device, dtype):
    # Kept rows far apart: each dropped row is a small perturbation of exactly one of them,
    # so the float64 argmax is unambiguous. (Below |x| = eps = 1e-12 every cosine is ~0 by
    # F.normalize's definition, x / eps: nothing to assign there, see the score test.)
    for i, scale in enumerate([torch.finfo(dtype).max / 4, 1e25, 1e19, 1e-11]):
        gen = torch.Generator().manual_seed(i)
        centres = torch.linalg.qr(torch.randn(32, 8, generator=gen, dtype=torch.float64))[0].T  # 8 orthonormal
        pick = torch.randint(0, 8, (24,), generator=gen)
        dropped = centres[pick] + 0.05 * torch.randn(24, 32, generator=gen, dtype=torch.float64)
        rows_ = torch.cat([centres, dropped])
        rows_ = rows_ / rows_.abs().amax(-1, keepdim=True)
        tokens = (rows_ * scale).to(dtype).to(device)
        keep = torch.arange(8, device=device)
        merged, assign = g2tr.merge(tokens, keep, [32], [8], backend=backend)
        assert torch.equal(assign[8:].cpu(), pick), (backend, scale, assign[8:], pick)
        assert not torch.isnan(merged).any()


@backend_device
def test_reduce_at_extreme_magnitude_keeps_what_unit_scale_keeps(backend, device):
    # Scaling every input by a power of two changes no cosine: the whole reduction keeps
    # the same tokens and assigns them alike, from 2^-30 to 2^124 (norms overflow fp32 from 2^63).
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randn(64, 48, generator=gen).to(device)
    anchors = torch.randn(16, 48, generator=gen).to(device)
    base = g2tr.reduce(tokens, anchors, [(8, 8)], [(4, 4)], 0.25, 4, backend=backend)
    for e in (60, 100, 124, -30):
        out = g2tr.reduce(torch.ldexp(tokens, torch.tensor(e, device=device)),
                          torch.ldexp(anchors, torch.tensor(e, device=device)),
                          [(8, 8)], [(4, 4)], 0.25, 4, backend=backend)
        assert torch.equal(out.keep_idx, base.keep_idx), (backend, e)
        assert torch.equal(out.assign, base.assign), (backend, e)
        assert torch.equal(out.scores, base.scores), (backend, e)  # exact: the scaling is by powers of two
        assert not torch.isnan(out.merged).any()


@backend_device
def test_normal_rows_are_bitwise_unchanged_by_an_extreme_neighbour(backend, device):
    # Rescaling is per row: an image holding one 1e30 token scores its other tokens exactly
    # as before.
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randn(16, 32, generator=gen).to(device)
    anchors = torch.randn(4, 32, generator=gen).to(device)
    before, _ = g2tr.anchor_scores(tokens, anchors, [(4, 4)], [(2, 2)], backend=backend)
    tokens[5] *= 1e30
    after, _ = g2tr.anchor_scores(tokens, anchors, [(4, 4)], [(2, 2)], backend=backend)
    keep = torch.arange(16, device=device) != 5
    assert torch.equal(after[keep], before[keep])
    assert math.isclose(after[5].item(), before[5].item(), abs_tol=1e-6)


def test_reference_unit_equals_normalize_on_normal_rows():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(100, 37, generator=gen) * torch.logspace(-15, 15, 100)[:, None]
    x[3] = 0.0
    want = torch.nn.functional.normalize(x, dim=-1, eps=1e-12)
    assert torch.equal(reference.anchor_scores.__globals__["unit"](x), want)
