#!/usr/bin/env python3
"""The Python steps of tools/gpu_check.sh (see there): env, sanitize, profile, report.

    python tools/gpu_check.py env --json env.json
    python tools/gpu_check.py sanitize --backend cuda --workload M1      # under compute-sanitizer
    python tools/gpu_check.py profile --workloads S1 M1 M2 L2 --json profile.json
    python tools/gpu_check.py report --work build/gpu-check --out OUT

profile times, side by side on the same inputs, g2tr.reduce per GPU backend against the
floor (one bf16 torch.mm per image of the merge shapes, (N-K) x D times D x K: cuBLAS),
with CUDA events (median of the timed calls, inputs rotated over three sets so that no
call finds the previous one's data in L2), and lists per-kernel GPU times from
torch.profiler for one call. On the CPU (--device cpu, tiny shapes) it only exercises
the code.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

WORKLOADS = ("S1", "M1", "M2", "L2")


def _package():
    import g2tr_kernels as g2tr
    from g2tr_kernels.bench import workloads as wl

    return g2tr, wl


# ----------------------------------------------------------------------------------- env


def env_info() -> Dict:
    info: Dict = {"python": platform.python_version(), "machine": platform.machine(),
                  "cpus": os.cpu_count(), "when_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    for module in ("torch", "triton", "pytest", "hypothesis"):
        spec = importlib.util.find_spec(module)
        info[module] = None
        if spec is not None:
            try:
                info[module] = __import__(module).__version__
            except Exception as error:  # noqa: BLE001
                info[module] = f"present, import failed: {error}"
    try:
        import torch

        info["torch_cuda"] = torch.version.cuda
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = props.name
            info["sms"] = props.multi_processor_count
            info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
            info["capability"] = f"{props.major}.{props.minor}"
            info["gpu_count"] = torch.cuda.device_count()
    except Exception as error:  # noqa: BLE001
        info["torch_error"] = str(error)
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for tool in ("nvcc", "compute-sanitizer", "ncu", "nvidia-smi", "ninja"):
        path = shutil.which(tool) or next((p for p in (os.path.join(home, "bin", tool),) if os.path.exists(p)), None)
        info[tool] = path
    if info["nvcc"]:
        out = subprocess.run([info["nvcc"], "--version"], capture_output=True, text=True, check=False).stdout
        info["nvcc_version"] = out.strip().splitlines()[-1] if out.strip() else None
    if info["nvidia-smi"]:
        query = "--query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu"
        out = subprocess.run([info["nvidia-smi"], query,
                              "--format=csv,noheader"], capture_output=True, text=True, check=False).stdout
        info["nvidia_smi"] = out.strip()
    return info


# ------------------------------------------------------------------------------ sanitize


def sanitize(backend: str, workload: str, dtype_name: str) -> int:
    """One reduce call at the full workload size (the sanitizer watches every access)."""
    import torch

    g2tr, wl = _package()
    w = wl.get(workload)
    tokens, anchors = wl.make_inputs(w, getattr(torch, dtype_name), "cuda", 0)
    out = g2tr.reduce(tokens, anchors, list(w.grids), list(w.anchor_grids), backend=backend)
    torch.cuda.synchronize()
    print(f"sanitize {backend} {workload} {dtype_name}: K_total {out.keep_idx.numel()} of {tokens.shape[0]}, ok")
    return 0


# ------------------------------------------------------------------------------- profile


def _timed(fn, device, repeats: int, rotate: int) -> List[float]:
    """Seconds per call of fn(i) for i cycling over rotate input sets (events on CUDA)."""
    import torch

    for i in range(rotate):  # warm-up: compiles, tables, allocator
        fn(i)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for r in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(r % rotate)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for r in range(repeats):
            t0 = time.perf_counter()
            fn(r % rotate)
            times.append(time.perf_counter() - t0)
    return times


def _kernel_times(fn, device) -> List[Dict]:
    """Per-kernel device time (us) of one call, from torch.profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn(0)
        if device.type == "cuda":
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        device_us = getattr(e, "device_time_total", None)
        if device_us is None:
            device_us = getattr(e, "cuda_time_total", 0)
        if device.type == "cuda" and not device_us:
            continue
        if device.type == "cuda" and getattr(e, "device_type", None) is not None and "CUDA" not in str(e.device_type):
            continue
        rows.append({"name": e.key[:90], "calls": e.count,
                     "us": round(device_us if device.type == "cuda" else e.cpu_time_total, 1)})
    rows.sort(key=lambda r: -r["us"])
    return rows[:25]


