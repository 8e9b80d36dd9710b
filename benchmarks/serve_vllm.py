"""Serving throughput with and without G2TR in vLLM, side by side in one run (run in .venv-vllm).

    .venv-vllm/bin/python -P benchmarks/serve_vllm.py                # defaults below
    .venv-vllm/bin/python -P benchmarks/serve_vllm.py --layers 2 --requests 4 --json out.json

A random LLaVA-1.5 layout at realistic widths (CLIP ViT-L/14 at 336 px: 576 tokens of 1024,
here with --vision-layers layers; an LLM of width --width, --layers layers) and a random
diffusers VAE, built offline in a temporary folder. Two engines in turn, same prompts and
images: stock vLLM (no "g2tr" key) and G2TR (keep 0.5). Reported per engine:
  time to first token: the median over --requests single requests of the wall time of
    generate(max_tokens=1) (one image + a short text; the prefill and the encoder);
  prefill tokens/s: prompt tokens of a batch of --requests requests / its wall time with
    max_tokens=1 (the tokens the LLM actually prefills: N + text stock, K + text G2TR).
and, outside the engine on the same image and features: the VAE encode (anchors) and
g2tr_kernels.reduce alone. Named: not bench_*.py, so the pytest-benchmark suite does not
collect it (it needs vLLM).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        name = fields.get("Model name", platform.processor()).strip()
        return f"{name} (family {fields.get('CPU family', '?').strip()} model {fields.get('Model', '?').strip()}, " \
               f"{os.cpu_count()} cores visible)"
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"


def build(folder: str, args) -> tuple:
    import torch
    from diffusers import AutoencoderKL

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "vllm"))
    import tiny_models as tm

    # tests/vllm's LLaVA layout at realistic widths, bf16, the random init as it is.
    model_dir = tm.build_llava(
        os.path.join(folder, "llava"), image_size=336, patch_size=14, widen=False, dtype=torch.bfloat16,
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=args.vision_layers,
                    num_attention_heads=16, projection_dim=768),
        text=dict(hidden_size=args.width, intermediate_size=args.width * 11 // 4, num_hidden_layers=args.layers,
                  num_attention_heads=args.width // 128, num_key_value_heads=args.width // 128,
                  max_position_embeddings=2048),
    )
    vae_dir = os.path.join(folder, "vae")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 64, 128, 128),
                  latent_channels=16, layers_per_block=1, norm_num_groups=32).save_pretrained(vae_dir)
    return model_dir, vae_dir, tm


def run_engine(model_dir: str, g2tr, prompts, args) -> dict:
    import gc

    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=model_dir, dtype=args.dtype, max_model_len=2048, enforce_eager=not args.compile, seed=0,
              max_num_seqs=args.requests, limit_mm_per_prompt={"image": 1},
              hf_overrides={"g2tr": g2tr} if g2tr else {}, disable_log_stats=True,
              enable_prefix_caching=False, mm_processor_cache_gb=0)
    start_s = time.perf_counter() - t0
    one = SamplingParams(temperature=0.0, max_tokens=1)
    llm.generate(prompts[:1], one, use_tqdm=False)  # warm-up
    ttft = []
    for p in prompts:
        t = time.perf_counter()
        out = llm.generate([p], one, use_tqdm=False)
        ttft.append(time.perf_counter() - t)
    prompt_tokens = len(out[0].prompt_token_ids)
    t = time.perf_counter()
    outs = llm.generate(prompts, one, use_tqdm=False)
    batch_s = time.perf_counter() - t
    total = sum(len(o.prompt_token_ids) for o in outs)
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return {"engine_start_s": start_s, "ttft_s": statistics.median(ttft), "prompt_tokens": prompt_tokens,
            "prefill_tokens_per_s": total / batch_s, "images_per_s": len(prompts) / batch_s, "batch_s": batch_s}


def time_parts(model_dir: str, vae_dir: str, image, args) -> dict:
    """The VAE encode and g2tr_kernels.reduce alone, on the benchmark's image and shapes."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPImageProcessor

    import g2tr_kernels
    from g2tr_kernels.anchors import anchors_from_vae
    from g2tr_kernels.integrations.vllm import unnormalize

    dtype = getattr(torch, args.dtype)
    proc = CLIPImageProcessor.from_pretrained(model_dir)
    pixels = proc(images=image, return_tensors="pt")["pixel_values"][0]
    img = unnormalize(pixels, proc.image_mean, proc.image_std)
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    grid = (24, 24)

    def vae_call():
        with torch.no_grad():
            return anchors_from_vae(vae, [img], projection="interpolate", pool=args.pool, dim=args.width)

    anchors, agrids = vae_call()
    tokens = torch.randn(576, args.width, generator=torch.Generator().manual_seed(0)).to(dtype)
    anchors = anchors.to(dtype)

    def reduce_call():
        return g2tr_kernels.reduce(tokens, anchors, [grid], agrids, keep_ratio=args.keep_ratio, min_keep=32)

    def median(fn, n=5):
        fn()
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    return {"vae_s": median(vae_call), "reduce_s": median(reduce_call), "anchor_grid": agrids[0]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=2048, help="LLM hidden size (InternVL-U: 2048)")
    parser.add_argument("--layers", type=int, default=4, help="LLM layers")
    parser.add_argument("--vision-layers", type=int, default=2, help="CLIP ViT-L/14-336 layers")
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--keep-ratio", type=float, default=0.5)
    parser.add_argument("--pool", type=int, default=3, help="anchor pool (84 x 84 latent / 3 -> 28 x 28)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--compile", action="store_true", help="vLLM's torch.compile path (default: eager)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    import vllm

    with tempfile.TemporaryDirectory(prefix="g2tr_bench_vllm_") as folder:
        model_dir, vae_dir, tm = build(folder, args)
        images = [tm.make_image(336, 336, s) for s in range(args.requests)]
        prompts = [{"prompt": f"USER: <image> w{s} w7 w9 ASSISTANT:", "multi_modal_data": {"image": img}}
                   for s, img in enumerate(images)]
        g2tr = {"keep_ratio": args.keep_ratio, "min_keep": 32, "pool": args.pool, "vae": vae_dir}
        results = {"stock": run_engine(model_dir, None, prompts, args),
                   "g2tr": run_engine(model_dir, g2tr, prompts, args)}
        parts = time_parts(model_dir, vae_dir, images[0], args)

    s, g = results["stock"], results["g2tr"]
    print(f"vLLM {vllm.__version__} on {cpu_name()}, {args.dtype}, "
          f"{'compiled' if args.compile else 'eager'}; LLaVA layout: CLIP-L/14-336 x {args.vision_layers} layers "
          f"(576 tokens), LLM width {args.width} x {args.layers} layers; {args.requests} requests")
    print(f"{'':24}{'stock':>12}{'G2TR':>12}{'ratio':>10}")
    print(f"{'prompt tokens':24}{s['prompt_tokens']:>12}{g['prompt_tokens']:>12}"
          f"{g['prompt_tokens'] / s['prompt_tokens']:>10.2f}")
    print(f"{'time to first token, s':24}{s['ttft_s']:>12.3f}{g['ttft_s']:>12.3f}{s['ttft_s'] / g['ttft_s']:>9.2f}x")
    print(f"{'prefill tokens/s':24}{s['prefill_tokens_per_s']:>12.1f}{g['prefill_tokens_per_s']:>12.1f}")
    print(f"{'images/s (batch)':24}{s['images_per_s']:>12.2f}{g['images_per_s']:>12.2f}"
          f"{g['images_per_s'] / s['images_per_s']:>9.2f}x")
    print(f"inside the G2TR first token: VAE encode {parts['vae_s'] * 1e3:.1f} ms (anchors {parts['anchor_grid']}), "
          f"g2tr_kernels.reduce {parts['reduce_s'] * 1e3:.2f} ms (576 x {args.width} {args.dtype})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_name(), "args": vars(args), **results, "parts": parts}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
