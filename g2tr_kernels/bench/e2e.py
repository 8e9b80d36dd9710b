"""End-to-end prefill: what G2TR saves in a real LLM forward, measured (`g2tr bench --e2e`).

A random-weight Qwen2 decoder at a real Qwen2.5 width (transformers, built from a config,
nothing downloaded) prefills the prompt of one BAGEL image (SHAPES.md M1: 70 x 70 = 4,900
visual tokens between [SOI] and [EOI], plus text) once with all N visual tokens and once
with the K that G2TR keeps; the reduction itself (g2tr_kernels.reduce on the M1 tokens and
anchors) is timed on the same device and charged to the reduced run. Few layers keep it to
about a minute on 2 CPU cores: every layer costs the same, so the ratio is what a deep
model shows, less the parts outside the layers (embedding, head), which do not change.

run_e2e(args) reads these attributes of args (an argparse Namespace, any object, a dict
or None), with defaults:
  e2e_hidden 2048 (3584 = Qwen2.5-7B, as BAGEL), e2e_layers 2, e2e_text 64 (text tokens),
  e2e_workload "M1", e2e_repeats (default min(repeats, 2)), dtype "bfloat16", keep_ratio 0.5,
  min_keep 32, warmup 1, seed 0, device "cpu", quick (tiny model and image: a smoke test).
"""
from __future__ import annotations

import dataclasses
import platform
import statistics
import time
from typing import Any, Dict, List

import torch

from .. import ops
from . import workloads

# Real Qwen2.5 widths: hidden -> (intermediate, attention heads, KV heads).
QWEN25_WIDTHS = {
    3584: (18944, 28, 4),  # Qwen2.5-7B, BAGEL's LLM
    2048: (11008, 16, 2),  # Qwen2.5-3B
    1536: (8960, 12, 2),  # Qwen2.5-1.5B
    896: (4864, 14, 2),  # Qwen2.5-0.5B
}
PAPER = (
    "BAGEL-7B at keep ratio 0.5: 1.94x fewer visual tokens and prefill FLOPs, "
    "KV cache 1.90x smaller (as the paper reports)"
)


def _get(args, name: str, default):
    if args is None:
        return default
    value = args.get(name, None) if isinstance(args, dict) else getattr(args, name, None)
    return default if value is None else value


def add_e2e_arguments(parser) -> None:
    """Adds the --e2e-* options to an argparse parser (the cli may call this)."""
    parser.add_argument("--e2e-hidden", type=int, default=None, help="LLM width (2048 default; 3584 = Qwen2.5-7B)")
    parser.add_argument("--e2e-layers", type=int, default=None, help="decoder layers (default 2)")
    parser.add_argument("--e2e-text", type=int, default=None, help="text tokens in the prompt (default 64)")
    parser.add_argument("--e2e-workload", default=None, help="image workload from SHAPES.md (default M1)")
    parser.add_argument("--e2e-repeats", type=int, default=None, help="timed prefills per length (default 2)")