def profile_workloads(names, device_name: str, repeats: int, smoke: bool) -> Dict:
    import torch

    g2tr, wl = _package()
    device = torch.device(device_name)
    min_keep = 4 if smoke else 32
    backends = ["cuda", "triton"] if device.type == "cuda" else ["cpu"]
    result: Dict = {"device": device_name, "repeats": repeats, "workloads": {}}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    for name in names:
        w = wl.get(name + ("-tiny" if smoke else ""))
        grids, anchor_grids = list(w.grids), list(w.anchor_grids)
        sets = [wl.make_inputs(w, torch.bfloat16, device, seed) for seed in range(3)]
        budgets = w.budgets(0.5, min_keep)
        entry: Dict = {"tokens": w.n_total, "dim": w.dim, "k_total": sum(budgets), "rows": {}}
        # The floor: the merge's own product, one bf16 matmul per image (cuBLAS on CUDA).
        left = [[t[:n - k].contiguous() for n, k, t in _split(tokens, w.lengths, budgets)] for tokens, _ in sets]
        right = [[t[n - k:].t().contiguous() for n, k, t in _split(tokens, w.lengths, budgets)] for tokens, _ in sets]

        def floor(i, left=left, right=right):
            return [torch.mm(a, b) for a, b in zip(left[i], right[i])]

        flops = sum(2 * (n - k) * k * w.dim for n, k in zip(w.lengths, budgets))
        times = _timed(floor, device, repeats, 3)
        entry["rows"]["floor: bf16 torch.mm of the merge shapes"] = {"median_s": statistics.median(times),
                                                                     "tflops": flops / statistics.median(times) / 1e12}
        for backend in backends:
            def call(i, backend=backend, sets=sets, grids=grids, anchor_grids=anchor_grids):
                tokens, anchors = sets[i]
                return g2tr.reduce(tokens, anchors, grids, anchor_grids, 0.5, min_keep, backend=backend)

            try:
                times = _timed(call, device, repeats, 3)
                entry["rows"][f"g2tr.reduce {backend}"] = {"median_s": statistics.median(times),
                                                           "min_s": min(times), "kernels": _kernel_times(call, device)}
            except Exception as error:  # noqa: BLE001  (one backend failing must not hide the others)
                entry["rows"][f"g2tr.reduce {backend}"] = {"error": f"{type(error).__name__}: {error}"[:500]}
        floor_s = entry["rows"]["floor: bf16 torch.mm of the merge shapes"]["median_s"]
        for row in entry["rows"].values():
            if "median_s" in row:
                row["ratio_to_floor"] = row["median_s"] / floor_s
        result["workloads"][name] = entry
        print(_profile_table(name, entry), flush=True)
        del sets, left, right
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def _split(tokens, lengths, budgets):
    start = 0
    for n, k in zip(lengths, budgets):
        yield n, k, tokens[start:start + n]
        start += n


def _profile_table(name: str, entry: Dict) -> str:
    lines = [f"{name}: {entry['tokens']} tokens, D {entry['dim']}, K {entry['k_total']}"]
    for label, row in entry["rows"].items():
        if "error" in row:
            lines.append(f"  {label:45s} ERROR {row['error']}")
        else:
            lines.append(f"  {label:45s} {row['median_s'] * 1e3:9.3f} ms  x{row['ratio_to_floor']:.2f} of the floor")
    return "\n".join(lines)


# -------------------------------------------------------------------------------- report

UNMEASURED = [
    ("CUDA and Triton kernels correct on hardware at D = 3584 and odd D", "gpu_checks, pytest"),
    ("no out-of-bounds access, race or barrier misuse (reduce, M1 and M2)", "sanitizers"),
    ("CUDA-graph capture of reduce, both GPU backends", "gpu_checks (graph capture)"),
    ("Triton kernels without register spills as compiled on the GPU", "gpu_checks (registers)"),
    ("reduce time per backend vs the bf16 cuBLAS floor (S1, M1, M2, L2)", "profile"),
    ("per-kernel GPU times", "profile (torch.profiler)"),
    ("reduce vs reference and published structure on the GPU", "bench"),
]


