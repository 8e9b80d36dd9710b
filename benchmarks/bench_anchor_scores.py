"""g2tr.anchor_scores (stage III score: cosine of each token with its cell's anchor)."""
import torch

from g2tr_kernels import ops


def test_anchor_scores(problem, backend, measure):
    p = problem
    fn = lambda: ops.anchor_scores(p.tokens, p.anchors, p.grids, p.anchor_grids, backend=backend)  # noqa: E731
    scores, cells = fn()
    assert torch.equal(cells, p.cells)
    torch.testing.assert_close(scores, p.ref.scores, rtol=1e-5, atol=1e-5)
    measure(p, "anchor_scores", backend, fn)
