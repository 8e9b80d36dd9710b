"""Gradients of the ops: merged rows and scores are differentiable, selection is held fixed.

The reference path is plain differentiable PyTorch, so it is the oracle here too.
"""
import pytest
import torch

import g2tr_kernels as g2tr

GRIDS = [(5, 6), (4, 4)]
ANCHOR_GRIDS = [(2, 3), (2, 2)]


def _inputs(seed=0, dim=12):
    gen = torch.Generator().manual_seed(seed)
    n = sum(h * w for h, w in GRIDS)
    m = sum(h * w for h, w in ANCHOR_GRIDS)
    tokens = torch.randn(n, dim, generator=gen).requires_grad_(True)
    anchors = torch.randn(m, dim, generator=gen).requires_grad_(True)
    return tokens, anchors


def _grads(fn, *inputs):
    for t in inputs:
        t.grad = None
    fn().backward()
    return [t.grad.clone() for t in inputs]


@pytest.mark.parametrize("merge_weight", [1.0, 0.5])
def test_reduce_gradients_match_reference(merge_weight):
    tokens, anchors = _inputs()
    n = tokens.shape[0]
    weights = torch.linspace(-1, 1, n)

    def loss(backend):
        out = g2tr.reduce(tokens, anchors, GRIDS, ANCHOR_GRIDS, min_keep=1, merge_weight=merge_weight, backend=backend)
        return (out.merged * torch.arange(out.merged.numel()).reshape(out.merged.shape)).sum() + (out.scores * weights).sum()

    got = _grads(lambda: loss("cpu"), tokens, anchors)
    want = _grads(lambda: loss("reference"), tokens, anchors)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert got[1].abs().sum() > 0, "scores must carry a gradient to the anchors"


def test_merge_and_anchor_scores_gradients_match_reference():
    tokens, anchors = _inputs(seed=1)
    lengths = [h * w for h, w in GRIDS]
    budgets = g2tr.budgets(lengths, 0.5, 1)
    keep = g2tr.reduce(tokens.detach(), anchors.detach(), GRIDS, ANCHOR_GRIDS, min_keep=1).keep_idx

    def merge_loss(backend):
        merged, _ = g2tr.merge(tokens, keep, lengths, budgets, 2.0, backend=backend)
        return (merged ** 2).sum()

    (got,), (want,) = _grads(lambda: merge_loss("cpu"), tokens), _grads(lambda: merge_loss("reference"), tokens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    def scores_loss(backend):
        scores, _ = g2tr.anchor_scores(tokens, anchors, GRIDS, ANCHOR_GRIDS, backend=backend)
        return (scores ** 3).sum()

    got = _grads(lambda: scores_loss("cpu"), tokens, anchors)
    want = _grads(lambda: scores_loss("reference"), tokens, anchors)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_triton_reduce_has_the_same_gradients():
    pytest.importorskip("triton")
    tokens, anchors = _inputs(seed=2)

    def loss(backend):
        out = g2tr.reduce(tokens, anchors, GRIDS, ANCHOR_GRIDS, min_keep=1, backend=backend)
        return (out.merged ** 2).sum() + out.scores.sum()

    got = _grads(lambda: loss("triton"), tokens, anchors)
    want = _grads(lambda: loss("reference"), tokens, anchors)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
