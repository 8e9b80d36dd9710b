"""What is specific to the CUDA C++ kernels of torch.ops.g2tr (csrc/cuda) and to running on a
GPU: registration of the CUDA key, the limits and no-sync behaviour of the CUDA kernels on bad
input (a clear error before any launch, or, for an invalid keep_idx, no out-of-bounds access),
the op contract on CUDA (opcheck, torch.compile), CUDA graphs, streams and a second device.

The op tests themselves (every kernel against the reference and the CPU kernel) are in
tests/test_<op>.py over the backend fixtures of helpers.py, which add cuda and triton on CUDA
where a GPU is.

Everything here needs a GPU and a build with the CUDA kernels, except the dispatch-table test.
"""
from __future__ import annotations

import pytest
import torch

import g2tr_kernels as g2tr
from g2tr_kernels import _native
from g2tr_kernels._registry import NAMES

from helpers import (
    SELECT_MAX_TOKENS,
    WORKLOADS,
    assert_outputs_bitwise_equal,
    assert_reduce_matches,
    lengths_of,
    make_workload,
    offsets,
    spec_budget,
)

OPS = NAMES


def _cuda_build() -> bool:
    return _native.loaded() and "cuda" in g2tr.build_info()["backends"]


def _why_no_cuda():
    if not torch.cuda.is_available():
        return "no CUDA device here (torch.cuda.is_available() is False)"
    if not _cuda_build():
        return "this build of g2tr_kernels has no CUDA kernels (build with G2TR_BUILD_CUDA=1)"
    return None


needs_cuda = pytest.mark.skipif(_why_no_cuda() is not None, reason=str(_why_no_cuda()))


def reduce_op(tokens, anchors, grids, anchor_grids, keep_ratio=0.5, min_keep=32, merge_weight=1.0):
    flat = lambda pairs: [v for p in pairs for v in p]  # noqa: E731
    return g2tr.ReduceOutput(*torch.ops.g2tr.reduce(
        tokens, anchors, flat(grids), flat(anchor_grids), keep_ratio, min_keep, merge_weight))


def to_cpu(out):
    return g2tr.ReduceOutput(*(t.cpu() for t in out))


# ------------------------------------------------------------------ registration (no GPU needed)


@pytest.mark.skipif(not (_native.loaded() and _cuda_build()), reason="this build has no CUDA kernels")
def test_every_op_has_a_cuda_kernel():
    # One owner per (op, key): the C++ files register CUDA for all four ops, and nothing in
    # Python overrides them (a Python registration would replace the C++ one in silence).
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"g2tr::{op}", "CUDA"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"g2tr::{op}", "CPU"), op


# ------------------------------------------------------------------ bad input


