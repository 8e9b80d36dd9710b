"""End to end, counting everything G2TR adds (`g2tr bench --e2e`).

What G2TR saves is prefill time in the LLM; what it adds is the reduction itself and the
anchors' cost. Both are measured here on the same device, in one run:

- anchors, understanding mode: the image is encoded by the generation VAE only to build the
  anchors, so G2TR pays for a FLUX-sized diffusers AutoencoderKL encoder (random weights,
  built offline from its config: latent_channels 16, block_out_channels (128, 256, 512, 512),
  layers_per_block 2) at the image's VAE resolution (BAGEL M1: 1024 x 1024 -> latent
  16 x 128 x 128 -> patchify 2 -> 64 x 64 -> pool 2 -> 32 x 32 anchors), plus pooling and the
  64 -> D projection (a random Linear standing in for BAGEL's vae2llm);
- anchors, editing mode: the generation latent of the image exists anyway (it is the one
  being edited), so only pooling and projection are G2TR's;
- the reduction (g2tr_kernels.reduce on the ViT tokens and those anchors);
- prefill per decoder layer with N and with K visual tokens: a random-weight Qwen2 decoder of
  Qwen2.5-7B's shape (hidden 3584, intermediate 18944, 28 heads / 4 KV heads: BAGEL-7B's LLM)
  built from a config (transformers, nothing downloaded), `layers` layers timed, interleaved.

Every layer costs the same, so the measured per-layer times extrapolate to BAGEL-7B's depth
L = 28 as a labelled ESTIMATE (parts outside the layers, embedding and head, are left out;
they do not change with G2TR):
  vanilla(L)            = L * t_N
  G2TR editing(L)       = L * t_K + t_reduce + t_pool_project
  G2TR understanding(L) = L * t_K + t_reduce + t_pool_project + t_vae
  break-even depth      = (added cost) / (t_N - t_K)  layers
On 2 CPU cores the VAE encoder at 1024^2 takes tens of seconds: it is timed `e2e_vae_repeats`
times (default 1: a single call, which includes oneDNN's one-time setup), not in a loop.

run_e2e(args) reads these attributes of args (an argparse Namespace, any object, a dict
or None), with defaults:
  e2e_hidden 3584, e2e_layers 1 (layers timed), e2e_depth 28 (layers of the estimate),
  e2e_text 64 (text tokens), e2e_workload "M1", e2e_repeats (default min(repeats, 2)),
  e2e_vae "flux" (or "none": skip the VAE), e2e_vae_resolution (default: from the workload's
  anchor grid, 32 pixels per anchor cell; a small value such as 256 makes a quick check),
  e2e_vae_repeats 1, dtype "bfloat16", keep_ratio 0.5, min_keep 32, warmup 1, seed 0,
  device "cpu", quick (tiny model, VAE and image: a smoke test).
"""
from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import sys
import time
from typing import Any, Dict, List, Optional

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


