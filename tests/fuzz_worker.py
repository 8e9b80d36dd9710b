"""Runs fuzz cases (tests/test_fuzz.py) in this process, one after another, and reports each.

    python tests/fuzz_worker.py < cases.json        # a JSON list of cases

For every case it prints {"begin": i} before running it, then one JSON line with the
outcome, so a crash or a hang (a signal, a timeout of the whole process) is pinned to the
case that was running. An outcome is "ok" when the case ended in the project's own error
(ValueError / TypeError / IndexError whose message names a g2tr op) or in a result that
passes the structural checks and matches the reference; anything else is "bad" with why.

A case: {"entry": "raw" | "api", "op": ..., "backend": ..., "tensors": {name: spec},
"args": {name: value}}; a tensor spec: {"dtype", "shape", "scale", "special", "layout",
"seed"} for data or {"dtype", "values", "layout"} for index tensors (see make_tensor).
"""
import json
import math
import os
import sys
import traceback

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton cases run on the CPU
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import g2tr_kernels as g2tr  # noqa: E402
from g2tr_kernels import reference  # noqa: E402

import helpers  # noqa: E402

PROJECT_ERRORS = (ValueError, TypeError, IndexError)
torch.set_num_threads(2)


def make_tensor(spec):
    dtype = getattr(torch, spec["dtype"])
    layout = spec.get("layout", "contig")
    if "values" in spec:
        t = torch.tensor(spec["values"], dtype=torch.float64 if dtype.is_floating_point else torch.int64).to(dtype)
        shape = list(t.shape)
    else:
        shape = list(spec["shape"])
        gen = torch.Generator().manual_seed(spec.get("seed", 0))
        base = torch.randn(shape, generator=gen, dtype=torch.float64) * spec.get("scale", 1.0)
        special = spec.get("special")
        if special and base.numel():
            flat = base.view(-1)
            flat[spec.get("seed", 0) % flat.numel()] = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf,
                                                       "zero_row": 0.0}[special]
            if special == "zero_row" and base.dim() == 2:
                base[0] = 0.0
        if dtype.is_floating_point:
            info = torch.finfo(dtype)
            t = base.clamp(-info.max, info.max).where(~base.isnan(), base).to(dtype)
        elif dtype.is_complex:
            t = base.to(dtype)
        else:
            t = base.round().clamp(-1000, 1000).to(dtype)
    if layout == "contig" or t.dim() != 2 or t.numel() == 0:
        return t
    if layout == "transposed":  # same values, column-major storage
        return t.t().contiguous().t()
    if layout == "strided":  # every other column of a wider tensor
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype)
        wide[:, ::2] = t
        return wide[:, ::2]
    if layout == "expanded":  # every row the same memory (stride 0)
        return t[:1].expand(t.shape[0], t.shape[1])
    if layout == "overlapping":  # rows overlap in memory: row i starts at element i
        storage = t.reshape(-1)[: t.shape[0] + t.shape[1] - 1].clone()
        return storage.as_strided((t.shape[0], t.shape[1]), (1, 1))
    raise ValueError(f"unknown layout {layout}")


def finite(*tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point())


def no_nan(name, t):
    assert not bool(torch.isnan(t).any()), f"{name}: NaN from finite inputs"


def assert_merge(name, tokens, keep, merged, assign, lengths, budgets, weight):
    """helpers.assert_merge_matches, with merged compared relative to the data's magnitude."""
    try:
        helpers.assert_merge_matches(name, tokens, keep, merged, assign, lengths, budgets, weight)
    except AssertionError as error:
        if not str(error).startswith(f"{name}: merged"):
            raise
        want = helpers.merge_from_assign(tokens, keep, assign, weight).double()
        scale = float(tokens.detach().double().abs().max()) if tokens.numel() else 1.0
        rtol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[tokens.dtype]
        got = merged.double()
        ok = torch.isclose(got, want, rtol=rtol, atol=rtol * scale, equal_nan=True) | (got == want)
        assert bool(ok.all()), str(error)


def check_reduce(case, out, args):
    t, a = args["tokens"], args["anchors"]
    grids, anchor_grids = pairs(args["grids"]), pairs(args["anchor_grids"])
    if finite(t, a):
        no_nan("scores", out.scores)
        no_nan("merged", out.merged)
    if case.get("backend") == "reference":
        budgets = [helpers.spec_budget(h * w, args["keep_ratio"], args["min_keep"]) for h, w in grids]
        helpers.check_structure(out, grids, budgets)
        return
    try:
        helpers.assert_reduce_matches(out, t, a, grids, anchor_grids, args["keep_ratio"], args["min_keep"],
                                      args["merge_weight"])
    except AssertionError as error:
        if ": merged" not in str(error):
            raise
        budgets = [helpers.spec_budget(h * w, args["keep_ratio"], args["min_keep"]) for h, w in grids]
        assert_merge("reduce", t, out.keep_idx, out.merged, out.assign, [h * w for h, w in grids], budgets,
                     args["merge_weight"])


