"""Property-based fuzzing of the raw ops (torch.ops.g2tr.*) and the Python API (issue 8).

Hypothesis draws batches of cases from the argument families an attacker would try:
overflowing, wrapping and negative ints in grids, lengths, budgets, cell counts and quotas;
extreme and non-finite floats (keep_ratio, min_keep, merge_weight, and data from the
smallest subnormal to the fp32 maximum, NaN, Inf, zero rows); bad index tensors
(duplicated, unsorted, out of range, crossing images, wrong dtype, wrong rank); odd layouts
(transposed, strided, stride-0 expanded, overlapping rows); empty D. Each batch runs in a
fresh subprocess (tests/fuzz_worker.py) with a timeout, so a crash or a hang fails one test
and names the case; every case must end in the project's own exception or in a result that
matches the reference.

Fixed seed (derandomize), no shrinking (a subprocess per example makes it slow; the failing
case is printed as JSON instead), about a minute on a 2-core machine. More:
G2TR_FUZZ_EXAMPLES=50 python -m pytest tests/test_fuzz.py.
"""
import json
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import g2tr_kernels

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "fuzz_worker.py")
EXAMPLES = int(os.environ.get("G2TR_FUZZ_EXAMPLES", "3"))
BATCH = 24
TIMEOUT_S = float(os.environ.get("G2TR_FUZZ_TIMEOUT", "240"))

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

FUZZ = settings(
    max_examples=EXAMPLES, derandomize=True, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck), print_blob=False,
)

EVIL_INTS = [0, -1, -7, 2**31, 2**31 - 1, 2**32 - 1, 2**32 + 1, 2**62, 2**62 + 1, 2**63 - 1, -(2**63)]
# Pairs whose int64 product wraps: 2^64 - 1, 2^64, 2^64 + 4.
WRAPPING_PAIRS = [(2**32 + 1, 2**32 - 1), (2**63 - 1, 2), (2**62, 4), (2**62 + 1, 4), (-(2**62), -4)]
RATIOS = [0.0, -0.5, 1.0000001, float("nan"), float("inf"), float("-inf"), 1e-300, 5e-324, 1.0, 1e-9, 0.999999]
MIN_KEEPS = [0, -1, 2**62, 2**63 - 1, -(2**63), 1, 10**6]
WEIGHTS = [0.0, -1.0, 1e-300, 1e39, float("nan"), float("inf"), 1e-45, 3.4e38, 3.5e38, 1e-38, 1e30, 2.0]
API_ONLY = {"keep_ratio": ["0.5", None, 2**70], "min_keep": [2**63, 1.5, "3", None], "merge_weight": [None, "1"]}
SCALES = [1.0, 1.0, 1.0, 1e20, 1e30, 3e38, 1e-20, 1e-40, 65504.0]
SPECIALS = [None, None, None, None, "nan", "inf", "-inf", "zero_row"]
LAYOUTS = ["contig", "contig", "contig", "transposed", "strided", "expanded", "overlapping"]
FLOAT_DTYPES = ["float32", "bfloat16", "float16"]
BAD_FLOAT_DTYPES = ["int64", "int32", "complex64", "float64", "bool"]
BAD_INDEX_DTYPES = ["int32", "float32", "int16", "uint8"]


@st.composite
def data_spec(draw, shape, dtype=None):
    return {
        "dtype": dtype or draw(st.sampled_from(FLOAT_DTYPES)), "shape": shape, "scale": draw(st.sampled_from(SCALES)),
        "special": draw(st.sampled_from(SPECIALS)), "layout": draw(st.sampled_from(LAYOUTS)),
        "seed": draw(st.integers(0, 10**6)),
    }


def flat(pairs):
    return [v for p in pairs for v in p]