# FLUX.1 AE (BAGEL's generation VAE), diffusers AutoencoderKL config; random weights.
FLUX_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, act_fn="silu", norm_num_groups=32,
    scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
    mid_block_add_attention=True,
)
# The smoke-test stand-in: the same structure (downsampling 8, 16 latent channels), tiny widths.
TINY_VAE = dict(FLUX_VAE, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
VAE_DOWNSAMPLE = 8  # FLUX AE: H x W -> H/8 x W/8
BAGEL_PATCH, BAGEL_POOL = 2, 2  # latent patchify, then anchor pooling (SPEC.md §2)
BAGEL_DEPTH = 28  # Qwen2.5-7B decoder layers


def _get(args, name: str, default):
    if args is None:
        return default
    value = args.get(name, None) if isinstance(args, dict) else getattr(args, name, None)
    return default if value is None else value


def add_e2e_arguments(parser) -> None:
    """Adds the --e2e-* options to an argparse parser (the cli calls this)."""
    parser.add_argument("--e2e-hidden", type=int, default=None, help="LLM width (default 3584 = Qwen2.5-7B, as BAGEL)")
    parser.add_argument("--e2e-layers", type=int, default=None, help="decoder layers timed (default 1)")
    parser.add_argument("--e2e-depth", type=int, default=None,
                        help="layers of the extrapolated estimate (default 28 = BAGEL-7B)")
    parser.add_argument("--e2e-text", type=int, default=None, help="text tokens in the prompt (default 64)")
    parser.add_argument("--e2e-workload", default=None, help="image workload from SHAPES.md (default M1)")
    parser.add_argument("--e2e-repeats", type=int, default=None, help="timed prefills per length (default 2)")
    parser.add_argument("--e2e-vae", choices=("flux", "none"), default=None,
                        help="VAE encoder timed for understanding mode (default flux: FLUX AE, random weights)")
    parser.add_argument("--e2e-vae-resolution", type=int, default=None,
                        help="VAE input side in pixels (default: 32 per anchor cell, 1024 for M1); small = quick")
    parser.add_argument("--e2e-vae-repeats", type=int, default=None, help="timed VAE encodes (default 1)")


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


def build_vae(config: Dict[str, Any], dtype: torch.dtype, device, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**config).to(device=device, dtype=dtype).eval()


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


def estimate(t_full: float, t_reduced: float, depth: int, added: Dict[str, float]) -> Dict[str, Any]:
    """BAGEL-depth estimate from per-layer times: vanilla L*t_N vs L*t_K + what G2TR adds."""
    saved_per_layer = t_full - t_reduced
    out: Dict[str, Any] = {"depth": depth, "vanilla_s": depth * t_full,
                           "formula": "vanilla = L * t_N; G2TR = L * t_K + added; break-even L = added / (t_N - t_K)"}
    for mode, cost in added.items():
        total = depth * t_reduced + cost
        out[mode] = {
            "added_s": cost,
            "total_s": total,
            "speedup": depth * t_full / total,
            "break_even_layers": cost / saved_per_layer if saved_per_layer > 0 else float("inf"),
        }
    return out


def run_e2e(args=None) -> Dict[str, Any]:
    """Anchors (VAE or latent), reduction, and prefill with N vs K visual tokens. Returns numbers and markdown."""
    quick = bool(_get(args, "quick", False))
    hidden = int(_get(args, "e2e_hidden", 256 if quick else 3584))
    layers = int(_get(args, "e2e_layers", 1))
    depth = int(_get(args, "e2e_depth", BAGEL_DEPTH))
    text = int(_get(args, "e2e_text", 64))
    workload_id = str(_get(args, "e2e_workload", "M1"))
    repeats = int(_get(args, "e2e_repeats", min(int(_get(args, "repeats", 2)), 2)))
    warmup = int(_get(args, "warmup", 1))
    vae_kind = str(_get(args, "e2e_vae", "flux"))
    vae_resolution = _get(args, "e2e_vae_resolution", None)
    vae_repeats = int(_get(args, "e2e_vae_repeats", 1))
    dtype_name = str(_get(args, "dtype", "bfloat16"))
    keep_ratio = float(_get(args, "keep_ratio", 0.5))
    min_keep = int(_get(args, "min_keep", workloads.SMOKE_MIN_KEEP if quick else 32))
    seed = int(_get(args, "seed", 0))
    device = torch.device(_get(args, "device", None) or "cpu")
    dtype = getattr(torch, dtype_name)
    if repeats < 1 or text < 0 or layers < 1 or depth < 1 or vae_repeats < 1:
        raise ValueError("e2e: e2e_repeats, e2e_layers, e2e_depth and e2e_vae_repeats must be >= 1, e2e_text >= 0")
    if vae_kind not in ("flux", "none"):
        raise ValueError(f"e2e: e2e_vae must be 'flux' or 'none', got {vae_kind!r}")

    workload = workloads.get(workload_id)
    if quick:
        workload = workload.tiny()
    workload = dataclasses.replace(workload, dim=hidden)  # the connector output is as wide as the LLM
    tokens, anchors = workloads.make_inputs(workload, dtype=dtype, device=device, seed=seed)
    grids, anchor_grids = list(workload.grids), list(workload.anchor_grids)
    images = workload.images
    gen = torch.Generator().manual_seed(seed)

    # ---- anchors: VAE encode (understanding mode only), then pooling + projection (both modes)
    cell_pixels = VAE_DOWNSAMPLE * BAGEL_PATCH * BAGEL_POOL  # 32 pixels per anchor cell
    sides = [(ha * cell_pixels, wa * cell_pixels) for ha, wa in anchor_grids]
    if vae_resolution is not None:
        scale = int(vae_resolution) / max(max(s) for s in sides)
        sides = [(max(cell_pixels, round(h * scale / cell_pixels) * cell_pixels),
                  max(cell_pixels, round(w * scale / cell_pixels) * cell_pixels)) for h, w in sides]
    vae_config = TINY_VAE if quick else FLUX_VAE
    projection = torch.nn.Linear(BAGEL_PATCH * BAGEL_PATCH * vae_config["latent_channels"], hidden)
    projection = projection.to(device=device, dtype=dtype)
    from ..anchors import anchors_from_latents, encode_latents

    vae_times: List[float] = []
    with torch.inference_mode():
        pixels = [(torch.rand(3, h, w, generator=gen) * 2 - 1).to(device=device, dtype=dtype) for h, w in sides]
        if vae_kind == "flux":
            vae = build_vae(vae_config, dtype, device, seed)
            latents: List[torch.Tensor] = []
            for _ in range(vae_repeats):
                _sync(device)
                start = time.perf_counter()
                latents = encode_latents(vae, pixels)
                _sync(device)
                vae_times.append(time.perf_counter() - start)
            del vae
        else:  # editing only: a stand-in for the generation latent the model holds anyway
            latents = [torch.randn(vae_config["latent_channels"], h // VAE_DOWNSAMPLE, w // VAE_DOWNSAMPLE,
                                   generator=gen).to(device=device, dtype=dtype) for h, w in sides]

        def pool_project():
            return anchors_from_latents(latents, projection, patch=BAGEL_PATCH, pool=BAGEL_POOL, dtype=dtype)

        vae_anchors, vae_anchor_grids = pool_project()
        pool_times = _time(pool_project, device, 3)
    if vae_resolution is None:  # the anchors the reduction runs on are the VAE's own
        if [tuple(g) for g in vae_anchor_grids] != [tuple(g) for g in anchor_grids]:
            raise RuntimeError(f"e2e: VAE anchor grids {vae_anchor_grids} differ from the workload's {anchor_grids}")
        anchors = vae_anchors

    def reduce():
        return ops.reduce(tokens, anchors, grids, anchor_grids, keep_ratio=keep_ratio, min_keep=min_keep)

    with torch.inference_mode():
        out = reduce()
        reduce_times = _time(reduce, device, max(3, repeats))
    n_visual, k_visual = tokens.shape[0], out.merged.shape[0]

    # ---- prefill with N and with K visual tokens
    started = time.perf_counter()
    model, config = build_llm(hidden, layers, dtype, device, seed)
    build_s = time.perf_counter() - started
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

    full_s = statistics.median(full_times)
    reduced_s = statistics.median(reduced_times)
    reduce_s = statistics.median(reduce_times)
    pool_s = statistics.median(pool_times)
    vae_s = statistics.median(vae_times) if vae_times else None
    added = {"editing": reduce_s + pool_s}
    if vae_s is not None:
        added["understanding"] = reduce_s + pool_s + vae_s
    flops_full, flops_reduced = prefill_flops(config, full.shape[1]), prefill_flops(config, reduced.shape[1])
    try:
        from .runner import machine_info

        cpu = machine_info(device)["cpu"]
    except Exception:
        cpu = platform.processor() or platform.machine()
    result = {
        "config": {
            "llm": f"Qwen2 (random weights), hidden {hidden}, intermediate {config.intermediate_size}, "
            f"{config.num_attention_heads} heads / {config.num_key_value_heads} KV heads, "
            f"{layers} layer(s) timed, sdpa",
            "hidden": hidden, "layers": layers, "depth": depth, "intermediate": config.intermediate_size,
            "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
            "workload": workload.id, "images": images, "grids": grids, "anchor_grids": anchor_grids,
            "text_tokens": text, "dtype": dtype_name, "keep_ratio": keep_ratio, "min_keep": min_keep,
            "device": str(device), "repeats": repeats, "warmup": warmup, "seed": seed,
            "threads": torch.get_num_threads(), "cpu": cpu, "torch": torch.__version__, "build_s": round(build_s, 2),
            "vae": ("FLUX AE encoder (tiny smoke-test widths)" if quick else "FLUX AE encoder") + ", random weights, "
            f"block_out_channels {vae_config['block_out_channels']}, "
            f"layers_per_block {vae_config['layers_per_block']}, "
            f"latent_channels {vae_config['latent_channels']}" if vae_kind == "flux" else "none",
            "vae_inputs": [list(s) for s in sides], "vae_repeats": vae_repeats if vae_kind == "flux" else 0,
            "anchors_from_vae": vae_resolution is None,
        },
        "visual_tokens": {"full": n_visual, "reduced": k_visual, "ratio": n_visual / k_visual},
        "sequence": {"full": full.shape[1], "reduced": reduced.shape[1], "ratio": full.shape[1] / reduced.shape[1]},
        "kv_cache_ratio": full.shape[1] / reduced.shape[1],
        "prefill_flops": {"full": flops_full, "reduced": flops_reduced, "ratio": flops_full / flops_reduced},
        "prefill_s": {"full": full_s, "reduced": reduced_s, "full_all": full_times, "reduced_all": reduced_times},
        "per_layer_s": {"full": full_s / layers, "reduced": reduced_s / layers},
        "reduce_s": reduce_s,
        "pool_project_s": pool_s,
        "vae_s": vae_s,
        "vae_all_s": vae_times,
        "reduce_share_of_reduced_prefill": reduce_s / reduced_s,
        # At the measured depth: editing mode (no VAE) and, where timed, understanding mode.
        "speedup": full_s / (reduced_s + added["editing"]),
        "speedup_without_reduce": full_s / reduced_s,
        "speedup_understanding": full_s / (reduced_s + added["understanding"]) if vae_s is not None else None,
        "estimate": estimate(full_s / layers, reduced_s / layers, depth, added),
        "paper": PAPER,
    }
    result["markdown"] = markdown(result)
    return result


def _flops(value: float) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f}"


