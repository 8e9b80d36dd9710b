"""Timing, memory and error measurement for `g2tr bench`.

Time: `warmup` untimed calls (at least one: its output is what the errors are measured
on, and it absorbs compilation and first-touch costs), then `repeats` calls each timed
with time.perf_counter around the call (with a device synchronize on both sides on
CUDA); the median is reported, the minimum and all samples go to bench.json. A case
whose first call takes over LONG_CALL_S gets a single timed call (times_s shows it).

Peak extra memory: one more call after timing.
- CUDA: torch.cuda.max_memory_allocated() during the call minus memory_allocated()
  before it (the caching allocator's peak of live tensors, outputs included).
- CPU: the rise of the process's resident set during the call. Before the call, free
  heap memory is handed back to the kernel (glibc malloc_trim(0)) and the kernel's
  high-water mark is reset (writing 5 to /proc/self/clear_refs), so VmHWM after the
  call minus VmRSS before it counts every page the call touched for new data, outputs
  included. PyTorch's CPU allocator does not cache, so freed tensors go back to malloc.
  Where those interfaces are missing (not Linux/glibc) memory is reported as n/a.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import ops, reference, testing
from ..reference.budget import cell_ids
from . import peers, published
from .workloads import Workload, make_inputs, single_image

# ----------------------------------------------------------------------------- machine


def machine_info(device: torch.device) -> Dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    flags: List[str] = []
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        found = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        if found:
            cpu = found.group(1).strip()
        # The model name alone does not tell EPYC generations apart (family 25 model 17 is Zen 4).
        family, model = (re.search(rf"^{key}\s*:\s*(\d+)$", text, re.M) for key in ("cpu family", "model"))
        vendor = re.search(r"^vendor_id\s*:\s*(\S+)$", text, re.M)
        if family and model:
            cpu = f"{cpu}, {vendor.group(1) + ' ' if vendor else ''}family {family.group(1)} model {model.group(1)}"
        found = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        if found:
            present = set(found.group(1).split())
            flags = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
                                 "amx_bf16") if f in present]
    except OSError:
        pass
    info: Dict[str, Any] = {
        "cpu": cpu,
        "cpu_flags": flags,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
    }
    if hasattr(os, "getloadavg"):
        info["load_average"] = list(os.getloadavg())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        from .. import build_info

        info["build_info"] = build_info()
    except Exception as error:  # the bench still runs the reference path without the extension
        info["build_info"] = {"error": str(error).splitlines()[0]}
    return info


# ----------------------------------------------------------------------------- timing and memory


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


LONG_CALL_S = 20.0  # a first call longer than this gets one timed repeat, not `repeats`


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> Tuple[List[float], Any]:
    """(seconds per timed call, output of the first call)."""
    synchronize(device)
    start = time.perf_counter()
    first = fn()
    synchronize(device)
    if time.perf_counter() - start > LONG_CALL_S:  # L2-sized dense baselines: minutes per call
        warmup, repeats = 1, 1
    for _ in range(max(0, warmup - 1)):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
        del out
    return times, first


class _CpuPeakProbe:
    def __init__(self) -> None:
        self.error: Optional[str] = None
        try:
            self._libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            self._trim = self._libc.malloc_trim
            self._trim.argtypes = [ctypes.c_size_t]
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._status("VmHWM")
        except (OSError, AttributeError, KeyError) as error:
            self.error = f"CPU peak memory unavailable here ({error})"

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def measure(self, fn: Callable[[], Any]) -> Optional[int]:
        if self.error:
            return None
        gc.collect()
        self._trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = self._status("VmRSS")
        out = fn()
        peak = self._status("VmHWM")
        del out
        return max(0, peak - before)


_CPU_PROBE: Optional[_CpuPeakProbe] = None

MEMORY_METHOD = {
    "cpu": "peak RSS rise during one call (VmHWM reset via /proc/self/clear_refs after malloc_trim), outputs included",
    "cuda": "torch.cuda.max_memory_allocated() during one call minus memory_allocated() before it, outputs included",
}


def peak_extra_memory(fn: Callable[[], Any], device: torch.device) -> Optional[int]:
    global _CPU_PROBE
    if device.type == "cuda":
        gc.collect()
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        del out
        return peak - before
    if _CPU_PROBE is None:
        _CPU_PROBE = _CpuPeakProbe()
    return _CPU_PROBE.measure(fn)


# ----------------------------------------------------------------------------- cases


@dataclass
class Case:
    method: str  # row label
    scope: str  # reduce | score | select | merge | accumulate | floor
    kind: str  # ours | reference | published | peer | floor
    run: Callable[[], Any]
    errors: Optional[Callable[[Any], Dict[str, Any]]] = None
    note: str = ""
    baseline: bool = False  # the row the scope's speedups are taken against


SCOPES = ("reduce", "score", "select", "merge", "accumulate", "floor")
SCOPE_TITLES = {
    "reduce": "whole reduction (score + select + merge)",
    "score": "stage III score (anchor cosine)",
    "select": "stage III select (one seed per cell + fill)",
    "merge": "stage IV merge (assignment + mean), given the reference keep set",
    "accumulate": "stage IV mean only, given the reference assignment",
    "floor": "floors: one plain matmul (N-K) x D times D x K per image, in fp32 and in bf16",
}


@dataclass
class Options:
    dtype: torch.dtype = torch.bfloat16
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    keep_ratio: float = 0.5
    min_keep: int = 32
    warmup: int = 1
    repeats: int = 3
    backends: Optional[Sequence[str]] = None  # None: every usable one
    peers: bool = True
    compile: bool = True
    stages: bool = True
    memory: bool = True
    seed: int = 0


def available_backends(device: torch.device, requested: Optional[Sequence[str]] = None):
    """([usable native backends], {backend: why skipped})."""
    usable, skipped = [], {}
    native = "cuda" if device.type == "cuda" else "cpu"  # the other one cannot take these tensors
    for backend in requested or (native, "triton"):
        if backend == "reference":
            continue
        if backend == "triton" and device.type == "cpu" and requested is None:
            skipped[backend] = "triton on CPU runs only under TRITON_INTERPRET (a correctness tool); --backends triton times it"
            continue
        try:
            ops.resolve_backend(backend, device)
        except Exception as error:
            skipped[backend] = str(error).splitlines()[0]
            continue
        usable.append(backend)
    return usable, skipped


def _reduce_errors(ref, lengths: Sequence[int], budgets: Sequence[int]):
    device = ref.assign.device
    image_of_token = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    image_of_row = torch.repeat_interleave(torch.arange(len(budgets), device=device), torch.tensor(budgets, device=device))

    def errors(out) -> Dict[str, Any]:
        merged, keep_idx, _, _, assign = out
        found = {
            "max_abs_err": testing.max_abs_error(merged, ref.merged),
            "keep_idx_diff": testing.missing_kept(keep_idx, ref.keep_idx),
            "assign_diff": testing.count_different(assign, ref.assign),
        }
        if assign.shape == ref.assign.shape and merged.shape[0] == image_of_row.numel():
            found["cross_image_merges"] = int((image_of_row[assign] != image_of_token).sum())
        return found

    return errors


FLOOR_DTYPES = (torch.float32, torch.bfloat16)


def floor_name(dtype: torch.dtype) -> str:
    return f"floor: {str(dtype).replace('torch.', '').replace('float32', 'fp32').replace('bfloat16', 'bf16')} matmul"


def floor_case(workload: Workload, keep_ratio: float, min_keep: int, device: torch.device, max_out_bytes=1 << 29,
               dtype: torch.dtype = torch.float32) -> Case:
    """A bound of the merge: one plain product (N-K) x D times D x K per image, in `dtype`.

    Two floors are timed, fp32 (MKL sgemm on the CPU) and bf16 (oneDNN on the CPU, fp32
    accumulation); "/ floor" is against the faster, whichever engine that is on this machine.
    Each image gets operands of its own, as reduce reads each image's own rows: with one
    pair per distinct shape, S1's 16 products re-read one cache-hot pair instead of 16
    images' data. Products whose output exceeds max_out_bytes are done in row blocks into
    one reused buffer per shape (the same FLOPs).
    """
    gen = torch.Generator().manual_seed(0)
    shapes = [(n - k, k) for n, k in zip(workload.lengths, workload.budgets(keep_ratio, min_keep))]
    d = workload.dim
    size = torch.empty((), dtype=dtype).element_size()
    outputs = {}
    operands = []
    for rows, k in shapes:
        if rows == 0 or k == 0:
            continue
        if (rows, k) not in outputs:
            block = max(1, min(rows, max_out_bytes // (size * k)))
            outputs[(rows, k)] = torch.empty(block, k, device=device, dtype=dtype)
        operands.append((
            torch.randn(rows, d, generator=gen).to(device=device, dtype=dtype),
            torch.randn(d, k, generator=gen).to(device=device, dtype=dtype),
            outputs[(rows, k)],
        ))

    def run():
        for a, b, out in operands:
            block = out.shape[0]
            for r0 in range(0, a.shape[0], block):
                r1 = min(a.shape[0], r0 + block)
                torch.mm(a[r0:r1], b, out=out[: r1 - r0])
        return None

    engine = {torch.float32: "MKL sgemm", torch.bfloat16: "oneDNN, fp32 accumulation"}.get(dtype, "")
    where = f" ({engine} on the CPU)" if device.type == "cpu" and engine else ""
    return Case(floor_name(dtype), "floor", "floor", run, note=f"sum over images of (N-K)xD @ DxK in {dtype}{where}")


def floor_cases(workload: Workload, keep_ratio: float, min_keep: int, device: torch.device,
                input_dtype: torch.dtype = torch.bfloat16) -> List[Case]:
    """Both floors for bf16 inputs; for fp32 and fp16 inputs only the fp32 one (a bf16 product
    does not compute their similarities to the precision the merge needs)."""
    dtypes = FLOOR_DTYPES if input_dtype == torch.bfloat16 else (torch.float32,)
    return [floor_case(workload, keep_ratio, min_keep, device, dtype=dt) for dt in dtypes]


# ----------------------------------------------------------------------------- CPU merge paths

CPU_MERGE_PATHS = ("bf16_dot", "fp32_gemm", "bf16_gemm")
CPU_MERGE_ENV = "G2TR_CPU_MERGE"


class forced_cpu_merge:
    """Runs the CPU merge on one path (G2TR_CPU_MERGE, read by the kernel on every call)."""

    def __init__(self, path: Optional[str]):
        self.path = path

    def __enter__(self):
        self.saved = os.environ.get(CPU_MERGE_ENV)
        if self.path is not None:
            os.environ[CPU_MERGE_ENV] = self.path
        return self

    def __exit__(self, *exc):
        if self.saved is None:
            os.environ.pop(CPU_MERGE_ENV, None)
        else:
            os.environ[CPU_MERGE_ENV] = self.saved
        return False


def cpu_merge_paths(dtype: torch.dtype) -> Tuple[Optional[str], List[str]]:
    """(the path the CPU merge takes for dtype now, [the paths this CPU can be forced onto])."""
    try:
        from .. import build_info

        info = build_info()
    except Exception:
        return None, []
    name = str(dtype).replace("torch.", "")
    current = info.get("cpu_merge", {}).get(name, {}).get("path")
    if dtype != torch.bfloat16:
        return current, []
    usable = [p for p in CPU_MERGE_PATHS if p != "bf16_dot" or info.get("cpu_features", {}).get("avx512_bf16")]
    return current, usable


def build_cases(
    workload: Workload,
    tokens: torch.Tensor,
    anchors: torch.Tensor,
    ref: ops.ReduceOutput,
    opts: Options,
    backends: Sequence[str],
) -> List[Case]:
    grids, anchor_grids = list(workload.grids), list(workload.anchor_grids)
    lengths, cell_counts = workload.lengths, workload.cell_counts
    budgets = workload.budgets(opts.keep_ratio, opts.min_keep)
    kr, mk = opts.keep_ratio, opts.min_keep
    device = tokens.device
    cases: List[Case] = []

    # ---- the whole reduction
    def reduce_with(backend):
        return lambda: ops.reduce(tokens, anchors, grids, anchor_grids, kr, mk, backend=backend)

    reduce_errors = _reduce_errors(ref, lengths, budgets)
    cases.append(Case("reference", "reduce", "reference", reduce_with("reference"), reduce_errors,
                      "readable pure-PyTorch path (g2tr_kernels/reference)", baseline=True))
    for backend in backends:
        cases.append(Case(f"g2tr {backend}", "reduce", "ours", reduce_with(backend), reduce_errors))
    if "cpu" in backends and device.type == "cpu":
        # Every merge path this CPU can run, side by side with the automatic choice.
        auto_path, paths = cpu_merge_paths(tokens.dtype)
        run_cpu = reduce_with("cpu")
        for path in paths:
            def forced(path=path):
                with forced_cpu_merge(path):
                    return run_cpu()

            cases.append(Case(f"g2tr cpu, {path}", "reduce", "ours", forced, reduce_errors,
                              f"G2TR_CPU_MERGE={path}" + (" (the automatic choice here)" if path == auto_path else "")))
    cases.append(Case(
        "published structure", "reduce", "published",
        lambda: published.reduce(tokens, anchors, grids, anchor_grids, kr, mk),
        reduce_errors, "a rendering of the authors' code structure: per-cell Python loop, one dense similarity in the input dtype over the whole packed batch",
    ))
    if opts.peers and opts.compile:
        def compiled_reduce():
            torch._dynamo.reset()  # a fresh cache per workload: no recompile limit hit across shapes
            fn = torch.compile(reference.reduce)
            return lambda: fn(tokens, anchors, grids, anchor_grids, kr, mk, 1.0)

        holder: Dict[str, Callable] = {}

        def run_compiled():
            if "fn" not in holder:
                holder["fn"] = compiled_reduce()
            return holder["fn"]()

        cases.append(Case("torch.compile(reference)", "reduce", "peer", run_compiled, reduce_errors,
                          "inductor; compile time is in the warmup, not the timing"))
    if opts.peers:
        def tome_errors(out):
            _, keep_idx = out
            return {"keep_idx_diff": testing.missing_kept(keep_idx, ref.keep_idx)}

        cases.append(Case("ToMe bipartite", "reduce", "peer",
                          lambda: peers.tome_bipartite(tokens, lengths, kr, mk), tome_errors,
                          "different rule (A/B alternate split, no anchors): keep ≠ shows how different"))
    if not opts.stages:
        return cases

    # ---- stage III score
    def score_errors(out):
        return {"max_abs_err": testing.max_abs_error(out[0], ref.scores)}

    cases.append(Case("reference", "score", "reference",
                      lambda: ops.anchor_scores(tokens, anchors, grids, anchor_grids, backend="reference"),
                      score_errors, baseline=True))
    for backend in backends:
        cases.append(Case(f"g2tr {backend}", "score", "ours",
                          lambda b=backend: ops.anchor_scores(tokens, anchors, grids, anchor_grids, backend=b),
                          score_errors))

    # ---- stage III select, on the reference scores
    cells = torch.cat([cell_ids(h, w, ha, wa, device=device) for (h, w), (ha, wa) in zip(grids, anchor_grids)])
    scores = ref.scores

    def keep_errors(keep_idx):
        return {"keep_idx_diff": testing.missing_kept(keep_idx, ref.keep_idx)}

    cases.append(Case("reference", "select", "reference",
                      lambda: ops.balanced_topk(scores, cells, lengths, budgets, cell_counts, backend="reference"),
                      keep_errors, baseline=True))
    for backend in backends:
        cases.append(Case(f"g2tr {backend}", "select", "ours",
                          lambda b=backend: ops.balanced_topk(scores, cells, lengths, budgets, cell_counts, backend=b),
                          keep_errors))
    if opts.peers:
        cases.append(Case("torch.topk", "select", "peer", lambda: peers.topk_select(scores, lengths, budgets),
                          keep_errors, "plain top-K, no one-seed-per-cell rule"))
        cases.append(Case("torch.sort", "select", "peer", lambda: peers.sort_select(scores, lengths, budgets),
                          keep_errors, "stable sort, first K, no one-seed-per-cell rule"))

    # ---- stage IV merge, on the reference keep set
    keep_idx = ref.keep_idx

    def merge_errors(out):
        merged, assign = out
        return {"max_abs_err": testing.max_abs_error(merged, ref.merged),
                "assign_diff": testing.count_different(assign, ref.assign)}

    cases.append(Case("reference", "merge", "reference",
                      lambda: ops.merge(tokens, keep_idx, lengths, budgets, backend="reference"),
                      merge_errors, baseline=True))
    for backend in backends:
        cases.append(Case(f"g2tr {backend}", "merge", "ours",
                          lambda b=backend: ops.merge(tokens, keep_idx, lengths, budgets, backend=b), merge_errors))
    if opts.peers and device.type == "cpu" and peers.faiss_available():
        cases.append(Case("faiss IndexFlatIP", "merge", "peer",
                          lambda: peers.faiss_merge(tokens, keep_idx, lengths, budgets), merge_errors,
                          "exact inner-product search per image on fp32 unit vectors, then index_add mean"))

    # ---- stage IV mean only, on the reference assignment
    if opts.peers:
        k_total = sum(budgets)

        def mean_errors(merged):
            return {"max_abs_err": testing.max_abs_error(merged, ref.merged)}

        cases.append(Case("index_add mean", "accumulate", "peer",
                          lambda: peers.index_add_mean(tokens, ref.assign, k_total), mean_errors,
                          "sum and count by index_add, fp32", baseline=True))
        cases.append(Case("scatter_reduce mean", "accumulate", "peer",
                          lambda: peers.scatter_reduce_mean(tokens, ref.assign, k_total), mean_errors,
                          'scatter_reduce(reduce="mean"), fp32'))
    return cases


# ----------------------------------------------------------------------------- running


def run_cases(cases: Sequence[Case], opts: Options, progress=None, desc: str = "") -> List[Dict[str, Any]]:
    """Times every case interleaved: all first calls (warmup, errors), then `repeats` rounds of
    one timed call per case (A B C A B C ...), so drift in the machine's speed (other jobs on
    shared cores) hits every case alike; then one peak-memory call per case."""
    rows: List[Dict[str, Any]] = []
    live: List[Tuple[Case, Dict[str, Any], int]] = []
    bar = progress(total=len(cases) * 2, desc=desc, leave=False) if progress else None

    def failed(case: Case, row: Dict[str, Any], error: Exception) -> None:
        if case.kind in ("ours", "reference"):
            raise error
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"

    for case in cases:
        row: Dict[str, Any] = {"method": case.method, "scope": case.scope, "kind": case.kind, "note": case.note,
                               "baseline": case.baseline, "times_s": []}
        rows.append(row)
        if bar is not None:
            bar.set_postfix_str(f"{case.scope}: {case.method}")
        try:
            synchronize(opts.device)
            start = time.perf_counter()
            first = case.run()
            synchronize(opts.device)
            long_call = time.perf_counter() - start > LONG_CALL_S
            if case.errors is not None:
                row.update(case.errors(first))
            del first
            for _ in range(0 if long_call else max(0, opts.warmup - 1)):
                case.run()
            live.append((case, row, 1 if long_call else opts.repeats))
        except Exception as error:
            failed(case, row, error)
        if bar is not None:
            bar.update(1)
    for round_ in range(max(n for _, _, n in live) if live else 0):
        for case, row, repeats in live:
            if round_ >= repeats or "error" in row:
                continue
            try:
                row["times_s"] += _one_call(case.run, opts.device)
            except Exception as error:
                failed(case, row, error)
    for case, row, _ in live:
        if "error" in row:
            continue
        times = row["times_s"]
        row.update(median_s=statistics.median(times), min_s=min(times))
        if opts.memory:
            try:
                row["peak_extra_bytes"] = peak_extra_memory(case.run, opts.device)
            except Exception as error:
                failed(case, row, error)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return rows


def _one_call(fn: Callable[[], Any], device: torch.device) -> List[float]:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    elapsed = time.perf_counter() - start
    del out
    return [elapsed]


def _fill_ratios(rows: List[Dict[str, Any]]) -> None:
    base = {r["scope"]: r.get("median_s") for r in rows if r.get("baseline")}
    pub = next((r.get("median_s") for r in rows if r["kind"] == "published"), None)
    # The faster floor: whichever engine (fp32 or bf16 GEMM) is quicker on this machine.
    floors = [r["median_s"] for r in rows if r["kind"] == "floor" and r.get("median_s")]
    floor = min(floors) if floors else None
    for r in rows:
        t = r.get("median_s")
        if not t:
            continue
        if base.get(r["scope"]):
            r["speedup_vs_baseline"] = base[r["scope"]] / t
        if pub and r["scope"] == "reduce":
            r["speedup_vs_published"] = pub / t
        if floor:
            r["ratio_to_floor"] = t / floor


def run_workload(workload: Workload, opts: Options, progress=None) -> Dict[str, Any]:
    """Every case of one workload; returns the workload's record for bench.json."""
    backends, skipped = available_backends(opts.device, opts.backends)
    tokens, anchors = make_inputs(workload, opts.dtype, opts.device, opts.seed)
    grids, anchor_grids = list(workload.grids), list(workload.anchor_grids)
    ref = ops.reduce(tokens, anchors, grids, anchor_grids, opts.keep_ratio, opts.min_keep, backend="reference")
    cases = build_cases(workload, tokens, anchors, ref, opts, backends)
    cases += floor_cases(workload, opts.keep_ratio, opts.min_keep, opts.device, opts.dtype)
    rows = run_cases(cases, opts, progress, workload.id)
    _fill_ratios(rows)
    budgets = workload.budgets(opts.keep_ratio, opts.min_keep)
    return {
        "id": workload.id,
        "scenario": workload.scenario,
        "images": workload.images,
        "shapes": workload.describe(),
        "n_total": workload.n_total,
        "dim": workload.dim,
        "k_total": sum(budgets),
        "merge_gflop_per_image_sum": 2 * sum((n - k) * k for n, k in zip(workload.lengths, budgets)) * workload.dim / 1e9,
        "backends": backends,
        "skipped_backends": skipped,
        "rows": rows,
    }


