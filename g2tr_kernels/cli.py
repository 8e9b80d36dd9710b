"""The `g2tr` command: `g2tr bench` (the benchmark) and `g2tr info` (what this build holds)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from typing import List, Optional

from .bench import e2e

DTYPES = ("bfloat16", "float16", "float32")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="g2tr", description="G2TR token reduction kernels for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("info", help="print build_info() and the usable backends")

    bench = sub.add_parser(
        "bench",
        help="time the G2TR ops against the reference path, the published structure and peers",
        description="Times g2tr reduce (every usable backend) on the SHAPES.md workloads against the "
        "reference path, the published G2TR structure, peers (FAISS, torch.topk/sort, scatter_reduce, "
        "torch.compile, ToMe) and a matmul floor; prints one table per workload.",
    )
    bench.add_argument("--workloads", nargs="+", metavar="ID",
                       help="workload ids from SHAPES.md (S1 S2 M1 M2 L1 L2); default S1 S2 M1 M2 (+ L1 L2 with --large)")
    bench.add_argument("--large", action="store_true", help="add L1 and L2 to the default workloads")
    bench.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    bench.add_argument("--keep-ratio", type=float, default=0.5)
    bench.add_argument("--min-keep", type=int, default=None, help="default 32 (4 with --quick)")
    bench.add_argument("--device", default=None, help="cpu or cuda[:i]; default cuda when available, else cpu")
    bench.add_argument("--backends", nargs="+", choices=("cpu", "cuda", "triton"),
                       help="native backends to time (the reference path always runs); default: every usable one, "
                       "triton on CPU excluded (it needs TRITON_INTERPRET and is a correctness tool)")
    bench.add_argument("--repeats", type=int, default=3, help="timed calls per case; the median is reported")
    bench.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (at least 1)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--no-peers", action="store_true", help="only the g2tr backends, reference, published, floor")
    bench.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer (its compile takes ~10 s per shape)")
    bench.add_argument("--no-stages", action="store_true", help="time the whole reduction only, not each stage")
    bench.add_argument("--no-memory", action="store_true", help="skip the peak-memory call")
    bench.add_argument("--quick", action="store_true",
                       help="tiny variants of the workloads (about 1/4 the side, D=64, min_keep 4): a smoke test, not a benchmark")
    bench.add_argument("--scaling", action="store_true",
                       help="also time and memory against N (one image, up to 119,280 tokens) and against keep ratio "
                       "0.25/0.5/0.75; writes scaling.png. On 2 CPU cores this takes about 10 minutes")
    bench.add_argument("--scaling-max-tokens", type=int, default=119_280, help="largest N of the scaling sweep")
    bench.add_argument("--e2e", action="store_true",
                       help="also run the end-to-end prefill benchmark (g2tr_kernels.bench.e2e.run_e2e; needs transformers)")
    bench.add_argument("--out", metavar="DIR", help="write bench.md, bench.json and bench.png (and scaling.png) here")
    e2e.add_e2e_arguments(bench)
    return parser


def _info() -> int:
    import torch

    from . import build_info
    from .bench.runner import available_backends

    try:
        print(json.dumps(build_info(), indent=1))
    except RuntimeError as error:
        print(f"build_info() unavailable: {error}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        usable, skipped = available_backends(device)
        print(f"{device}: usable {['reference'] + usable}; skipped {skipped}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from .bench import costs, report, runner, workloads

    if args.warmup < 1 or args.repeats < 1:
        raise SystemExit("g2tr bench: --warmup and --repeats must be at least 1")
    ids = args.workloads or list(workloads.DEFAULT_WORKLOADS) + (list(workloads.LARGE_WORKLOADS) if args.large else [])
    try:
        chosen = [workloads.get(i) for i in ids]
    except KeyError as error:
        raise SystemExit(f"g2tr bench: {error.args[0]}") from None
    if args.quick:
        chosen = [w.tiny() for w in chosen]
    if args.min_keep is None:
        args.min_keep = workloads.SMOKE_MIN_KEEP if args.quick else 32
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("g2tr bench: --device cuda, but torch sees no CUDA device here")
    opts = runner.Options(
        dtype=getattr(torch, args.dtype),
        device=device,
        keep_ratio=args.keep_ratio,
        min_keep=args.min_keep,
        warmup=args.warmup,
        repeats=args.repeats,
        backends=args.backends,
        peers=not args.no_peers,
        compile=not args.no_compile,
        stages=not args.no_stages,
        memory=not args.no_memory,
        seed=args.seed,
    )
    machine = runner.machine_info(device)
    report.print_machine(machine)
    started = time.perf_counter()
    records = []
    for workload in tqdm(chosen, desc="workloads", leave=False, disable=None if len(chosen) > 1 else True):
        record = runner.run_workload(workload, opts, progress=partial(tqdm, disable=None))
        records.append(record)
        tqdm.write("\n" + report.workload_title(record))
        tqdm.write(report.text_table(record))
        for line in report.cross_image_lines(record):
            tqdm.write(line)
        if record["skipped_backends"]:
            tqdm.write("skipped backends: " + "; ".join(f"{b}: {why}" for b, why in record["skipped_backends"].items()))
    result = {
        "args": {k: v for k, v in vars(args).items() if k != "command"} | {
            "dtype": args.dtype, "device": str(device), "workloads": [w.id for w in chosen]},
        "machine": machine,
        "workloads": records,
        "costs": [costs.cost_account(w, args.keep_ratio, args.min_keep, torch.finfo(opts.dtype).bits // 8) for w in chosen],
    }
    tqdm.write("\n" + "\n".join(report.cost_lines(result["costs"])))
    if args.scaling:
        tqdm.write("\nscaling (time and peak extra memory against N and keep ratio):")
        result["scaling"] = runner.run_scaling(
            opts, max_tokens=args.scaling_max_tokens, progress=partial(tqdm, disable=None), log=tqdm.write
        )
    if args.e2e:
        args.device = str(device)  # the prefill runs where the kernels ran
        result["e2e"] = e2e.run_e2e(args)
        shown = result["e2e"].get("markdown") if isinstance(result["e2e"], dict) else None
        tqdm.write("\n" + (shown if isinstance(shown, str) else "end-to-end: " + json.dumps(result["e2e"], default=str)))
    result["wall_s"] = time.perf_counter() - started
    if hasattr(os, "getloadavg"):
        machine["load_average_end"] = list(os.getloadavg())
    if args.out:
        for path in report.write_all(result, args.out):
            print(f"wrote {path}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "info":
        return _info()
    return _bench(args)


if __name__ == "__main__":
    sys.exit(main())
