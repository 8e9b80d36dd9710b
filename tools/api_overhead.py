"""Python API call overhead of this tree against another revision, in one process.

    python tools/api_overhead.py --base main      # or any git revision

The base revision's g2tr_kernels/ops.py and _checks.py are loaded as package `old` (from
`git archive`), sharing this tree's extension, reference path and _native, so both sides
call the same kernels; tiny inputs make the routing and argument handling the cost. A/B
rounds alternate; the table gives min and median microseconds per call, then the number of
Python-level and C-level function calls per API call (sys.setprofile), which does not
depend on the machine's load.
"""
import argparse
import atexit
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
parser = argparse.ArgumentParser()
parser.add_argument("--base", default="main")
parser.add_argument("--rounds", type=int, default=40)
opts = parser.parse_args()
BASE = tempfile.mkdtemp(prefix="g2tr-api-base-")
atexit.register(shutil.rmtree, BASE, ignore_errors=True)
archive = subprocess.run(["git", "-C", ROOT, "archive", opts.base, "g2tr_kernels"], check=True, capture_output=True).stdout
subprocess.run(["tar", "-x", "-C", BASE], input=archive, check=True)

import torch  # noqa: E402

torch.set_num_threads(1)
import g2tr_kernels as new  # noqa: E402
from g2tr_kernels import _native, reference  # noqa: E402

old = types.ModuleType("old"); old.__path__ = [BASE + "/g2tr_kernels"]
sys.modules["old"] = old
sys.modules["old._native"] = _native
sys.modules["old.reference"] = reference
sys.modules["old.reference.budget"] = sys.modules["g2tr_kernels.reference.budget"]
import old.ops as old_ops  # noqa: E402  (the base revision's ops.py and _checks.py)

assert old_ops.__file__.startswith(BASE)
t = torch.randn(4, 8); a = torch.randn(1, 8)
s = torch.randn(4); c = torch.zeros(4, dtype=torch.long); k = torch.tensor([0, 2])
def calls(m):
    return {
        "reduce cpu": lambda: m.reduce(t, a, [(2, 2)], [(1, 1)], min_keep=1, backend="cpu"),
        "reduce auto": lambda: m.reduce(t, a, [(2, 2)], [(1, 1)], min_keep=1),
        "reduce reference": lambda: m.reduce(t, a, [(2, 2)], [(1, 1)], min_keep=1, backend="reference"),
        "anchor_scores cpu": lambda: m.anchor_scores(t, a, [(2, 2)], [(1, 1)], backend="cpu"),
        "balanced_topk cpu": lambda: m.balanced_topk(s, c, [4], [2], [1], backend="cpu"),
        "merge cpu": lambda: m.merge(t, k, [4], [2], backend="cpu"),
    }
A, B = calls(old_ops), calls(new)
raw = lambda: torch.ops.g2tr.reduce(t, a, [2, 2], [1, 1], 0.5, 1, 1.0)
res = {name: ([], []) for name in A}
res["raw torch.ops.g2tr.reduce"] = ([], [])
for name in list(A) + ["raw torch.ops.g2tr.reduce"]:
    fa, fb = (A[name], B[name]) if name in A else (raw, raw)
    for f in (fa, fb):
        for _ in range(100): f()
    reps = 20 if "reference" in name else 300
    for _ in range(opts.rounds):
        for i, f in enumerate((fa, fb)):
            t0 = time.perf_counter()
            for _ in range(reps): f()
            res[name][i].append((time.perf_counter() - t0) / reps * 1e6)
print(f"{'call (us per call)':28s} {'old min':>8s} {'new min':>8s} {'old med':>8s} {'new med':>8s} {'new/old med':>11s}")
for name, (o, n) in res.items():
    print(f"{name:28s} {min(o):8.1f} {min(n):8.1f} {statistics.median(o):8.1f} {statistics.median(n):8.1f} "
          f"{statistics.median(n) / statistics.median(o):11.2f}")

# Load-independent proxy: Python-level function calls per API call (sys.setprofile).
def count_calls(f):
    n = [0, 0]
    def prof(frame, event, arg):
        if event == "call":
            n[0] += 1
        elif event == "c_call":
            n[1] += 1
    sys.setprofile(prof)
    f()
    sys.setprofile(None)
    return n
print(f"{'call':28s} {'old py/C calls':>16s} {'new py/C calls':>16s}")
for name in A:
    o, n = count_calls(A[name]), count_calls(B[name])
    print(f"{name:28s} {o[0]:>7d} / {o[1]:<6d}  {n[0]:>7d} / {n[1]:<6d}")
