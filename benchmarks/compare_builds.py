"""Two builds of g2tr_kernels._C side by side, on the same inputs, in one run.

    python benchmarks/compare_builds.py BEFORE.so AFTER.so [--workload M1] [--dtype bf16] [--rounds 5]

Each build runs in its own subprocess (the two libraries register the same op names, so
they cannot share a process) over a copy of this tree's Python package with that .so.
The subprocesses alternate, round after round, so load changes on the machine hit both
alike; each round reports the median of `--reps` calls of torch.ops.g2tr.reduce on the
workload's packed batch (seeded random data). The result is the ratio of the medians of
the rounds, after / before.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TIMER = r"""
import json, sys, time, torch
import g2tr_kernels
from g2tr_kernels.bench import workloads
w = workloads.get(sys.argv[1])
dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[sys.argv[2]]
reps = int(sys.argv[3])
gen = torch.Generator().manual_seed(0)
n = sum(h * w_ for h, w_ in w.grids)
m = sum(h * w_ for h, w_ in w.anchor_grids)
tokens = torch.randn(n, w.dim, generator=gen).to(dtype)
anchors = torch.randn(m, w.dim, generator=gen).to(dtype)
grids = [v for p in w.grids for v in p]
agrids = [v for p in w.anchor_grids for v in p]
run = lambda: torch.ops.g2tr.reduce(tokens, anchors, grids, agrids, 0.5, 32, 1.0)
run()
times = []
for _ in range(reps):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
times.sort()
print(json.dumps({"median_s": times[len(times) // 2], "so": g2tr_kernels._native._C.__file__}))
"""


def package_with(so_path: str, where: str) -> str:
    dest = os.path.join(where, "g2tr_kernels")
    shutil.copytree(os.path.join(ROOT, "g2tr_kernels"), dest,
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copy(so_path, os.path.join(dest, os.path.basename(so_path)))
    return where


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--workload", default="M1")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        roots = {}
        for name, so in (("before", args.before), ("after", args.after)):
            os.makedirs(os.path.join(tmp, name))
            roots[name] = package_with(os.path.abspath(so), os.path.join(tmp, name))
        medians = {"before": [], "after": []}
        for r in range(args.rounds):
            for name in (("before", "after") if r % 2 == 0 else ("after", "before")):
                env = dict(os.environ, PYTHONPATH=roots[name])
                out = subprocess.run([sys.executable, "-c", TIMER, args.workload, args.dtype, str(args.reps)],
                                     capture_output=True, text=True, env=env, cwd=tmp, check=True)
                medians[name].append(json.loads(out.stdout.strip().splitlines()[-1])["median_s"])
        before, after = statistics.median(medians["before"]), statistics.median(medians["after"])
        print(f"reduce {args.workload} {args.dtype}: before {before * 1e3:.2f} ms, after {after * 1e3:.2f} ms, "
              f"after / before = {after / before:.3f}  "
              f"(medians of {args.rounds} alternating rounds x {args.reps} calls)")
        print(json.dumps({k: [round(v * 1e3, 3) for v in vs] for k, vs in medians.items()}))


if __name__ == "__main__":
    main()
