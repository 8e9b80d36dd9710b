"""The Triton launchers' shared machinery (g2tr_kernels/triton/_common.py), on the CPU:
the per-content table cache, the device guard every launch runs under, and the row
padding that keeps loads aligned for any D."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import importlib  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import g2tr_kernels as g2tr  # noqa: E402

pytest.importorskip("triton")
common = importlib.import_module("g2tr_kernels.triton._common")

from helpers import assert_bitwise_equal, assert_reduce_matches, make_workload  # noqa: E402


def test_table_cache_uploads_each_content_once():
    cache = common.TableCache(capacity=2)
    a = cache.get(((0, 4), (4, 9)), torch.int64, torch.device("cpu"))
    assert cache.get(((0, 4), (4, 9)), torch.int64, torch.device("cpu")) is a
    assert cache.uploads == 1
    assert_bitwise_equal("table", a, torch.tensor([[0, 4], [4, 9]]))
    b = cache.get(((0, 4), (4, 9)), torch.int32, torch.device("cpu"))  # another dtype: another table
    assert b is not a and b.dtype == torch.int32 and cache.uploads == 2
    cache.get((1, 2), torch.int64, torch.device("cpu"))  # over capacity: the least recently used goes
    assert len(cache) == 2
    assert cache.get(((0, 4), (4, 9)), torch.int64, torch.device("cpu")) is not a
    assert cache.uploads == 4


def test_table_cache_keeps_what_a_capture_used_and_refuses_new_content_under_capture():
    cache = common.TableCache(capacity=1)
    kept = cache.get((7, 8), torch.int64, torch.device("cpu"))
    assert cache.get((7, 8), torch.int64, torch.device("cpu"), capturing=True) is kept  # a graph now holds it
    for i in range(5):
        cache.get((i,), torch.int64, torch.device("cpu"))
    assert cache.get((7, 8), torch.int64, torch.device("cpu")) is kept  # never evicted
    with pytest.raises(RuntimeError, match="run the op once with the same grids before capturing"):
        cache.get((9, 9), torch.int64, torch.device("cpu"), capturing=True)


def test_launch_guard_sets_the_tensors_device(monkeypatch):
    entered = []
    def fake_device(device):
        entered.append(device)
        return common.contextlib.nullcontext()

    monkeypatch.setattr(common.torch.cuda, "device", fake_device)
    with common.launch_guard(types.SimpleNamespace(device=torch.device("cuda", 1))):
        pass
    assert entered == [torch.device("cuda", 1)]
    with common.launch_guard(torch.zeros(1)):  # CPU (interpreter): no CUDA call at all
        pass
    assert entered == [torch.device("cuda", 1)]


def test_every_launcher_launches_under_the_guard_of_its_tensors(monkeypatch):
    seen = []

    def spy(like):
        seen.append(like.device)
        return common.contextlib.nullcontext()

    stems = ("anchor_scores", "balanced_topk", "merge")
    for stem in stems:
        monkeypatch.setattr(importlib.import_module(f"g2tr_kernels.triton.{stem}"), "launch_guard", spy)
    grids, anchor_grids = [(6, 6), (4, 5)], [(3, 3), (2, 2)]
    tokens, anchors = make_workload(grids, anchor_grids, 16, torch.float32, seed=1)
    g2tr.reduce(tokens, anchors, grids, anchor_grids, 0.5, 4, backend="triton")
    assert seen == [tokens.device] * 3  # score, select, merge


@pytest.mark.parametrize("dim", [17, 32, 0])
def test_aligned_rows(dim):
    x = torch.randn(5, dim)
    out = common.aligned_rows(x)
    assert out.shape == x.shape and out.stride(1) == 1 and out.stride(0) % 16 == 0 or dim == 0
    assert_bitwise_equal("values", out, x)
    if dim % 16 == 0:
        assert out is x or dim == 0
    else:  # a view of a zero-padded buffer: what the kernels read past D is zeros
        padded = torch.as_strided(out, (5, common.padded_width(dim)), (out.stride(0), 1))
        assert bool((padded[:, dim:] == 0).all())
    shifted = torch.randn(5 * 32 + 1)[1:].view(5, 32)  # a 4-byte offset: not 16-byte aligned
    assert common.aligned_rows(shifted).data_ptr() % 16 == 0
    wide = torch.randn(5, 48)[:, :32]  # row stride 48: aligned, kept as is
    assert common.aligned_rows(wide) is wide


def test_odd_dim_reduce_matches_reference():
    grids, anchor_grids = [(9, 7)], [(3, 3)]
    tokens, anchors = make_workload(grids, anchor_grids, 17, torch.bfloat16, seed=2)
    out = g2tr.reduce(tokens, anchors, grids, anchor_grids, 0.5, 4, backend="triton")
    assert out.merged.is_contiguous() and out.merged.shape == (32, 17)
    assert_reduce_matches(out, tokens, anchors, grids, anchor_grids, 0.5, 4, name="triton D 17")