# ----------------------------------------------------------------------------- scaling

SCALING_GRIDS = ((16, 16), (37, 37), (70, 70), (140, 140), (198, 198), (280, 426))  # last: 119,280 = L2's N
SCALING_RATIOS = (0.25, 0.5, 0.75)
COMPLEXITY = {
    "score": "O(N*D)",
    "select": "O(N log N)",
    "merge": "O((N-K)*K*D) per image",
    "whole": "O(N^2 * D) per image at a fixed keep ratio: the merge dominates",
}


def _merge_work(workload: Workload, keep_ratio: float, min_keep: int) -> int:
    return sum((n - k) * k for n, k in zip(workload.lengths, workload.budgets(keep_ratio, min_keep)))


def run_scaling(
    opts: Options,
    max_tokens: int = 119_280,
    dense_max_tokens: int = 19_600,
    long_call_s: float = 20.0,
    progress=None,
    log=print,
) -> Dict[str, Any]:
    """Time and peak memory against N (one image) and against keep ratio (M1).

    The reference and the published structure materialise the (N-K) x K similarity
    (fp32 / input dtype), so they stop at dense_max_tokens. A call predicted (from the
    previous size, scaled by the merge work) to take longer than long_call_s is run once,
    timed and memory-probed in the same call, without warmup.
    """
    backends, _ = available_backends(opts.device, opts.backends)
    ours = backends[0] if backends else None
    methods = ([f"g2tr {ours}"] if ours else []) + ["reference", "published structure", "floor: fp32 matmul"]
    by_n: Dict[str, List[Dict[str, Any]]] = {m: [] for m in methods}
    last: Dict[str, Tuple[float, int]] = {}
    grids = [g for g in SCALING_GRIDS if g[0] * g[1] <= max_tokens]
    bar = progress(total=len(grids) * len(methods) + len(SCALING_RATIOS) * len(methods), desc="scaling", leave=False) if progress else None

    def measure(method: str, workload: Workload, keep_ratio: float, fn: Callable[[], Any]) -> Dict[str, Any]:
        work = _merge_work(workload, keep_ratio, opts.min_keep)
        point: Dict[str, Any] = {"n": workload.n_total, "keep_ratio": keep_ratio, "merge_work": work}
        predicted = None
        if method in last and last[method][1] > 0:
            predicted = last[method][0] * work / last[method][1]
        if predicted is not None and predicted > long_call_s:
            gc.collect()
            start = time.perf_counter()
            point["peak_extra_bytes"] = peak_extra_memory(fn, opts.device) if opts.memory else None
            point["median_s"] = time.perf_counter() - start
            point["single_call"] = True
        else:
            times, first = time_calls(fn, opts.device, opts.warmup, opts.repeats)
            del first
            point["median_s"] = statistics.median(times)
            if opts.memory:
                point["peak_extra_bytes"] = peak_extra_memory(fn, opts.device)
        last[method] = (point["median_s"], work)
        return point

    def cases_for(workload: Workload, keep_ratio: float, n_cap: bool):
        tokens, anchors = make_inputs(workload, opts.dtype, opts.device, opts.seed)
        g, a = list(workload.grids), list(workload.anchor_grids)
        out = []
        if ours:
            out.append((f"g2tr {ours}", lambda: ops.reduce(tokens, anchors, g, a, keep_ratio, opts.min_keep, backend=ours)))
        dense_ok = not n_cap or workload.n_total <= dense_max_tokens
        out.append(("reference", (lambda: ops.reduce(tokens, anchors, g, a, keep_ratio, opts.min_keep, backend="reference")) if dense_ok else None))
        out.append(("published structure", (lambda: published.reduce(tokens, anchors, g, a, keep_ratio, opts.min_keep)) if dense_ok else None))
        out.append(("floor: fp32 matmul", floor_case(workload, keep_ratio, opts.min_keep, opts.device).run))
        return out

    for h, w in grids:
        workload = single_image(h, w)
        for method, fn in cases_for(workload, opts.keep_ratio, n_cap=True):
            if fn is not None:
                point = measure(method, workload, opts.keep_ratio, fn)
                by_n[method].append(point)
                log(f"  scaling N={workload.n_total:>7,}  {method:<22} {point['median_s'] * 1e3:10.1f} ms")
            if bar is not None:
                bar.update(1)
        gc.collect()

    by_ratio: Dict[str, List[Dict[str, Any]]] = {m: [] for m in methods}
    m1 = single_image(70, 70)
    last.clear()
    for ratio in SCALING_RATIOS:
        for method, fn in cases_for(m1, ratio, n_cap=False):
            point = measure(method, m1, ratio, fn)
            by_ratio[method].append(point)
            log(f"  scaling keep_ratio={ratio:<4}  {method:<22} {point['median_s'] * 1e3:10.1f} ms")
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return {
        "grids": [list(g) for g in grids],
        "dim": 3584,
        "dense_max_tokens": dense_max_tokens,
        "long_call_s": long_call_s,
        "by_n": by_n,
        "by_keep_ratio": by_ratio,
        "complexity": COMPLEXITY,
    }
