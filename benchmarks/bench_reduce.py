"""g2tr.reduce, the whole reduction, against the reference path, the published structure, ToMe,
each CPU merge path forced (cpu_<path>: G2TR_CPU_MERGE=<path>), and the floors: one plain
product (N-K) x D times D x K per image in fp32 (floor) and in bf16 (floor_bf16), timed in the
same group. Compare reduce with the faster floor."""
import pytest
import torch

from g2tr_kernels import ops
from g2tr_kernels.bench import peers, published, runner

PEERS = ("published", "tome", "floor", "floor_bf16") + tuple(f"cpu_{path}" for path in runner.CPU_MERGE_PATHS)
CPU_ONLY_PEERS = tuple(f"cpu_{path}" for path in runner.CPU_MERGE_PATHS)


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
    elif backend in ("floor", "floor_bf16"):
        dtype = torch.bfloat16 if backend == "floor_bf16" else torch.float32
        fn = runner.floor_case(p.workload, p.keep_ratio, p.min_keep, p.tokens.device, dtype=dtype).run
    elif backend == "tome":
        fn = lambda: peers.tome_bipartite(p.tokens, p.lengths, p.keep_ratio, p.min_keep)  # noqa: E731
        merged, keep_idx = fn()
        assert merged.shape == p.ref.merged.shape and keep_idx.shape == p.ref.keep_idx.shape
    else:
        if backend.startswith("cpu_"):
            path = backend[len("cpu_"):]
            if path not in runner.cpu_merge_paths(p.tokens.dtype)[1]:
                pytest.skip(f"G2TR_CPU_MERGE={path}: not a path of this CPU and dtype ({p.tokens.dtype})")

            def fn():
                with runner.forced_cpu_merge(path):
                    return ops.reduce(*args, backend="cpu")
        else:
            fn = lambda: ops.reduce(*args, backend=backend)  # noqa: E731
        out = fn()
        assert torch.equal(out.keep_idx, p.ref.keep_idx)
        assert torch.equal(out.cu_seqlens, p.ref.cu_seqlens)
        torch.testing.assert_close(out.scores, p.ref.scores, rtol=1e-5, atol=1e-5)
        merge_check(p, out.keep_idx, out.assign, out.merged)
    measure(p, "reduce", backend, fn)