def qwen2_widths(hidden: int):
    """(intermediate, heads, kv_heads) of a Qwen2.5 model this wide; other widths scale Qwen2.5-7B."""
    if hidden in QWEN25_WIDTHS:
        return QWEN25_WIDTHS[hidden]
    heads = max(1, hidden // 128)
    if hidden % heads:
        raise ValueError(f"e2e: hidden size {hidden} must be a multiple of 128 (or one of {sorted(QWEN25_WIDTHS)})")
    intermediate = int(round(hidden * 18944 / 3584 / 128)) * 128
    return intermediate, heads, max(1, heads // 7)


def build_llm(hidden: int, layers: int, dtype: torch.dtype, device, seed: int, widths=None):
    from transformers import Qwen2Config, Qwen2Model

    intermediate, heads, kv_heads = widths or qwen2_widths(hidden)
    config = Qwen2Config(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=1024,  # prompts come as embeddings
        max_position_embeddings=32768, rope_theta=1_000_000.0,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Qwen2Model(config).to(device=device, dtype=dtype).eval()
    return model, config


def prefill_flops(config, length: int) -> float:
    """Matmul FLOPs of one causal prefill of `length` tokens through the decoder layers."""
    h, i = config.hidden_size, config.intermediate_size
    head_dim = h // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    linear = 2 * length * (h * h + 2 * h * kv + h * h + 3 * h * i)  # q, k, v, o, gate/up/down
    attention = 2 * 2 * config.num_attention_heads * head_dim * length * (length + 1) / 2  # QK^T, AV, causal half
    return config.num_hidden_layers * (linear + attention)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, repeats: int) -> List[float]:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def run_e2e(args=None) -> Dict[str, Any]:
    """Prefill with N vs K visual tokens plus the reduction's own cost. Returns numbers and markdown."""
    quick = bool(_get(args, "quick", False))
    hidden = int(_get(args, "e2e_hidden", 256 if quick else 2048))
    layers = int(_get(args, "e2e_layers", 1 if quick else 2))
    text = int(_get(args, "e2e_text", 64))
    workload_id = str(_get(args, "e2e_workload", "M1"))
    repeats = int(_get(args, "e2e_repeats", min(int(_get(args, "repeats", 2)), 2)))
    warmup = int(_get(args, "warmup", 1))
    dtype_name = str(_get(args, "dtype", "bfloat16"))
    keep_ratio = float(_get(args, "keep_ratio", 0.5))
    min_keep = int(_get(args, "min_keep", workloads.SMOKE_MIN_KEEP if quick else 32))
    seed = int(_get(args, "seed", 0))
    device = torch.device(_get(args, "device", None) or "cpu")
    dtype = getattr(torch, dtype_name)
    if repeats < 1 or text < 0 or layers < 1:
        raise ValueError("e2e: e2e_repeats and e2e_layers must be >= 1 and e2e_text >= 0")

    workload = workloads.get(workload_id)
    if quick:
        workload = workload.tiny()
    workload = dataclasses.replace(workload, dim=hidden)  # the connector output is as wide as the LLM
    tokens, anchors = workloads.make_inputs(workload, dtype=dtype, device=device, seed=seed)
    grids, anchor_grids = list(workload.grids), list(workload.anchor_grids)

    def reduce():
        return ops.reduce(tokens, anchors, grids, anchor_grids, keep_ratio=keep_ratio, min_keep=min_keep)

    with torch.inference_mode():
        out = reduce()
        reduce_times = _time(reduce, device, max(3, repeats))
    n_visual, k_visual = tokens.shape[0], out.merged.shape[0]
    images = workload.images

    started = time.perf_counter()
    model, config = build_llm(hidden, layers, dtype, device, seed)
    build_s = time.perf_counter() - started
    gen = torch.Generator().manual_seed(seed)
    # The prompt: text before and after, [SOI] visual [EOI] per image; text rows are random embeddings.
    text_rows = (torch.randn(text + 2 * images, hidden, generator=gen) * 0.02).to(device=device, dtype=dtype)

    cu = out.cu_seqlens.tolist()
    kept = [b - a for a, b in zip(cu, cu[1:])]

    def prompt(visual: torch.Tensor, lengths: List[int]) -> torch.Tensor:
        before = text // 2
        parts, t, v = [text_rows[:before]], before, 0
        for length in lengths:
            parts += [text_rows[t : t + 1], visual[v : v + length], text_rows[t + 1 : t + 2]]
            t, v = t + 2, v + length
        parts.append(text_rows[t:])
        return torch.cat(parts)[None]

    full, reduced = prompt(tokens, workload.lengths), prompt(out.merged, kept)

    def prefill(x):
        return lambda: model(inputs_embeds=x, use_cache=True)  # noqa: F821 (called before `del model`)

    with torch.inference_mode():
        for _ in range(warmup):  # both lengths: the first call at a new length pays for allocations
            prefill(full)()
            prefill(reduced)()
        full_times, reduced_times = [], []
        for _ in range(repeats):  # interleaved, so drift in the machine's speed hits both alike
            full_times += _time(prefill(full), device, 1)
            reduced_times += _time(prefill(reduced), device, 1)
    del model

    full_s = statistics.median(full_times)
    reduced_s = statistics.median(reduced_times)
    reduce_s = statistics.median(reduce_times)
    flops_full, flops_reduced = prefill_flops(config, full.shape[1]), prefill_flops(config, reduced.shape[1])
    result = {
        "config": {
            "llm": f"Qwen2 (random weights), hidden {hidden}, intermediate {config.intermediate_size}, "
            f"{config.num_attention_heads} heads / {config.num_key_value_heads} KV heads, {layers} layers, sdpa",
            "hidden": hidden, "layers": layers, "intermediate": config.intermediate_size,
            "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
            "workload": workload.id, "images": images, "grids": grids, "anchor_grids": anchor_grids,
            "text_tokens": text, "dtype": dtype_name, "keep_ratio": keep_ratio, "min_keep": min_keep,
            "device": str(device), "repeats": repeats, "warmup": warmup, "seed": seed,
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__, "build_s": round(build_s, 2),
        },
        "visual_tokens": {"full": n_visual, "reduced": k_visual, "ratio": n_visual / k_visual},
        "sequence": {"full": full.shape[1], "reduced": reduced.shape[1], "ratio": full.shape[1] / reduced.shape[1]},
        "kv_cache_ratio": full.shape[1] / reduced.shape[1],
        "prefill_flops": {"full": flops_full, "reduced": flops_reduced, "ratio": flops_full / flops_reduced},
        "prefill_s": {"full": full_s, "reduced": reduced_s, "full_all": full_times, "reduced_all": reduced_times},
        "reduce_s": reduce_s,
        "reduce_share_of_reduced_prefill": reduce_s / reduced_s,
        "speedup": full_s / (reduced_s + reduce_s),
        "speedup_without_reduce": full_s / reduced_s,
        "paper": PAPER,
    }
    result["markdown"] = markdown(result)
    return result


def _flops(value: float) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f}"


def markdown(result: Dict[str, Any]) -> str:
    c, v, s = result["config"], result["visual_tokens"], result["sequence"]
    p, f = result["prefill_s"], result["prefill_flops"]
    lines = [
        f"### End-to-end prefill ({c['workload']}, {c['device']}, {c['dtype']})",
        "",
        f"{c['llm']}; prompt = {c['text_tokens']} text tokens + [SOI] visual [EOI] per image "
        f"({c['images']} image(s)); keep ratio {c['keep_ratio']}; median of {c['repeats']} prefills, "
        f"{c['threads']} threads.",
        "",
        "| | visual tokens | prompt tokens | prefill FLOPs | prefill | + reduce | total |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| vanilla | {v['full']:,} | {s['full']:,} | {_flops(f['full'])} | {p['full']:.3f} s | | {p['full']:.3f} s |",
        f"| G2TR | {v['reduced']:,} | {s['reduced']:,} | {_flops(f['reduced'])} | {p['reduced']:.3f} s "
        f"| {result['reduce_s'] * 1e3:.1f} ms | {p['reduced'] + result['reduce_s']:.3f} s |",
        f"| ratio | {v['ratio']:.2f}x | {s['ratio']:.2f}x | {f['ratio']:.2f}x | {p['full'] / p['reduced']:.2f}x | "
        f"| **{result['speedup']:.2f}x** |",
        "",
        f"Measured prefill speedup {result['speedup']:.2f}x including the reduction "
        f"({result['reduce_share_of_reduced_prefill'] * 100:.1f}% of the reduced prefill at {c['layers']} layers; "
        f"a deep model spreads it thinner), next to {v['ratio']:.2f}x fewer visual tokens and "
        f"{f['ratio']:.2f}x fewer prefill FLOPs. KV cache {result['kv_cache_ratio']:.2f}x smaller. {result['paper']}.",
    ]
    return "\n".join(lines)


def main() -> None:  # python -m g2tr_kernels.bench.e2e
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_e2e_arguments(parser)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--keep-ratio", type=float, default=0.5)
    parser.add_argument("--min-keep", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the whole result as JSON")
    args = parser.parse_args()
    result = run_e2e(args)
    print(json.dumps({k: v for k, v in result.items() if k != "markdown"}, indent=1, default=str) if args.json
          else result["markdown"])


if __name__ == "__main__":
    main()
