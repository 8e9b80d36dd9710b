"""The CPU merge path (csrc/cpu/merge_path.h): the rule per CPU and dtype, the G2TR_CPU_MERGE
override, what build_info() reports, and every path forced against the reference.

tools/test.sh also runs tests/test_merge.py and tests/test_reduce.py whole under each forced
path; these are the path-specific checks (bf16 inputs, where the paths differ)."""
import pytest
import torch

import g2tr_kernels as g2tr
from g2tr_kernels import _native

from helpers import (
    WORKLOADS,
    assert_bitwise_equal,
    assert_merge_matches,
    assert_outputs_bitwise_equal,
    assert_reduce_matches,
    lengths_of,
    make_ternary_workload,
    make_workload,
)

ENV = "G2TR_CPU_MERGE"


def _C():
    _native.require("build_info")
    return _native._C


def cpu_paths():
    """The paths this CPU can run for bf16 (bf16_dot needs avx512_bf16)."""
    features = g2tr.build_info()["cpu_features"]
    return ["fp32_gemm", "bf16_gemm"] + (["bf16_dot"] if features["avx512_bf16"] else [])


# ------------------------------------------------------------------ the rule


@pytest.mark.parametrize(
    "vendor,avx512_bf16,amx_bf16,dtype,path",
    [
        ("GenuineIntel", True, False, "bfloat16", "fp32_gemm"),  # Xeon, avx512_bf16 + fp16, no AMX
        ("GenuineIntel", True, True, "bfloat16", "bf16_gemm"),  # Sapphire Rapids with AMX
        ("AuthenticAMD", True, False, "bfloat16", "bf16_dot"),  # Zen 4 / Zen 5
        ("AuthenticAMD", False, False, "bfloat16", "fp32_gemm"),  # Zen 3: no bf16 arithmetic
        ("GenuineIntel", False, False, "bfloat16", "fp32_gemm"),
        ("AuthenticAMD", True, False, "float32", "fp32_gemm"),
        ("GenuineIntel", True, True, "float16", "fp32_gemm"),
    ],
)
def test_rule(vendor, avx512_bf16, amx_bf16, dtype, path):
    chosen, reason = _C().merge_path_rule(vendor, avx512_bf16, amx_bf16, dtype)
    assert chosen == path
    assert reason


def test_rule_rejects_an_unknown_dtype():
    with pytest.raises(ValueError, match="dtype"):
        _C().merge_path_rule("AuthenticAMD", True, False, "int8")