@st.composite
def grid_case(draw, op, entry, backend):
    """reduce / anchor_scores / reduce_padded, valid, then at most a couple of mutations."""
    b = draw(st.integers(1, 3))
    grids = [(draw(st.integers(1, 6)), draw(st.integers(1, 6))) for _ in range(b)]
    anchor_grids = [(draw(st.integers(1, 5)), draw(st.integers(1, 5))) for _ in range(b)]
    d = draw(st.sampled_from([0, 1, 3, 8, 17, 40]))
    if op == "reduce_padded":
        grids, anchor_grids = grids[:1] * b, anchor_grids[:1] * b
    n, m = sum(h * w for h, w in grids), sum(h * w for h, w in anchor_grids)
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    tokens = draw(data_spec([n, d], dtype))
    anchors = draw(data_spec([m, d], dtype))
    args = {"grids": flat(grids), "anchor_grids": flat(anchor_grids)}
    if op in ("reduce", "reduce_padded"):
        args.update(keep_ratio=draw(st.sampled_from([0.5, 0.25, 1.0, 0.1, 0.73])),
                    min_keep=draw(st.sampled_from([1, 2, 4, 32])), merge_weight=draw(st.sampled_from([1.0, 0.5, 3.0])))
    for _ in range(draw(st.integers(0, 2))):
        mutation = draw(st.sampled_from(["grid_int", "anchor_int", "wrap", "odd", "extra", "ratio", "min_keep",
                                         "weight", "dtype_mismatch", "d_mismatch", "rank", "bad_dtype", "rows",
                                         "none"]))
        key = draw(st.sampled_from(["grids", "anchor_grids"]))
        if mutation in ("grid_int", "anchor_int"):
            key = "grids" if mutation == "grid_int" else "anchor_grids"
            args[key][draw(st.integers(0, len(args[key]) - 1))] = draw(st.sampled_from(EVIL_INTS))
        elif mutation == "wrap":
            i = draw(st.integers(0, len(args[key]) // 2 - 1))
            args[key][2 * i : 2 * i + 2] = list(draw(st.sampled_from(WRAPPING_PAIRS)))
        elif mutation == "odd":
            args[key] = args[key][:-1]
        elif mutation == "extra":
            args[key] = args[key] + [draw(st.sampled_from([1, 2, 2**62]))] * 2
        elif mutation in ("ratio", "min_keep", "weight") and op != "anchor_scores":
            name = {"ratio": "keep_ratio", "min_keep": "min_keep", "weight": "merge_weight"}[mutation]
            pool = {"keep_ratio": RATIOS, "min_keep": MIN_KEEPS, "merge_weight": WEIGHTS}[name]
            if entry == "api":
                pool = pool + API_ONLY[name]
            args[name] = draw(st.sampled_from(pool))
        elif mutation == "dtype_mismatch":
            anchors["dtype"] = draw(st.sampled_from([t for t in FLOAT_DTYPES if t != dtype]))
        elif mutation == "d_mismatch":
            anchors["shape"] = [anchors["shape"][0], d + 1]
        elif mutation == "rank":
            tokens["shape"] = tokens["shape"][:1] if draw(st.booleans()) else [1] + tokens["shape"]
        elif mutation == "bad_dtype":
            tokens["dtype"] = anchors["dtype"] = draw(st.sampled_from(BAD_FLOAT_DTYPES))
        elif mutation == "rows":
            tokens["shape"] = [max(0, tokens["shape"][0] + draw(st.sampled_from([-1, 1]))), d]
    if op == "reduce_padded":
        # The padded form: [B, N, D] tensors and one grid shared by all images.
        g, a = args.pop("grids"), args.pop("anchor_grids")
        args["grid"], args["anchor_grid"] = g[:2], a[:2]
        if len(tokens["shape"]) == 2:
            per = max(1, tokens["shape"][0] // b)
            tokens["shape"] = [b, per, tokens["shape"][1]]
            anchors["shape"] = [b, max(1, anchors["shape"][0] // b), anchors["shape"][1]]
    return {"entry": entry, "op": op, "backend": backend, "tensors": {"tokens": tokens, "anchors": anchors},
            "args": args}


@st.composite
def index_values(draw, lengths, budgets):
    """A valid keep_idx (global, ascending per image), then perhaps broken."""
    keep, start = [], 0
    for n, k in zip(lengths, budgets):
        keep += sorted(draw(st.permutations(list(range(start, start + n))))[:k])
        start += n
    how = draw(st.sampled_from(["valid", "valid", "valid", "dup", "unsorted", "low", "high", "huge", "cross",
                                "short", "long"]))
    if keep and how == "dup" and len(keep) > 1:
        keep[1] = keep[0]
    elif how == "unsorted" and len(keep) > 1:
        keep[0], keep[1] = keep[1], keep[0]
    elif how == "low" and keep:
        keep[0] = -1
    elif how == "high" and keep:
        keep[-1] = sum(lengths)
    elif how == "huge" and keep:
        keep[draw(st.integers(0, len(keep) - 1))] = draw(st.sampled_from([2**62, 2**63 - 1, -(2**63)]))
    elif how == "cross" and keep:
        keep = [v + 1 for v in keep]
    elif how == "short":
        keep = keep[:-1]
    elif how == "long":
        keep = keep + [0]
    return keep


@st.composite
def lengths_case(draw, op, entry, backend):
    """balanced_topk / merge: lengths, budgets, per-image ints, index tensors."""
    b = draw(st.integers(1, 3))
    lengths = [draw(st.integers(1, 8)) for _ in range(b)]
    budgets = [draw(st.integers(1, n)) for n in lengths]
    n = sum(lengths)
    args = {"lengths": list(lengths), "budgets": list(budgets)}
    tensors = {}
    if op == "balanced_topk":
        counts = [draw(st.integers(1, 5)) for _ in range(b)]
        args["cell_counts"] = counts
        quota_key = "quota" if entry == "api" else "cell_quotas"
        args[quota_key] = [draw(st.integers(1, 3)) for _ in range(b)]
        if entry == "api" and draw(st.booleans()):
            args[quota_key] = draw(st.sampled_from([1, 2, "window"]))
        tensors["scores"] = draw(data_spec([n], "float32"))
        tensors["scores"]["layout"] = "contig"
        cell_values = [draw(st.integers(-1, max(counts))) for _ in range(n)]
        tensors["cells"] = {"dtype": "int64", "values": cell_values}
    else:
        d = draw(st.sampled_from([0, 1, 3, 8, 17, 40]))
        tensors["tokens"] = draw(data_spec([n, d]))
        tensors["keep_idx"] = {"dtype": "int64", "values": draw(index_values(lengths, budgets))}
        args["merge_weight"] = draw(st.sampled_from([1.0, 0.5, 2.0]))
    for _ in range(draw(st.integers(0, 2))):
        mutation = draw(st.sampled_from(["lengths", "budgets", "counts", "quotas", "weight", "index_dtype",
                                         "index_rank", "cells_values", "scores_dtype", "short_list", "none"]))
        if mutation in ("lengths", "budgets"):
            args[mutation][draw(st.integers(0, b - 1))] = draw(st.sampled_from(EVIL_INTS))
        elif mutation == "short_list":
            key = draw(st.sampled_from(sorted(k for k, v in args.items() if isinstance(v, list))))
            args[key] = args[key][:-1]
        elif mutation == "counts" and op == "balanced_topk":
            args["cell_counts"][draw(st.integers(0, b - 1))] = draw(st.sampled_from(EVIL_INTS + [2**26, 2**26 + 1]))
        elif mutation == "quotas" and op == "balanced_topk":
            key = "quota" if entry == "api" else "cell_quotas"
            if entry == "api" and draw(st.booleans()):
                args[key] = draw(st.sampled_from([2.0, None, "bad", 0, -1, 2**63, 2**62, [1] * (b + 1)]))
            else:
                args[key] = list(args[key]) if isinstance(args[key], list) else [1] * b
                args[key][draw(st.integers(0, b - 1))] = draw(st.sampled_from(EVIL_INTS))
        elif mutation == "weight" and op == "merge":
            args["merge_weight"] = draw(st.sampled_from(WEIGHTS + (API_ONLY["merge_weight"] if entry == "api" else [])))
        elif mutation == "index_dtype":
            key = "cells" if op == "balanced_topk" else "keep_idx"
            tensors[key]["dtype"] = draw(st.sampled_from(BAD_INDEX_DTYPES))
        elif mutation == "index_rank":
            key = "cells" if op == "balanced_topk" else "keep_idx"
            tensors[key]["values"] = [tensors[key]["values"]]
        elif mutation == "cells_values" and op == "balanced_topk":
            vals = tensors["cells"]["values"]
            vals[draw(st.integers(0, len(vals) - 1))] = draw(st.sampled_from([-(2**63), 2**63 - 1, 2**40, -5]))
        elif mutation == "scores_dtype" and op == "balanced_topk":
            tensors["scores"]["dtype"] = draw(st.sampled_from(["float64", "bfloat16", "int64"]))
    return {"entry": entry, "op": op, "backend": backend, "tensors": tensors, "args": args}


def run_batch(cases):
    """Runs the cases in a fresh worker; fails naming the case on a signal, a hang or a bad outcome."""
    # The worker must import the g2tr_kernels this test run imports, not whatever its own
    # sys.path (the tests folder first) would find.
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(g2tr_kernels.__file__)))
    path = os.pathsep.join([package_root] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="2", PYTHONPATH=path)
    payload = json.dumps(cases)
    try:
        proc = subprocess.run([sys.executable, WORKER], input=payload, capture_output=True, text=True,
                              timeout=TIMEOUT_S, env=env, cwd=os.path.dirname(HERE))
    except subprocess.TimeoutExpired as error:
        lines = (error.stdout or b"").decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
        running = _running_case(lines)
        pytest.fail(f"hang: the worker ran past {TIMEOUT_S:.0f} s in case {running}: {json.dumps(cases[running])}")
    lines = proc.stdout.splitlines()
    if proc.returncode != 0:
        running = _running_case(proc.stdout)
        case = json.dumps(cases[running]) if running is not None else "?"
        pytest.fail(f"the worker died (exit {proc.returncode}, a negative value is a signal) in case {running}: "
                    f"{case}\nstderr: {proc.stderr[-2000:]}")
    results = [json.loads(line) for line in lines if line.startswith("{\"case\"")]
    assert len(results) == len(cases), f"{len(results)} results for {len(cases)} cases\n{proc.stderr[-2000:]}"
    if os.environ.get("G2TR_FUZZ_LOG"):  # outcome counts, to see what a run exercised
        with open(os.environ["G2TR_FUZZ_LOG"], "a") as log:
            for case, r in zip(cases, results):
                log.write(json.dumps({"op": case["op"], "entry": case["entry"], "backend": case["backend"],
                                      "outcome": r["outcome"], "message": r.get("message", "")[:120]}) + "\n")
    bad = [r for r in results if not r["ok"]]
    if bad:
        report = "\n".join(f"case {r['case']}: {r['outcome']}: {r.get('why', '')} {r.get('message', '')}\n"
                           f"  {json.dumps(cases[r['case']])}" for r in bad[:5])
        pytest.fail(f"{len(bad)} of {len(cases)} cases did not end in a g2tr error or a matching result:\n{report}")
    return results


def _running_case(stdout):
    running = None
    for line in stdout.splitlines():
        if line.startswith("{\"begin\""):
            running = json.loads(line)["begin"]
        elif line.startswith("{\"case\""):
            running = None
    return running


@FUZZ
@given(st.lists(st.one_of(grid_case("reduce", "raw", "cpu"), grid_case("anchor_scores", "raw", "cpu")),
                min_size=BATCH, max_size=BATCH))
def test_fuzz_raw_reduce_and_anchor_scores(cases):
    run_batch(cases)


@FUZZ
@given(st.lists(st.one_of(lengths_case("balanced_topk", "raw", "cpu"), lengths_case("merge", "raw", "cpu")),
                min_size=BATCH, max_size=BATCH))
def test_fuzz_raw_balanced_topk_and_merge(cases):
    run_batch(cases)


@FUZZ
@given(st.lists(st.one_of(*[grid_case(op, "api", b) for op in ("reduce", "reduce_padded", "anchor_scores")
                            for b in ("cpu", "reference")],
                          *[lengths_case(op, "api", b) for op in ("balanced_topk", "merge")
                            for b in ("cpu", "reference")]),
                min_size=BATCH, max_size=BATCH))
def test_fuzz_api(cases):
    run_batch(cases)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@FUZZ
@given(st.lists(st.one_of(grid_case("reduce", "raw", "triton"), grid_case("anchor_scores", "raw", "triton"),
                          lengths_case("balanced_topk", "raw", "triton"), lengths_case("merge", "raw", "triton")),
                min_size=BATCH // 2, max_size=BATCH // 2))
def test_fuzz_triton_ops(cases):
    run_batch(cases)


def test_the_worker_reports_a_crash():
    # The harness itself: a worker killed by a signal must fail the batch, naming the case.
    code = ("import json, os, signal; print(json.dumps({'begin': 0}), flush=True); "
            "print(json.dumps({'case': 0, 'ok': True}), flush=True); print(json.dumps({'begin': 1}), flush=True); "
            "os.kill(os.getpid(), signal.SIGSEGV)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -11 and _running_case(proc.stdout) == 1