@needs_cuda
def test_image_over_the_selection_capacity_is_refused_before_launch():
    grids = [(2, 2), (1, SELECT_MAX_TOKENS + 1)]
    tokens = torch.randn(4 + SELECT_MAX_TOKENS + 1, 8, device="cuda")
    anchors = torch.randn(2, 8, device="cuda")
    with pytest.raises(ValueError, match=rf"g2tr.reduce: image 1 has {SELECT_MAX_TOKENS + 1} tokens"):
        reduce_op(tokens, anchors, grids, [(1, 1), (1, 1)])
    scores = torch.randn(SELECT_MAX_TOKENS + 1, device="cuda")
    cells = torch.zeros(SELECT_MAX_TOKENS + 1, dtype=torch.int64, device="cuda")
    with pytest.raises(ValueError, match=r"g2tr.balanced_topk: image 0 has"):
        torch.ops.g2tr.balanced_topk(scores, cells, [SELECT_MAX_TOKENS + 1], [10], [1], [1])
    # The CPU has no such limit.
    torch.ops.g2tr.balanced_topk(scores.cpu(), cells.cpu(), [SELECT_MAX_TOKENS + 1], [10], [1], [1])


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_invalid_keep_idx_never_reads_out_of_bounds(dtype):
    # The CPU raises on these; CUDA cannot look without a sync: the result is unspecified but
    # every access stays inside the image (no illegal address) and assign stays in its rows.
    lengths, budgets = [20, 30], [4, 5]
    tokens = torch.randn(50, 24, device="cuda", dtype=dtype)
    bad = {
        "out_of_range": [-7, 3, 99, 10**9, 20, 20, 21, -(10**12), 49],
        "duplicates": [2, 2, 2, 2, 25, 25, 25, 25, 25],
        "descending": [19, 10, 5, 0, 49, 40, 30, 25, 20],
        "other_image": [30, 31, 32, 33, 0, 1, 2, 3, 4],
    }
    k_off = offsets(budgets)
    for name, keep in bad.items():
        keep_idx = torch.tensor(keep, dtype=torch.int64, device="cuda")
        merged, assign = torch.ops.g2tr.merge(tokens, keep_idx, lengths, budgets, 1.0)
        torch.cuda.synchronize()  # an illegal access would surface here
        assert merged.shape == (9, 24), name
        img = torch.repeat_interleave(torch.arange(2), torch.tensor(lengths))
        lo = torch.tensor(k_off[:-1])[img]
        hi = torch.tensor(k_off[1:])[img]
        a = assign.cpu()
        assert bool(((a >= lo) & (a < hi)).all()), f"{name}: assign leaves its image: {a.tolist()}"
        with pytest.raises(ValueError, match="keep_idx of image"):
            torch.ops.g2tr.merge(tokens.cpu(), keep_idx.cpu(), lengths, budgets, 1.0)


@needs_cuda
def test_argument_errors_match_cpu_messages():
    t = torch.randn(16, 8, device="cuda")
    a = torch.randn(4, 8, device="cuda")
    cases = [
        lambda x, y: torch.ops.g2tr.reduce(x, y, [4, 4], [2, 2], 0.0, 32, 1.0),
        lambda x, y: torch.ops.g2tr.reduce(x, y, [4, 3], [2, 2], 0.5, 32, 1.0),
        lambda x, y: torch.ops.g2tr.reduce(x, y[:, :4], [4, 4], [2, 2], 0.5, 32, 1.0),
        lambda x, y: torch.ops.g2tr.merge(x, torch.arange(3, device=x.device), [16], [4], 1.0),
        lambda x, y: torch.ops.g2tr.merge(x, torch.arange(4, device=x.device), [16], [4], -1.0),
    ]
    for case in cases:
        with pytest.raises(Exception) as on_cpu:
            case(t.cpu(), a.cpu())
        with pytest.raises(type(on_cpu.value)) as on_cuda:
            case(t, a)
        assert str(on_cuda.value).splitlines()[0] == str(on_cpu.value).splitlines()[0]


# ------------------------------------------------------------------ the op contract on CUDA