def test_build_info_reports_the_rule_on_this_cpu(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    info = g2tr.build_info()
    f = info["cpu_features"]
    for dtype in ("bfloat16", "float16", "float32"):
        expected, reason = _C().merge_path_rule(f["vendor"], f["avx512_bf16"], f["amx_bf16"], dtype)
        assert info["cpu_merge"][dtype] == {"path": expected, "reason": reason}


@pytest.mark.parametrize("path", ["fp32_gemm", "bf16_gemm", "bf16_dot"])
def test_env_forces_the_bf16_path_and_says_so(monkeypatch, path):
    monkeypatch.setenv(ENV, path)
    if path not in cpu_paths():
        with pytest.raises(ValueError, match=f"{ENV}=bf16_dot needs a CPU with avx512_bf16"):
            g2tr.build_info()
        return
    info = g2tr.build_info()
    assert info["cpu_merge"]["bfloat16"]["path"] == path
    assert f"{ENV}={path}" in info["cpu_merge"]["bfloat16"]["reason"]
    assert info["cpu_merge"]["float32"]["path"] == "fp32_gemm"  # fp32 and fp16 have one path


@pytest.mark.parametrize("op", ["merge", "reduce"])
def test_unknown_env_value_is_a_clear_error(monkeypatch, op):
    grids, anchor_grids, d = [(4, 4)], [(2, 2)], 8
    tokens, anchors = make_workload(grids, anchor_grids, d, torch.bfloat16)
    monkeypatch.setenv(ENV, "fastest")
    with pytest.raises(ValueError, match=f"{ENV} must be one of auto, bf16_dot, fp32_gemm, bf16_gemm; got 'fastest'"):
        if op == "merge":
            torch.ops.g2tr.merge(tokens, torch.tensor([0, 5, 10, 15]), [16], [4], 1.0)
        else:
            torch.ops.g2tr.reduce(tokens, anchors, [4, 4], [2, 2], 0.5, 1, 1.0)


# ------------------------------------------------------------------ every path, forced


@pytest.fixture(params=["fp32_gemm", "bf16_gemm", "bf16_dot"])
def path(request, monkeypatch):
    if request.param not in cpu_paths():
        pytest.skip(f"{request.param} needs avx512_bf16, which this CPU lacks (the error is tested above)")
    monkeypatch.setenv(ENV, request.param)
    return request.param


# S1 (16x16 images: spread over the threads one image per task) and M2 (mixed sizes: one
# image after another, rows spread over the threads); odd D exercises the pair padding.
@pytest.mark.parametrize("workload,d", [("S1", 64), ("M2", 64), ("M2", 33)])
def test_path_matches_reference(path, workload, d):
    grids, anchor_grids, _ = WORKLOADS[workload]
    tokens, anchors = make_workload(grids, anchor_grids, d, torch.bfloat16, seed=21)
    out = g2tr.reduce(tokens, anchors, grids, anchor_grids, min_keep=4, backend="cpu")
    assert_reduce_matches(out, tokens, anchors, grids, anchor_grids, min_keep=4, name=f"{path} {workload}")


def test_path_exact_ties_match_reference_bit_for_bit(path):
    # Ternary rows: every cosine is a multiple of 1/4, exact on every path: ties to the lower index.
    grids, anchor_grids, _ = WORKLOADS["M2"]
    tokens, anchors = make_ternary_workload(grids, anchor_grids, d=16, dtype=torch.bfloat16, seed=22)
    got = g2tr.reduce(tokens, anchors, grids, anchor_grids, min_keep=4, backend="cpu")
    want = g2tr.reduce(tokens, anchors, grids, anchor_grids, min_keep=4, backend="reference")
    assert_outputs_bitwise_equal(path, got, want)


def test_path_merge_op_matches_reference(path):
    grids = [(9, 7), (5, 5)]
    lengths = lengths_of(grids)
    tokens, _ = make_workload(grids, [(3, 3), (2, 2)], 48, torch.bfloat16, seed=23)
    keep = torch.tensor([0, 3, 8, 20, 33, 50, 62, 63, 66, 70, 87])
    budgets = [7, 4]
    merged, assign = g2tr.merge(tokens, keep, lengths, budgets, 2.0, backend="cpu")
    assert_merge_matches(path, tokens, keep, merged, assign, lengths, budgets, 2.0)


def test_path_is_deterministic_and_thread_independent(path):
    grids, anchor_grids, d = WORKLOADS["S2"]
    tokens, anchors = make_workload(grids, anchor_grids, d, torch.bfloat16, seed=24)
    first = g2tr.reduce(tokens, anchors, grids, anchor_grids, backend="cpu")
    again = g2tr.reduce(tokens.clone(), anchors.clone(), grids, anchor_grids, backend="cpu")
    assert_outputs_bitwise_equal(f"{path}: second run", again, first)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = g2tr.reduce(tokens, anchors, grids, anchor_grids, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert_outputs_bitwise_equal(f"{path}: 1 thread", single, first)


def test_small_images_spread_over_threads_give_each_image_alone(path):
    # Many small images run one image per task; the result of an image must be what it
    # gives on its own (and so not depend on its neighbours or on the split).
    grids, anchor_grids = [(16, 16)] * 6, [(8, 8)] * 6
    tokens, anchors = make_workload(grids, anchor_grids, 40, torch.bfloat16, seed=25)
    together = g2tr.reduce(tokens, anchors, grids, anchor_grids, min_keep=4, backend="cpu")
    alone = g2tr.reduce(tokens[256:512], anchors[64:128], grids[:1], anchor_grids[:1], min_keep=4, backend="cpu")
    rows = slice(int(together.cu_seqlens[1]), int(together.cu_seqlens[2]))
    assert torch.equal(together.merged[rows], alone.merged)
    assert torch.equal(together.keep_idx[rows] - 256, alone.keep_idx)
    assert torch.equal(together.assign[256:512] - int(together.cu_seqlens[1]), alone.assign)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_small_images_through_all_stages_at_once_are_the_stages_one_by_one(dtype):
    # reduce takes small images (S1's shape: 16x16 tokens on a finer 32x32 anchor grid) through
    # score, select and merge one image per task; that must be the stage ops' bits, on any
    # number of threads.
    grids, anchor_grids = [(16, 16)] * 5, [(32, 32)] * 5
    tokens, anchors = make_workload(grids, anchor_grids, 48, dtype, seed=26)
    lengths = [256] * 5
    budgets = g2tr.budgets(lengths, 0.5, 4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = g2tr.reduce(tokens, anchors, grids, anchor_grids, min_keep=4, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    out = g2tr.reduce(tokens, anchors, grids, anchor_grids, min_keep=4, backend="cpu")
    assert_outputs_bitwise_equal("1 thread", single, out)
    scores, cells = g2tr.anchor_scores(tokens, anchors, grids, anchor_grids, backend="cpu")
    keep = g2tr.balanced_topk(scores, cells, lengths, budgets, [1024] * 5, backend="cpu")
    merged, assign = g2tr.merge(tokens, keep, lengths, budgets, backend="cpu")
    assert_bitwise_equal("scores", out.scores, scores)
    assert_bitwise_equal("keep_idx", out.keep_idx, keep)
    assert_bitwise_equal("merged", out.merged, merged)
    assert_bitwise_equal("assign", out.assign, assign)
