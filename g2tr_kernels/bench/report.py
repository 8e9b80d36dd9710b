"""bench.md, bench.json, bench.png (and scaling.png) from the results of `g2tr bench`."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

from .runner import MEMORY_METHOD, SCOPE_TITLES, SCOPES

KIND_COLOURS = {"ours": "#1f77b4", "reference": "#7f7f7f", "published": "#d62728", "peer": "#ff7f0e", "floor": "#2ca02c"}


# ----------------------------------------------------------------------------- text


def _time(s: Optional[float]) -> str:
    if s is None:
        return "—"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} µs"


def _ratio(x: Optional[float]) -> str:
    if x is None:
        return "—"
    return f"{x:.2f}x" if x < 10 else f"{x:.0f}x"


def _bytes(b: Optional[int]) -> str:
    if b is None:
        return "n/a"
    if b < 1 << 20:
        return f"{b / 1024:.0f} KiB"
    if b < 1 << 30:
        return f"{b / (1 << 20):.0f} MiB"
    return f"{b / (1 << 30):.2f} GiB"


def _err(x: Optional[float]) -> str:
    if x is None:
        return "—"
    return "0" if x == 0 else f"{x:.2e}"


def _count(x: Optional[int]) -> str:
    return "—" if x is None else f"{x:,}"


HEADER = ("stage", "method", "median", "vs base", "vs published", "/ floor", "peak extra mem",
          "max abs err", "keep ≠", "assign ≠")


def table_rows(record: Dict[str, Any]) -> List[List[str]]:
    out = []
    for scope in SCOPES:
        for r in (r for r in record["rows"] if r["scope"] == scope):
            if "error" in r:
                out.append([scope, r["method"], "failed: " + r["error"]] + [""] * (len(HEADER) - 3))
                continue
            out.append([
                scope,
                r["method"] + (" (base)" if r.get("baseline") else ""),
                _time(r.get("median_s")),
                _ratio(r.get("speedup_vs_baseline")),
                _ratio(r.get("speedup_vs_published")),
                _ratio(r.get("ratio_to_floor")),
                _bytes(r.get("peak_extra_bytes")),
                _err(r.get("max_abs_err")),
                _count(r.get("keep_idx_diff")),
                _count(r.get("assign_diff")),
            ])
    return out


def markdown_table(record: Dict[str, Any]) -> str:
    rows = [list(HEADER)] + table_rows(record)
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def text_table(record: Dict[str, Any]) -> str:
    rows = [list(HEADER)] + table_rows(record)
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(HEADER))]
    widths[2] = min(widths[2], 12)
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cross_image_lines(record: Dict[str, Any]) -> List[str]:
    return [f"{r['method']}: {r['cross_image_merges']:,} of {record['n_total'] - record['k_total']:,} dropped tokens "
            "merged into a kept token of another image"
            for r in record["rows"] if r.get("cross_image_merges")]


def workload_title(record: Dict[str, Any]) -> str:
    return (f"{record['id']}: {record['scenario']} — {record['images']} image(s), N = {record['n_total']:,}, "
            f"D = {record['dim']}, K = {record['k_total']:,} ({record['shapes']})")


def machine_lines(machine: Dict[str, Any]) -> List[str]:
    info = machine.get("build_info", {})
    lines = [
        f"- CPU: {machine['cpu']} ({machine['logical_cpus']} logical CPUs; flags: {', '.join(machine['cpu_flags']) or 'none of note'})",
        f"- torch {machine['torch']} with {machine['torch_threads']} threads; Python {machine['python']}; {machine['platform']}",
        f"- device: {machine['device']}" + (f" ({machine['gpu']}, CUDA {machine['cuda']})" if "gpu" in machine else ""),
    ]
    if machine.get("load_average"):
        lines.append(f"- load average (1, 5, 15 min) at start: {', '.join(f'{x:.2f}' for x in machine['load_average'])}"
                     + (f"; at end: {', '.join(f'{x:.2f}' for x in machine['load_average_end'])}"
                        if machine.get("load_average_end") else "")
                     + " (other processes share these cores: compare with the number of logical CPUs)")
    if "error" in info:
        lines.append(f"- g2tr_kernels build_info(): not available ({info['error']})")
    else:
        brief = {k: v for k, v in info.items() if k != "parallel_backend"}
        lines.append(f"- g2tr_kernels build_info(): {brief}")
        backend = str(info.get("parallel_backend", "")).strip().splitlines()
        if backend:
            lines.append(f"- parallel backend: {backend[-1].strip()}")
    return lines


def print_machine(machine: Dict[str, Any], write=print) -> None:
    for line in machine_lines(machine):
        write(line)


def write_markdown(result: Dict[str, Any], path: str) -> None:
    args = result["args"]
    lines = ["# g2tr bench", "", "## Machine", ""] + machine_lines(result["machine"])
    lines += [
        "",
        "## How it was measured",
        "",
        f"- dtype {args['dtype']}, keep_ratio {args['keep_ratio']}, min_keep {args['min_keep']}, merge_weight 1.0; "
        f"inputs from g2tr_kernels.bench.workloads.make_inputs(seed={args['seed']}): smooth low-rank image-like "
        "tokens plus noise, anchors from the same field.",
        f"- time: {args['warmup']} untimed warmup call(s), then the median of {args['repeats']} calls timed with "
        "time.perf_counter (device synchronised on CUDA).",
        f"- peak extra memory: {MEMORY_METHOD['cuda' if result['machine']['device'].startswith('cuda') else 'cpu']}.",
        "- vs base: speedup over the stage's base row (the reference path; for the mean-only stage, index_add). "
        "vs published: speedup over the published structure (whole reduction rows only). / floor: time divided by "
        "the faster floor row, one plain matmul of each image's merge shape ((N-K) x D times D x K), "
        "summed over images, in fp32 (MKL on the CPU) and, for bf16 inputs, in bf16 (oneDNN on the CPU), same "
        "device, same run. "
        "Rows `g2tr cpu, <path>` force the CPU merge onto one path (G2TR_CPU_MERGE); `g2tr cpu` is the automatic "
        "choice (build_info()['cpu_merge']).",
        "- cases are timed interleaved (every case's first call, then rounds of one timed call per case), so drift "
        "in the machine's speed hits all of them alike.",
        "- errors are against the reference path on the same inputs: max |merged - ref| (or |scores - ref|); "
        "keep ≠: reference-kept tokens missing from the method's keep set; assign ≠: tokens whose output row differs. The published structure merges across images and "
        "computes its similarity in the input dtype, so its assign differs by design; ToMe and plain top-K follow "
        "other rules (their keep ≠ says how different the kept set is).",
        "- stages: " + "; ".join(f"**{k}** = {v}" for k, v in SCOPE_TITLES.items()) + ".",
        "",
    ]
    for record in result["workloads"]:
        lines += [f"## {workload_title(record)}", "", markdown_table(record), ""]
        lines += [f"- {line}" for line in cross_image_lines(record)]
        if record.get("skipped_backends"):
            lines += ["- skipped backends: " + "; ".join(f"{b}: {why}" for b, why in record["skipped_backends"].items())]
        notes = [f"{r['method']} ({r['scope']}): {r['note']}" for r in record["rows"] if r.get("note")]
        lines += [f"- {n}" for n in dict.fromkeys(notes)] + [""]
    if result.get("costs"):
        lines += cost_lines(result["costs"])
    if result.get("scaling"):
        lines += scaling_lines(result["scaling"])
    if result.get("e2e") is not None:
        lines += ["## End-to-end prefill", ""]
        e2e = result["e2e"]
        if isinstance(e2e, dict) and isinstance(e2e.get("markdown"), str):
            lines += [e2e["markdown"], ""]
        else:
            lines += ["```", json.dumps(e2e, indent=2, default=str), "```", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def cost_lines(costs: List[Dict[str, Any]]) -> List[str]:
    dev = costs[0]["device_model"]
    a = costs[0]["assumptions"]
    lines = [
        f"## GPU cost account ({costs[0]['label']})",
        "",
        f"Per reduce call on an {dev['name']} roofline ({dev['hbm_bytes_per_s'] / 1e12:.2f} TB/s, "
        f"{dev['bf16_dense_flops'] / 1e12:.0f} dense bf16 TFLOP/s), launches at {a['launch_s'] * 1e6:.0f} µs and host "
        f"syncs at {a['sync_s'] * 1e6:.0f} µs each (assumed). Bytes: {a['bytes']}. From g2tr_kernels/bench/costs.py; "
        "ESTIMATE, NOT MEASURED.",
        "",
        "| workload | structure | launches | host syncs | GB moved | GFLOP | roofline | launch + sync overhead | estimate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in costs:
        for name in ("ours", "published"):
            t = c[name]["total"]
            lines.append(
                f"| {c['workload']} | {'ours (CUDA path)' if name == 'ours' else 'published structure'} | "
                f"{t['launches']:,} | {t['host_syncs']:,} | {t['bytes'] / 1e9:.2f} | {t['flops'] / 1e9:.0f} | "
                f"{_time(t['roofline_s'])} | {_time(t['overhead_s'])} | {_time(t['estimate_s'])} |"
            )
    lines += ["", "Per-stage detail is in bench.json (costs[].ours.stages, costs[].published.stages).", ""]
    return lines


def scaling_lines(scaling: Dict[str, Any]) -> List[str]:
    lines = [
        "## Scaling",
        "",
        "Complexity: " + "; ".join(f"{k} {v}" for k, v in scaling["complexity"].items()) + ".",
        f"One image of N tokens (D = {scaling['dim']}, BAGEL-like anchor pooling), keep ratio fixed; the reference "
        f"and the published structure stop at N = {scaling['dense_max_tokens']:,} (they materialise the (N-K) x K "
        f"similarity). Calls predicted to exceed {scaling['long_call_s']:.0f} s ran once, timed and memory-probed in "
        "the same call, with no warmup. "
        "Plot: scaling.png.",
        "",
        "| method | " + " | ".join(f"N={p['n']:,}" for p in max(scaling["by_n"].values(), key=len)) + " |",
        "|---|" + "---|" * len(max(scaling["by_n"].values(), key=len)),
    ]
    width = len(max(scaling["by_n"].values(), key=len))
    for method, points in scaling["by_n"].items():
        cells = [f"{_time(p['median_s'])} / {_bytes(p.get('peak_extra_bytes'))}" for p in points]
        lines.append(f"| {method} | " + " | ".join(cells + ["—"] * (width - len(cells))) + " |")
    lines += ["", "Keep ratio sweep on M1 (one 70x70 image), time / peak extra memory:", "",
              "| method | " + " | ".join(f"{p['keep_ratio']}" for p in next(iter(scaling["by_keep_ratio"].values()))) + " |",
              "|---|" + "---|" * len(next(iter(scaling["by_keep_ratio"].values())))]
    for method, points in scaling["by_keep_ratio"].items():
        lines.append(f"| {method} | " + " | ".join(f"{_time(p['median_s'])} / {_bytes(p.get('peak_extra_bytes'))}" for p in points) + " |")
    return lines + [""]


def write_json(result: Dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)


# ----------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bench(result: Dict[str, Any], path: str) -> None:
    """Per workload: horizontal bars of median time per method (log scale), floor marked."""
    plt = _pyplot()
    records = result["workloads"]
    heights = [max(3.0, 0.32 * sum(1 for r in rec["rows"] if r.get("median_s") and r["kind"] != "floor") + 1.4)
               for rec in records]
    fig, axes = plt.subplots(len(records), 1, figsize=(10, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, rec in zip(axes[:, 0], records):
        rows = [r for r in rec["rows"] if r.get("median_s") and r["kind"] != "floor"]
        floor = min((r["median_s"] for r in rec["rows"] if r["kind"] == "floor" and r.get("median_s")), default=None)
        labels = [f"{r['scope']}: {r['method']}" for r in rows]
        times = [r["median_s"] * 1e3 for r in rows]
        y = list(range(len(rows)))[::-1]
        ax.barh(y, times, color=[KIND_COLOURS[r["kind"]] for r in rows])
        ax.set_yticks(y)
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_xscale("log")
        for yi, t in zip(y, times):
            ax.text(t, yi, f" {_time(t / 1e3)}", va="center", fontsize=7)
        for i in range(1, len(rows)):  # a rule between stages: compare bars within a group
            if rows[i]["scope"] != rows[i - 1]["scope"]:
                ax.axhline(y[i] + 0.5, color="black", linewidth=0.6, alpha=0.5)
        for tick, r in zip(ax.get_yticklabels(), rows):
            if r["scope"] == "reduce":
                tick.set_fontweight("bold")
        if floor:
            ax.axvline(floor * 1e3, color=KIND_COLOURS["floor"], linestyle="--", linewidth=1.5)
            ax.text(floor * 1e3, len(rows) - 0.4, f" floor {_time(floor)}", color=KIND_COLOURS["floor"], fontsize=8)
        ax.set_xlabel("median time per call (ms, log scale)", fontsize=8)
        ax.set_title(f"{rec['id']}: {rec['scenario']} (N={rec['n_total']:,}, D={rec['dim']}, K={rec['k_total']:,})",
                     fontsize=9, loc="left")
        lo = min(times + ([floor * 1e3] if floor else []))
        hi = max(times + ([floor * 1e3] if floor else []))
        ax.set_xlim(lo / 2, hi * 6)
        ax.grid(axis="x", which="both", alpha=0.25)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in KIND_COLOURS.values()]
    fig.legend(handles, ["g2tr (ours)", "reference", "published structure", "peer", "floor (faster matmul)"],
               loc="upper right", fontsize=8, ncol=5)
    machine = result["machine"]
    fig.suptitle(f"g2tr bench — {result['args']['dtype']}, {machine['device']}, {machine['cpu']}, "
                 f"{machine['torch_threads']} threads", fontsize=10, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scaling(scaling: Dict[str, Any], path: str) -> None:
    plt = _pyplot()
    fig, (ax_t, ax_m, ax_r) = plt.subplots(1, 3, figsize=(15, 4.6))
    colours = {"reference": KIND_COLOURS["reference"], "published structure": KIND_COLOURS["published"],
               "floor: fp32 matmul": KIND_COLOURS["floor"]}
    for method, points in scaling["by_n"].items():
        if not points:
            continue
        c = colours.get(method, KIND_COLOURS["ours"])
        n = [p["n"] for p in points]
        ax_t.plot(n, [p["median_s"] for p in points], "o-", color=c, label=method)
        mem = [(p["n"], p["peak_extra_bytes"] / 2**20) for p in points if p.get("peak_extra_bytes")]
        if mem and not method.startswith("floor"):  # the floor writes into a preallocated buffer
            ax_m.plot(*zip(*mem), "o-", color=c, label=method)
    ours = next((pts for m, pts in scaling["by_n"].items() if m.startswith("g2tr") and pts), None)
    if ours and len(ours) > 1:
        p0 = ours[-1]
        n = [p["n"] for p in ours]
        ax_t.plot(n, [p0["median_s"] * (x / p0["n"]) ** 2 for x in n], ":", color="black", alpha=0.5, label="∝ N² guide")
    from matplotlib.ticker import NullFormatter

    for ax in (ax_t, ax_m):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on a short log axis
        ax.set_xlabel("tokens in one image (N)")
        ax.grid(which="both", alpha=0.25)
        ax.legend(fontsize=8)
    ax_t.set_ylabel("median time (s)")
    ax_t.set_title("time vs N (merge is O((N-K)·K·D))", fontsize=9)
    ax_m.set_ylabel("peak extra memory (MiB)")
    ax_m.set_title("peak extra memory vs N", fontsize=9)
    for method, points in scaling["by_keep_ratio"].items():
        ax_r.plot([p["keep_ratio"] for p in points], [p["median_s"] * 1e3 for p in points], "o-",
                  color=colours.get(method, KIND_COLOURS["ours"]), label=method)
    ax_r.set_yscale("log")
    ax_r.set_xlabel("keep ratio (M1: one 70x70 image)")
    ax_r.set_ylabel("median time (ms)")
    ax_r.set_title("time vs keep ratio ((N-K)·K peaks at 0.5)", fontsize=9)
    ax_r.grid(which="both", alpha=0.25)
    ax_r.legend(fontsize=8)
    fig.suptitle("score O(N·D), select O(N log N), merge O((N−K)·K·D) per image", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(result: Dict[str, Any], out_dir: str) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, name) for name in ("bench.md", "bench.json", "bench.png")]
    write_markdown(result, paths[0])
    write_json(result, paths[1])
    plot_bench(result, paths[2])
    if result.get("scaling"):
        paths.append(os.path.join(out_dir, "scaling.png"))
        plot_scaling(result["scaling"], paths[-1])
    return paths