@needs_cuda
def test_opcheck_on_cuda():
    grids, anchor_grids, d = WORKLOADS["S2"]
    tokens, anchors = make_workload(grids, anchor_grids, d, torch.bfloat16, seed=4, device="cuda")
    flat_g, flat_a = [v for p in grids for v in p], [v for p in anchor_grids for v in p]
    lengths = lengths_of(grids)
    budgets = [spec_budget(n, 0.5, 32) for n in lengths]
    scores, cells = torch.ops.g2tr.anchor_scores(tokens, anchors, flat_g, flat_a)
    keep_idx = torch.ops.g2tr.balanced_topk(scores, cells, lengths, budgets, [256, 256], [1, 1])
    cases = [
        (torch.ops.g2tr.anchor_scores.default, (tokens, anchors, flat_g, flat_a)),
        (torch.ops.g2tr.balanced_topk.default, (scores, cells, lengths, budgets, [256, 256], [1, 1])),
        (torch.ops.g2tr.merge.default, (tokens, keep_idx, lengths, budgets, 1.0)),
        (torch.ops.g2tr.reduce.default, (tokens, anchors, flat_g, flat_a, 0.5, 32, 1.0)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@needs_cuda
def test_torch_compile_on_cuda():
    grids, anchor_grids, d = WORKLOADS["M2"]
    tokens, anchors = make_workload(grids, anchor_grids, d, torch.bfloat16, seed=6, device="cuda")
    flat_g, flat_a = [v for p in grids for v in p], [v for p in anchor_grids for v in p]

    def fn(t, a):
        return torch.ops.g2tr.reduce(t, a, flat_g, flat_a, 0.5, 32, 1.0)

    compiled = torch.compile(fn, fullgraph=True)
    assert_outputs_bitwise_equal("compiled", to_cpu(g2tr.ReduceOutput(*compiled(tokens, anchors))),
                                 to_cpu(g2tr.ReduceOutput(*fn(tokens, anchors))))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_graph_capture_of_reduce(dtype):
    # No host sync, no cudaMalloc outside the caching allocator, image tables passed as kernel
    # arguments: the whole op replays from a graph with new data in the same buffers.
    grids, anchor_grids, d = WORKLOADS["M2"]
    tokens, anchors = make_workload(grids, anchor_grids, d, dtype, seed=0, device="cuda")
    flat_g, flat_a = [v for p in grids for v in p], [v for p in anchor_grids for v in p]
    static_t, static_a = tokens.clone(), anchors.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up outside the capture (allocator pools, attributes)
            torch.ops.g2tr.reduce(static_t, static_a, flat_g, flat_a, 0.5, 32, 1.0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = torch.ops.g2tr.reduce(static_t, static_a, flat_g, flat_a, 0.5, 32, 1.0)
    for seed in (1, 2):
        new_t, new_a = make_workload(grids, anchor_grids, d, dtype, seed=seed, device="cuda")
        static_t.copy_(new_t)
        static_a.copy_(new_a)
        graph.replay()
        torch.cuda.synchronize()
        eager = torch.ops.g2tr.reduce(new_t, new_a, flat_g, flat_a, 0.5, 32, 1.0)
        assert_outputs_bitwise_equal(f"replay {seed}", to_cpu(g2tr.ReduceOutput(*static_out)),
                                     to_cpu(g2tr.ReduceOutput(*eager)))


@needs_cuda
def test_runs_on_the_current_stream():
    # The input is produced on a side stream behind a long sleep: kernels launched on any other
    # stream would read it before it is written.
    grids, anchor_grids, d = WORKLOADS["S2"]
    tokens, anchors = make_workload(grids, anchor_grids, d, torch.bfloat16, seed=8, device="cuda")
    flat_g, flat_a = [v for p in grids for v in p], [v for p in anchor_grids for v in p]
    want = torch.ops.g2tr.reduce(tokens, anchors, flat_g, flat_a, 0.5, 32, 1.0)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        late = tokens.clone()
        got = torch.ops.g2tr.reduce(late, anchors, flat_g, flat_a, 0.5, 32, 1.0)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert_outputs_bitwise_equal("side stream", to_cpu(g2tr.ReduceOutput(*got)), to_cpu(g2tr.ReduceOutput(*want)))


@needs_cuda
def test_second_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs a second GPU")
    grids, anchor_grids, d = WORKLOADS["S2"]
    tokens, anchors = make_workload(grids, anchor_grids, d, torch.bfloat16, seed=13)
    # Current device stays 0: the op must switch to the tensors' device itself.
    on_1 = reduce_op(tokens.to("cuda:1"), anchors.to("cuda:1"), grids, anchor_grids)
    assert all(t.device == torch.device("cuda:1") for t in on_1)
    assert_reduce_matches(on_1, tokens, anchors, grids, anchor_grids, name="cuda:1")
    if torch.cuda.get_device_name(0) == torch.cuda.get_device_name(1):
        on_0 = reduce_op(tokens.to("cuda:0"), anchors.to("cuda:0"), grids, anchor_grids)
        assert_outputs_bitwise_equal("cuda:1 vs cuda:0", to_cpu(on_1), to_cpu(on_0))
