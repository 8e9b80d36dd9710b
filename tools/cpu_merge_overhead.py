"""Where the CPU merge paths' time goes beyond the floors, timed interleaved (A B C A B C ...).

    python tools/cpu_merge_overhead.py            # M1, bf16, 5 rounds
    WL=M2 REPS=3 python tools/cpu_merge_overhead.py

Rows: reduce on each path (G2TR_CPU_MERGE), the fp32 and bf16 floors of the merge shapes, and
the pieces a GEMM path adds to its floor, each alone: the score stage, widening every token
to fp32, and a row argmax over an (N-K) x K matrix. On an Intel CPU without AMX (where the
rule picks fp32_gemm) "reduce fp32_gemm / fp32 floor" is the number that matters.
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # this checkout's package
import torch

import g2tr_kernels as g2tr
from g2tr_kernels.bench import runner, workloads

w = workloads.get(os.environ.get("WL", "M1"))
tokens, anchors = workloads.make_inputs(w, torch.bfloat16, torch.device("cpu"), 0)
g, a = list(w.grids), list(w.anchor_grids)
floor32 = runner.floor_case(w, 0.5, 32, torch.device("cpu")).run
floor16 = runner.floor_case(w, 0.5, 32, torch.device("cpu"), dtype=torch.bfloat16).run
k_total = sum(w.budgets(0.5, 32))
sim = torch.randn(w.n_total - k_total, max(w.budgets(0.5, 32)))


def forced(path):
    def run():
        os.environ["G2TR_CPU_MERGE"] = path
        return g2tr.reduce(tokens, anchors, g, a, backend="cpu")

    return run


cases = {
    "reduce fp32_gemm": forced("fp32_gemm"),
    "reduce bf16_gemm": forced("bf16_gemm"),
    "floor fp32": floor32,
    "floor bf16": floor16,
    "score only": lambda: g2tr.anchor_scores(tokens, anchors, g, a, backend="cpu"),
    "widen all tokens": lambda: tokens.float(),
    "argmax (N-K)xK": lambda: sim.argmax(1),
}
if g2tr.build_info()["cpu_features"]["avx512_bf16"]:
    cases["reduce bf16_dot"] = forced("bf16_dot")
times = {name: [] for name in cases}
for fn in cases.values():
    fn()
for _ in range(int(os.environ.get("REPS", "5"))):
    for name, fn in cases.items():
        start = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - start)
print("load", open("/proc/loadavg").read().strip())
f32 = statistics.median(times["floor fp32"])
for name, v in times.items():
    m = statistics.median(v)
    print(f"{name:20s} {m * 1e3:9.1f} ms  / fp32 floor {m / f32:5.2f}")
