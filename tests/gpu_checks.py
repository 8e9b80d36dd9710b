"""The GPU checks at real sizes (D = 3584 and odd D), runnable with or without pytest.

    python tests/gpu_checks.py --json out.json           # on a GPU: every check, cuda and triton
    python tests/gpu_checks.py --device cpu --smoke      # here: the same code on tiny CPU shapes

tests/test_gpu.py runs these under pytest; tools/gpu_check.sh runs this file directly
(a machine without pytest or hypothesis still gets them). Each check compares a backend
with the reference tie-aware (tests/helpers.py), or with itself bit for bit, and raises
AssertionError with a mismatch report. On the CPU (--device cpu) the GPU backends become
the cpu kernels and the Triton kernels under TRITON_INTERPRET=1, at tiny shapes, so a
broken check is found before a GPU lease is spent on it; checks that need CUDA (graphs,
streams, compile, registers) say "skipped: needs CUDA" there.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import types
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent


def _pytest_stand_in() -> None:
    """helpers.py imports pytest for its parametrisations only; without pytest give it a
    module with those names so the plain runner still works (nothing here uses them)."""
    try:
        import pytest  # noqa: F401
    except ImportError:
        stand_in = types.ModuleType("pytest")
        stand_in.mark = types.SimpleNamespace(parametrize=lambda *a, **k: (lambda f: f))

        def importorskip(name, *args, **kwargs):
            return __import__(name)

        stand_in.importorskip = importorskip
        sys.modules["pytest"] = stand_in


class Skip(Exception):
    """A check that cannot run on this device (said in the results, never counted as passed)."""


Case = Tuple[str, Callable[[], Dict]]


def cases(device: str, smoke: bool) -> List[Case]:
    """(name, check) pairs. Imports torch and the package (after TRITON_INTERPRET is settled)."""
    import torch

    import g2tr_kernels as g2tr
    from g2tr_kernels.bench import workloads as wl

    sys.path.insert(0, str(HERE))
    _pytest_stand_in()
    import helpers

    cuda = device.startswith("cuda")
    backends = ["cuda", "triton"] if cuda else ["cpu", "triton"]

    def shape(name: str, dim: int):
        w = wl.get(name)
        if smoke:
            w = w.tiny()
        return list(w.grids), list(w.anchor_grids), (dim if dim <= 40 or not smoke else 40 - dim % 2)

    min_keep = 4 if smoke else 32

    def inputs(name, dim, dtype, seed=0):
        grids, anchor_grids, d = shape(name, dim)
        w = wl.Workload(name, "", tuple(grids), tuple(anchor_grids), d)
        tokens, anchors = wl.make_inputs(w, dtype, device, seed)
        return grids, anchor_grids, tokens, anchors

    def flat(pairs):
        return [v for p in pairs for v in p]

    def raw_call(backend, name, dim, seed):
        """(tokens, anchors, op, the op's other arguments): the raw op, as graphs and compile see it."""
        grids, anchor_grids, tokens, anchors = inputs(name, dim, torch.bfloat16, seed)
        op = torch.ops.g2tr.triton_reduce if backend == "triton" else torch.ops.g2tr.reduce
        return tokens, anchors, op, (flat(grids), flat(anchor_grids), 0.5, min_keep, 1.0)

    def call(backend, tokens, anchors, grids, anchor_grids):
        return g2tr.reduce(tokens, anchors, grids, anchor_grids, 0.5, min_keep, backend=backend)

    def to_cpu(out):
        return g2tr.ReduceOutput(*(t.cpu() for t in out))

    def against_reference(backend, name, dim, dtype):
        def run():
            grids, anchor_grids, tokens, anchors = inputs(name, dim, dtype)
            start = time.perf_counter()
            out = call(backend, tokens, anchors, grids, anchor_grids)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start  # first call: compile and warm-up included
            helpers.assert_reduce_matches(out, tokens, anchors, grids, anchor_grids, 0.5, min_keep,
                                          name=f"{backend} {name} D {tokens.shape[1]} {dtype}")
            return {"tokens": tokens.shape[0], "dim": tokens.shape[1], "first_call_s": round(seconds, 3)}

        return run

    def deterministic(backend):
        def run():
            grids, anchor_grids, tokens, anchors = inputs("M2", 3584, torch.bfloat16, seed=3)
            first = to_cpu(call(backend, tokens, anchors, grids, anchor_grids))
            for i in range(2):
                again = to_cpu(call(backend, tokens, anchors, grids, anchor_grids))
                helpers.assert_outputs_bitwise_equal(f"{backend} rerun {i + 1}", again, first)
            return {"runs": 3}

        return run

    def needs_cuda():
        if not cuda:
            raise Skip("needs CUDA")

    def graph_capture(backend):
        def run():
            needs_cuda()
            tokens, anchors, op, args = raw_call(backend, "M2", 3584, seed=4)
            static_t, static_a = tokens.clone(), anchors.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up outside the capture: compiles, tables, allocator pools
                    op(static_t, static_a, *args)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = op(static_t, static_a, *args)
            for seed in (5, 6):
                _, _, new_t, new_a = inputs("M2", 3584, torch.bfloat16, seed=seed)
                static_t.copy_(new_t)
                static_a.copy_(new_a)
                graph.replay()
                torch.cuda.synchronize()
                eager = op(new_t, new_a, *args)
                helpers.assert_outputs_bitwise_equal(f"{backend} graph replay {seed}",
                                                     to_cpu(g2tr.ReduceOutput(*static_out)),
                                                     to_cpu(g2tr.ReduceOutput(*eager)))
            return {"replays": 2}

        return run

    def current_stream(backend):
        def run():
            needs_cuda()
            grids, anchor_grids, tokens, anchors = inputs("S1", 2048, torch.bfloat16, seed=7)
            want = to_cpu(call(backend, tokens, anchors, grids, anchor_grids))
            torch.cuda.synchronize()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                torch.cuda._sleep(100_000_000)  # the input is written late on this stream
                late = tokens.clone()
                got = call(backend, late, anchors, grids, anchor_grids)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            helpers.assert_outputs_bitwise_equal(f"{backend} side stream", to_cpu(got), want)
            return {}

        return run

    def compiled(backend):
        def run():
            needs_cuda()
            tokens, anchors, op, args = raw_call(backend, "M1", 3584, seed=8)
            fn = torch.compile(lambda t, a: op(t, a, *args), fullgraph=True)
            helpers.assert_outputs_bitwise_equal(f"{backend} torch.compile",
                                                 to_cpu(g2tr.ReduceOutput(*fn(tokens, anchors))),
                                                 to_cpu(g2tr.ReduceOutput(*op(tokens, anchors, *args))))
            return {}

        return run

    def extreme_magnitudes(backend):
        # Cosines at any finite magnitude (SPEC.md §3): rows near each dtype's maximum and in
        # the subnormal range give the float64 cosine within 1e-6 (scores, and the merge's
        # argmax on the mma and fma kernels), as tests/test_extreme_values.py asks on the CPU,
        # and at D = 3584 / 3583 here.
        def run():
            import test_extreme_values as ev

            for dtype in (torch.float32, torch.bfloat16):
                ev.test_merge_assignment_at_every_magnitude(backend, device, dtype)
                ev.test_scores_match_float64_at_every_magnitude(backend, device, dtype)
            ev.test_reduce_at_extreme_magnitude_keeps_what_unit_scale_keeps(backend, device)
            ev.test_normal_rows_are_bitwise_unchanged_by_an_extreme_neighbour(backend, device)
            worst = 0.0
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                for i, scale in enumerate(ev.magnitudes(dtype)):
                    for d in ((40, 39) if smoke else (3584, 3583)):
                        tokens, anchors = ev.rows(256, d, scale, dtype, seed=i), ev.rows(16, d, scale, dtype, seed=50 + i)
                        scores, cells = g2tr.anchor_scores(tokens.to(device), anchors.to(device), [(16, 16)], [(4, 4)],
                                                           backend=backend)
                        err = (scores.cpu().double() - ev.cosine64(tokens, anchors[cells.cpu()])).abs().max().item()
                        assert err <= 1e-6, f"{backend} {dtype} D {d} scale {scale:g}: error {err:.3g}"
                        worst = max(worst, err)
            return {"max_error": worst}

        return run

    def triton_registers():
        needs_cuda()
        import importlib

        found, spilled = {}, []
        for stem in ("anchor_scores", "balanced_topk", "merge"):
            mod = importlib.import_module(f"g2tr_kernels.triton.{stem}")
            for name in dir(mod):
                kernel = getattr(mod, name)
                for cache in getattr(kernel, "device_caches", {}).values():
                    # (kernel cache, ...): its layout differs between Triton releases, so take
                    # every compiled kernel found in its dicts.
                    compiled = [v for part in cache if isinstance(part, dict) for v in part.values()
                                if hasattr(v, "_init_handles")]
                    for compiled_kernel in {c.hash: c for c in compiled}.values():
                        compiled_kernel._init_handles()
                        key = f"{name} ({compiled_kernel.hash[:8]})"
                        found[key] = {"registers": compiled_kernel.n_regs, "spills": compiled_kernel.n_spills,
                                      "shared": compiled_kernel.metadata.shared}
                        if compiled_kernel.n_spills:
                            spilled.append(key)
        assert found, "no compiled Triton kernel found: the checks above should have compiled them"
        assert not spilled, f"Triton kernels with register spills on this GPU: {spilled}"
        return {"kernels": found}

    out: List[Case] = []
    for backend in backends:
        for name, dim, dtype in [
            ("M1", 3584, torch.bfloat16),
            ("M2", 3584, torch.bfloat16),
            ("S1", 2048, torch.bfloat16),
            ("M1", 3583, torch.bfloat16),  # odd D: padded rows on Triton, element-wise loads on CUDA
            ("M1", 3584, torch.float16),
            ("M1", 3583, torch.float32),
            ("S1", 17, torch.float16),
        ]:
            out.append((f"{backend}: {name} D={dim} {helpers.DTYPE_IDS[dtype]} vs reference",
                        against_reference(backend, name, dim, dtype)))
        out.append((f"{backend}: deterministic (M2, 3 runs)", deterministic(backend)))
        out.append((f"{backend}: CUDA graph capture and replay (M2)", graph_capture(backend)))
        out.append((f"{backend}: runs on the current stream (S1)", current_stream(backend)))
        out.append((f"{backend}: torch.compile fullgraph equals eager (M1)", compiled(backend)))
        out.append((f"{backend}: cosines at extreme magnitudes vs float64", extreme_magnitudes(backend)))
    out.append(("triton: compiled kernels have no register spills", triton_registers))
    return out


def run_all(device: str, smoke: bool, only: Optional[str] = None) -> List[Dict]:
    results = []
    for name, check in cases(device, smoke):
        if only and only not in name:
            continue
        start = time.perf_counter()
        try:
            details = check() or {}
            status, message = "passed", ""
        except Skip as why:
            status, message, details = "skipped", str(why), {}
        except Exception as error:  # noqa: BLE001  (every failure is reported, none stops the run)
            status, message, details = "failed", "".join(traceback.format_exception(error))[-4000:], {}
        seconds = time.perf_counter() - start
        results.append({"name": name, "status": status, "seconds": round(seconds, 2), "message": message,
                        "details": details})
        print(f"{status.upper():8s} {seconds:7.1f}s  {name}" + (f"  ({message.splitlines()[-1]})" if message else ""),
              flush=True)
    return results


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (the default on the CPU)")
    parser.add_argument("--only", help="run the checks whose name contains this")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    results = run_all(args.device, args.smoke or args.device == "cpu", args.only)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "results": results}, f, indent=1)
    failed = [r for r in results if r["status"] == "failed"]
    print(f"gpu_checks: {len(results) - len(failed)} of {len(results)} without failure "
          f"({sum(r['status'] == 'skipped' for r in results)} skipped)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
