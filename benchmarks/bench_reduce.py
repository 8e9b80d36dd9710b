"""g2tr.reduce, the whole reduction, against the reference path, the published structure, ToMe,
and the floor: one plain fp32 product (N-K) x D times D x K per image, timed in the same group."""
import torch

from g2tr_kernels import ops
from g2tr_kernels.bench import peers, published, runner

PEERS = ("published", "tome", "floor")


def test_reduce(problem, backend, measure, merge_check):
    p = problem
    args = (p.tokens, p.anchors, p.grids, p.anchor_grids, p.keep_ratio, p.min_keep)
    if backend == "published":
        fn = lambda: published.reduce(*args)  # noqa: E731
        merged, keep_idx, cu_seqlens, scores, assign = fn()
        # It merges across images and scores in the input dtype: only its layout is checked.
        assert torch.equal(cu_seqlens, p.ref.cu_seqlens)
        assert merged.shape == p.ref.merged.shape and bool(torch.isfinite(merged.float()).all())
        assert int(assign.min()) >= 0 and int(assign.max()) < merged.shape[0]
    elif backend == "floor":
        fn = runner.floor_case(p.workload, p.keep_ratio, p.min_keep, p.tokens.device).run
    elif backend == "tome":
        fn = lambda: peers.tome_bipartite(p.tokens, p.lengths, p.keep_ratio, p.min_keep)  # noqa: E731
        merged, keep_idx = fn()
        assert merged.shape == p.ref.merged.shape and keep_idx.shape == p.ref.keep_idx.shape
    else:
        fn = lambda: ops.reduce(*args, backend=backend)  # noqa: E731
        out = fn()
        assert torch.equal(out.keep_idx, p.ref.keep_idx)
        assert torch.equal(out.cu_seqlens, p.ref.cu_seqlens)
        torch.testing.assert_close(out.scores, p.ref.scores, rtol=1e-5, atol=1e-5)
        merge_check(p, out.keep_idx, out.assign, out.merged)
    measure(p, "reduce", backend, fn)