def _read(path: str) -> Optional[Dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _sanitizer_summary(log: str) -> str:
    try:
        text = open(log, errors="replace").read()
    except OSError:
        return "no log"
    summary = [ln.strip() for ln in text.splitlines() if "ERROR SUMMARY" in ln or "RACECHECK SUMMARY" in ln]
    return "; ".join(summary[-2:]) if summary else "no summary line"


def report(work: str, out: str, dry_run: bool) -> int:
    steps = []
    path = os.path.join(work, "steps.tsv")
    if os.path.exists(path):
        with open(path) as f:
            steps = list(csv.DictReader(f, delimiter="\t"))
    env = _read(os.path.join(work, "env.json")) or {}
    checks = _read(os.path.join(work, "gpu_checks.json"))
    prof = _read(os.path.join(work, "profile.json"))
    data = {"dry_run": dry_run, "env": env, "steps": steps, "gpu_checks": checks, "profile": prof}

    def status(step):
        rc = step["rc"]
        if rc == "dry-run":
            return "not run (dry run)"
        if rc in ("124", "137"):
            return f"TIMEOUT after {step['timeout_s']} s"
        if rc == "skip":
            return "skipped: " + step["command"]
        return "ok" if rc == "0" else f"FAILED (exit {rc})"

    lines = [f"# gpu_check report{' (dry run: nothing ran on a GPU)' if dry_run else ''}", ""]
    gpu = env.get("gpu") or "no GPU"
    lines += [f"{env.get('when_utc', '?')} UTC on {gpu} ({env.get('sms', '?')} SMs), {env.get('cpus', '?')} CPUs; "
              f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), triton {env.get('triton')}, "
              f"{env.get('nvcc_version') or 'no nvcc'}; pytest {env.get('pytest') or 'MISSING'}, "
              f"hypothesis {env.get('hypothesis') or 'MISSING'}; "
              f"{'ninja' if env.get('ninja') else 'no ninja (the build compiled one file at a time)'}.", ""]
    if not (env.get("pytest") and env.get("hypothesis")):
        lines += ["**pytest or hypothesis is missing here**: the pytest steps did not run; the plain-Python runner "
                  "ran tests/gpu_checks.py instead (tests/test_cuda.py and tests/test_triton.py need pytest).", ""]
    lines += ["## Steps", "", "| step | status | seconds | command |", "|---|---|---:|---|"]
    for step in steps:
        cmd = step["command"].replace("|", "\\|")
        lines.append(f"| {step['name']} | {status(step)} | {step['seconds']} | `{cmd[:160]}` |")
    sanitizers = [s for s in steps if s["name"].startswith("sanitize")]
    if sanitizers and not dry_run:
        lines += ["", "## compute-sanitizer", "", "| run | status | summary |", "|---|---|---|"]
        for s in sanitizers:
            lines.append(f"| {s['name']} | {status(s)} | {_sanitizer_summary(s['log'])} |")
    if checks:
        lines += ["", "## GPU checks (tests/gpu_checks.py)", "", "| check | status | s | note |", "|---|---|---:|---|"]
        for r in checks["results"]:
            note = r["message"].strip().splitlines()[-1][:150] if r["message"] else ""
            if r["details"].get("kernels"):
                worst = max(r["details"]["kernels"].values(), key=lambda k: k["registers"])
                note = f"{len(r['details']['kernels'])} kernels, max {worst['registers']} registers"
            lines.append(f"| {r['name']} | {r['status']} | {r['seconds']} | {note.replace('|', '/')} |")
    if prof:
        lines += ["", f"## Times ({prof.get('gpu', prof['device'])}; median of {prof['repeats']} calls, CUDA events, "
                  "inputs rotated over 3 sets)", "",
                  "| workload | method | median (ms) | x floor |", "|---|---|---:|---:|"]
        for name, entry in prof["workloads"].items():
            for label, row in entry["rows"].items():
                if "error" in row:
                    lines.append(f"| {name} | {label} | error: {row['error'][:80]} | |")
                else:
                    lines.append(f"| {name} | {label} | {row['median_s'] * 1e3:.3f} | {row['ratio_to_floor']:.2f} |")
        for name, entry in prof["workloads"].items():
            for label, row in entry["rows"].items():
                if row.get("kernels"):
                    lines += ["", f"Kernels of one {label} call on {name} (torch.profiler):", "",
                              "| kernel | calls | us |", "|---|---:|---:|"]
                    lines += [f"| `{k['name']}` | {k['calls']} | {k['us']} |" for k in row["kernels"][:12]]
    lines += ["", "## What this run measured of what was unmeasured", "", "| item | from | this run |", "|---|---|---|"]
    by_name = {s["name"]: s for s in steps}
    for item, source in UNMEASURED:
        related = [s for n, s in by_name.items() if n.split(":")[0].split("-")[0] in source]
        seen = "not run (dry run)" if dry_run else (
            ", ".join(sorted({status(s) for s in related})) if related else "no step")
        lines.append(f"| {item} | {source} | {seen} |")
    lines += ["", "Logs: logs.tar.gz (one file per step); bench.md: `g2tr bench --device cuda` output.", ""]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(data, f, indent=1, default=str)
    print("\n".join(lines[: 6 + len(steps) + 4]))
    failed = [s for s in steps if s["rc"] not in ("0", "dry-run", "skip")]
    return 1 if failed else 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("env")
    p.add_argument("--json")
    p = sub.add_parser("sanitize")
    p.add_argument("--backend", required=True, choices=["cuda", "triton"])
    p.add_argument("--workload", required=True)
    p.add_argument("--dtype", default="bfloat16")
    p = sub.add_parser("profile")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    p.add_argument("--device", default="cuda")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="tiny shapes (the default on the CPU)")
    p.add_argument("--json")
    p = sub.add_parser("report")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    if args.cmd == "env":
        info = env_info()
        print(json.dumps(info, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(info, f, indent=1)
        return 0
    if args.cmd == "sanitize":
        return sanitize(args.backend, args.workload, args.dtype)
    if args.cmd == "profile":
        res = profile_workloads(args.workloads, args.device, args.repeats, args.smoke or args.device == "cpu")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
        return 0
    return report(args.work, args.out, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
