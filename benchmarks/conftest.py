"""pytest-benchmark suite of the G2TR ops: one file per op, grouped by workload and backend.

    pytest benchmarks                          # S1 S2 M1 M2 on every usable backend, with peers
    pytest benchmarks --g2tr-large             # also L1 L2
    pytest benchmarks --benchmark-disable      # CI smoke: tiny shapes, every case run once

Each case checks its output against the reference path once, then times. The files
are named bench_<op>.py (the project's one-stem-per-op rule); this conftest collects them.
"""
from __future__ import annotations

import functools
from typing import Dict, List

import pytest
import torch

from g2tr_kernels import ops, testing
from g2tr_kernels.bench import runner, workloads


def pytest_addoption(parser):
    group = parser.getgroup("g2tr")
    group.addoption("--g2tr-workloads", default=None, help="comma-separated SHAPES.md ids (default S1,S2,M1,M2)")
    group.addoption("--g2tr-large", action="store_true", help="add L1 and L2")
    group.addoption("--g2tr-device", default=None, help="cpu or cuda (default cuda when available)")
    group.addoption("--g2tr-dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    group.addoption("--g2tr-rounds", type=int, default=3, help="timed rounds per case (after one warmup round)")


def pytest_collect_file(file_path, parent):
    # Files named on the command line are collected by pytest itself.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def smoke(config) -> bool:
    """--benchmark-disable runs every case once: use tiny shapes so CI finishes in seconds."""
    return bool(config.getoption("benchmark_disable", default=False))


def workload_ids(config) -> List[str]:
    if smoke(config) and not config.getoption("--g2tr-workloads"):
        return ["S1-tiny", "M2-tiny"]
    chosen = config.getoption("--g2tr-workloads")
    ids = chosen.split(",") if chosen else list(workloads.DEFAULT_WORKLOADS)
    if config.getoption("--g2tr-large"):
        ids += [w for w in workloads.LARGE_WORKLOADS if w not in ids]
    return ids


def device_of(config) -> torch.device:
    name = config.getoption("--g2tr-device")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def native_backends(config) -> List[str]:
    usable, _ = runner.available_backends(device_of(config))
    return usable


def pytest_generate_tests(metafunc):
    config = metafunc.config
    if "workload_id" in metafunc.fixturenames:
        metafunc.parametrize("workload_id", workload_ids(config))
    if "backend" in metafunc.fixturenames:
        extra = getattr(metafunc.module, "PEERS", ())
        if device_of(config).type != "cpu":
            extra = [p for p in extra if p not in getattr(metafunc.module, "CPU_ONLY_PEERS", ())]
        metafunc.parametrize("backend", ["reference"] + native_backends(config) + list(extra))


class Problem:
    """One workload's inputs and its reference outputs, made once per session."""

    def __init__(self, workload_id: str, device: torch.device, dtype: torch.dtype, min_keep: int):
        self.workload = workloads.get(workload_id)
        self.dtype = dtype
        self.keep_ratio = 0.5
        self.min_keep = min_keep
        self.grids = list(self.workload.grids)
        self.anchor_grids = list(self.workload.anchor_grids)
        self.lengths = self.workload.lengths
        self.cell_counts = self.workload.cell_counts
        self.budgets = self.workload.budgets(self.keep_ratio, min_keep)
        self.tokens, self.anchors = workloads.make_inputs(self.workload, dtype, device)
        self.ref = ops.reduce(self.tokens, self.anchors, self.grids, self.anchor_grids, self.keep_ratio, min_keep,
                              backend="reference")
        _, self.cells = ops.anchor_scores(self.tokens, self.anchors, self.grids, self.anchor_grids, backend="reference")

    def info(self, backend: str) -> Dict:
        return {"workload": self.workload.id, "backend": backend, "n_total": self.workload.n_total,
                "dim": self.workload.dim, "k_total": sum(self.budgets), "images": self.workload.images,
                "dtype": str(self.dtype).replace("torch.", ""), "device": str(self.tokens.device)}


@functools.lru_cache(maxsize=2)  # the large workloads hold GBs: keep few alive
def _problem(workload_id: str, device: str, dtype: str, min_keep: int) -> Problem:
    return Problem(workload_id, torch.device(device), getattr(torch, dtype), min_keep)


@pytest.fixture
def problem(request, workload_id) -> Problem:
    config = request.config
    min_keep = workloads.SMOKE_MIN_KEEP if workload_id.endswith("-tiny") else 32
    return _problem(workload_id, str(device_of(config)), config.getoption("--g2tr-dtype"), min_keep)


@pytest.fixture
def measure(request, benchmark):
    """measure(problem, op, backend, fn): group by op and workload, then time fn."""
    rounds = request.config.getoption("--g2tr-rounds")

    def run(problem: Problem, op: str, backend: str, fn):
        benchmark.group = f"{op} {problem.workload.id}"
        benchmark.extra_info.update(problem.info(backend))
        benchmark.extra_info["op"] = op
        sync = problem.tokens.device.type == "cuda"

        def call():
            out = fn()
            if sync:
                torch.cuda.synchronize()
            return out

        return benchmark.pedantic(call, rounds=rounds, warmup_rounds=1, iterations=1)

    return run


def assert_merge_matches(problem: Problem, keep_idx: torch.Tensor, assign: torch.Tensor, merged: torch.Tensor) -> None:
    """merged/assign against the reference merge of the same keep set, tie-aware, with the
    tests' tolerances (g2tr_kernels.testing)."""
    expected = (problem.ref.merged, problem.ref.assign) if torch.equal(keep_idx, problem.ref.keep_idx) else None
    testing.assert_merge_matches(f"{problem.workload.id} merge", problem.tokens, keep_idx, merged, assign,
                                 problem.lengths, problem.budgets, 1.0, expected)


@pytest.fixture
def merge_check():
    return assert_merge_matches