def _s(value: Optional[float]) -> str:
    if value is None:
        return "—"
    return f"{value:.3f} s" if value >= 0.1 else f"{value * 1e3:.1f} ms"


def _layers(value: float) -> str:
    if value == float("inf"):
        return "never (K tokens are not faster here)"
    return f"{value:.1f} layers" if value >= 1 else f"{value:.2f} layers"


def markdown(result: Dict[str, Any]) -> str:
    c, v, s = result["config"], result["visual_tokens"], result["sequence"]
    p, f, e = result["prefill_s"], result["prefill_flops"], result["estimate"]
    added_edit = result["reduce_s"] + result["pool_project_s"]
    lines = [
        f"### End-to-end, counting everything ({c['workload']}, {c['device']}, {c['dtype']}, {c['threads']} threads)",
        "",
        f"CPU: {c['cpu']}. LLM: {c['llm']}; prompt = {c['text_tokens']} text tokens + [SOI] visual [EOI] per image "
        f"({c['images']} image(s)); keep ratio {c['keep_ratio']}; median of {c['repeats']} interleaved prefills. "
        f"VAE: {c['vae']}, input {' + '.join(f'{h}x{w}' for h, w in c['vae_inputs'])}, timed {c['vae_repeats']} "
        "time(s) (a single call includes oneDNN's one-time setup). Anchors: latent patchify 2, pool 2, a random "
        f"Linear to D{' (the reduction runs on these anchors)' if c['anchors_from_vae'] else ''}.",
        "",
        f"Measured ({c['layers']} decoder layer(s)):",
        "",
        "| | visual tokens | prompt tokens | prefill FLOPs | prefill | + reduce | + pool & project | + VAE encode "
        "| total |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| vanilla | {v['full']:,} | {s['full']:,} | {_flops(f['full'])} | {_s(p['full'])} | | | | {_s(p['full'])} |",
        f"| G2TR | {v['reduced']:,} | {s['reduced']:,} | {_flops(f['reduced'])} | {_s(p['reduced'])} "
        f"| {_s(result['reduce_s'])} | {_s(result['pool_project_s'])} | | {_s(p['reduced'] + added_edit)} |",
    ]
    if result["vae_s"] is not None:
        lines.append(f"| G2TR, understanding (VAE run for the anchors) | | | | | | | {_s(result['vae_s'])} "
                     f"| {_s(p['reduced'] + added_edit + result['vae_s'])} |")
    lines += [
        f"| ratio | {v['ratio']:.2f}x | {s['ratio']:.2f}x | {f['ratio']:.2f}x | "
        f"{p['full'] / p['reduced']:.2f}x | | | | "
        f"editing **{result['speedup']:.2f}x**"
        + (f", understanding **{result['speedup_understanding']:.2f}x**" if result["speedup_understanding"] else "")
        + " |",
        "",
        f"ESTIMATE for a {e['depth']}-layer model (BAGEL-7B: Qwen2.5-7B, 28 layers) from the per-layer times "
        f"t_N = {_s(result['per_layer_s']['full'])}, t_K = {_s(result['per_layer_s']['reduced'])}: {e['formula']}; "
        "embedding and head left out (G2TR does not change them).",
        "",
        "| mode | G2TR adds | vanilla prefill | G2TR total | speedup | break-even depth |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    names = {"editing": "editing (latent reused: reduce + pool & project)",
             "understanding": "understanding (VAE encode + pool & project + reduce)"}
    for mode in ("editing", "understanding"):
        if mode in e:
            m = e[mode]
            lines.append(f"| {names[mode]} | {_s(m['added_s'])} | {_s(e['vanilla_s'])} | {_s(m['total_s'])} "
                         f"| **{m['speedup']:.2f}x** | {_layers(m['break_even_layers'])} |")
    lines += [
        "",
        f"Prefill without G2TR's own costs: {result['speedup_without_reduce']:.2f}x faster, next to {v['ratio']:.2f}x "
        f"fewer visual tokens and {f['ratio']:.2f}x fewer prefill FLOPs; KV cache {result['kv_cache_ratio']:.2f}x "
        f"smaller. {result['paper']}.",
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
    parser.add_argument("--out", metavar="DIR", help="also write e2e.md and e2e.json here, with the command, the "
                        "load average at start and end and the wall time")
    args = parser.parse_args()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    start = time.perf_counter()
    result = run_e2e(args)
    wall = time.perf_counter() - start
    as_json = json.dumps({k: v for k, v in result.items() if k != "markdown"}, indent=1, default=str)
    print(as_json if args.json else result["markdown"])
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        command = "python -m g2tr_kernels.bench.e2e " + " ".join(sys.argv[1:])
        load = ""
        if load_start is not None:
            load = (f"Load average (1, 5, 15 min) at start: {', '.join(f'{v:.2f}' for v in load_start)}; at end: "
                    f"{', '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} logical CPUs. ")
        header = f"# g2tr e2e\n\nCommand: `{command}`.\n\n{load}Wall time of the whole run {wall:.0f} s.\n\n"
        with open(os.path.join(args.out, "e2e.md"), "w") as f:
            f.write(header + result["markdown"] + "\n")
        with open(os.path.join(args.out, "e2e.json"), "w") as f:
            f.write(as_json + "\n")
        print(f"wrote {os.path.join(args.out, 'e2e.md')} and e2e.json", file=sys.stderr)


if __name__ == "__main__":
    main()