def pairs(flat):
    flat = list(flat)
    if flat and isinstance(flat[0], (list, tuple)):
        return [tuple(p) for p in flat]
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def run_case(case):
    tensors = {name: make_tensor(spec) for name, spec in case.get("tensors", {}).items()}
    args = dict(case.get("args", {}))
    args.update(tensors)
    op, entry, backend = case["op"], case["entry"], case.get("backend", "cpu")
    if entry == "raw":
        prefix = "triton_" if backend == "triton" else ""
        if backend == "triton":
            import g2tr_kernels.triton  # noqa: F401  (registers torch.ops.g2tr.triton_*)
        fn = getattr(torch.ops.g2tr, prefix + op)
        order = {
            "reduce": ["tokens", "anchors", "grids", "anchor_grids", "keep_ratio", "min_keep", "merge_weight"],
            "anchor_scores": ["tokens", "anchors", "grids", "anchor_grids"],
            "balanced_topk": ["scores", "cells", "lengths", "budgets", "cell_counts", "cell_quotas"],
            "merge": ["tokens", "keep_idx", "lengths", "budgets", "merge_weight"],
        }[op]
        out = fn(*[args[k] for k in order])
    else:
        fn = getattr(g2tr, op)
        kwargs = {k: v for k, v in args.items()}
        out = fn(**kwargs, backend=backend)
    check_result(case, op, entry, out, args)


def check_result(case, op, entry, out, args):
    backend = case.get("backend", "cpu")
    if op == "reduce":
        check_reduce(case, g2tr.ReduceOutput(*out), args)
    elif op == "reduce_padded":
        t, a = args["tokens"], args["anchors"]
        if finite(t, a):
            no_nan("scores", out.scores)
            no_nan("merged", out.merged)
        b, n, d = t.shape
        k = out.keep_idx.shape[1]
        assert bool(((out.keep_idx >= 0) & (out.keep_idx < n)).all()), "keep_idx out of range"
        assert bool(((out.assign >= 0) & (out.assign < k)).all()), "assign out of range"
        if backend != "reference":
            grid, agrid = pairs(args["grid"])[0], pairs(args["anchor_grid"])[0]
            exp = g2tr.reduce_padded(t, a, grid, agrid, args["keep_ratio"], args["min_keep"], args["merge_weight"],
                                     backend="reference")
            helpers.assert_close_report("scores", out.scores, exp.scores, atol=helpers.SCORE_ATOL, rtol=0)
    elif op == "anchor_scores":
        scores, cells = out
        t, a = args["tokens"], args["anchors"]
        if finite(t, a):
            no_nan("scores", scores)
        ref_scores, ref_cells = reference.anchor_scores(t, a, pairs(args["grids"]), pairs(args["anchor_grids"]))
        assert torch.equal(cells, ref_cells), "cells differ from the reference"
        scale_ok = torch.isclose(scores.double(), ref_scores.double(), atol=helpers.SCORE_ATOL, rtol=0, equal_nan=True)
        assert bool(scale_ok.all()), helpers.mismatch_report("scores", scores, ref_scores, ~scale_ok)
    elif op == "balanced_topk":
        keep = out
        lengths, budgets, counts = list(args["lengths"]), list(args["budgets"]), list(args["cell_counts"])
        quotas = args.get("cell_quotas", args.get("quota", 1))
        if quotas == "window":
            quotas = [-(-k // c) for k, c in zip(budgets, counts)]
        elif not isinstance(quotas, (list, tuple)):
            quotas = [quotas] * len(lengths)
        want = reference.balanced_topk(args["scores"], args["cells"], lengths, budgets, counts, list(quotas))
        assert torch.equal(keep, want), f"keep_idx {keep.tolist()[:16]} != reference {want.tolist()[:16]}"
    elif op == "merge":
        merged, assign = out
        t = args["tokens"]
        k_total = sum(args["budgets"])
        assert bool(((assign >= 0) & (assign < k_total)).all()), "assign out of [0, K)"
        if finite(t):
            no_nan("merged", merged)
        if backend != "reference":
            assert_merge("merge", t, args["keep_idx"], merged, assign, list(args["lengths"]), list(args["budgets"]),
                         args["merge_weight"])


def main():
    cases = json.load(sys.stdin)
    for i, case in enumerate(cases):
        print(json.dumps({"begin": i}), flush=True)
        try:
            run_case(case)
            result = {"case": i, "ok": True, "outcome": "result"}
        except PROJECT_ERRORS as error:
            message = str(error)
            own = "g2tr" in message.split("\n")[0]
            result = {"case": i, "ok": own, "outcome": type(error).__name__, "message": message[:400]}
            if not own:
                result["why"] = "not the project's own message"
        except AssertionError as error:
            result = {"case": i, "ok": False, "outcome": "wrong result", "message": str(error)[:1500]}
        except Exception as error:  # noqa: BLE001  (anything else is a finding)
            result = {"case": i, "ok": False, "outcome": type(error).__name__, "message": str(error)[:600],
                      "trace": traceback.format_exc()[-1500:]}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
