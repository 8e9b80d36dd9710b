"""Tiny random checkpoints that vLLM can serve, built offline: LLaVA, Qwen2.5-VL and a VAE.

Weights come from a seeded torch generator; tokenizers are word-level vocabularies saved as
tokenizer.json (the `tokenizers` package, no download). The reference half of each test
(plain transformers + g2tr_kernels on the reduced prompt) lives here too, so the vLLM tests
and benchmarks/bench_vllm.py compare against one implementation.
"""
from __future__ import annotations

import os
from typing import Dict, List, Sequence

import torch

WORDS = [f"w{i}" for i in range(120)]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}: "
    "{% if m['content'] is string %}{{ m['content'] }} {% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }} {% else %}{{ image_placeholder }} {% endif %}"
    "{% endfor %}{% endif %}{% endfor %}ASSISTANT:"
)


def _tokenizer(folder: str, specials: Sequence[str], template_placeholder: str):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<pad>", *specials, "USER:", "ASSISTANT:", *WORDS]
    vocab = {tok: i for i, tok in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=list(specials),
    )
    fast.chat_template = CHAT_TEMPLATE.replace("{{ image_placeholder }}", template_placeholder)
    fast.save_pretrained(folder)
    return fast


def _seeded(seed: int):
    torch.manual_seed(seed)


def _fix_vision_prefix(folder: str, old: str, new: str) -> None:
    """transformers 5.19 saves LLaVA's CLIP tower as <old>.* where vLLM 0.32 loads <new>.*."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(folder, "model.safetensors")
    state = load_file(path)
    if any(k.startswith(new) for k in state):
        return
    fixed = {(new + k[len(old):] if k.startswith(old) else k): v for k, v in state.items()}
    save_file(fixed, path, metadata={"format": "pt"})


def build_llava(folder: str, image_size: int = 64, patch_size: int = 8, seed: int = 0, *, vision=None, text=None,
                dtype=torch.float32, widen: bool = True) -> str:
    """A LLaVA-1.5 layout: CLIP tower (2 layers) + 2-layer MLP projector + 2-layer Llama.

    vision / text: CLIPVisionConfig / LlamaConfig arguments that replace the tiny sizes
    (benchmarks/serve_vllm.py builds realistic widths so); widen=False keeps the random init."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    os.makedirs(folder, exist_ok=True)
    tok = _tokenizer(folder, ["<image>"], "<image>")
    vision = CLIPVisionConfig(**{
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "projection_dim": 32, **(vision or {}), "image_size": image_size, "patch_size": patch_size,
    })
    text = LlamaConfig(**{
        "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2, "max_position_embeddings": 512, **(text or {}), "vocab_size": len(tok),
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "tie_word_embeddings": False,
    })
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    _seeded(seed)
    model = LlavaForConditionalGeneration(config).eval()
    if widen:
        _widen(model, seed)
    model.to(dtype).save_pretrained(folder, safe_serialization=True)
    _fix_vision_prefix(folder, "vision_tower.", "vision_tower.vision_model.")
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        ),
        tokenizer=tok, patch_size=patch_size, vision_feature_select_strategy="default",
        chat_template=tok.chat_template, num_additional_image_tokens=1,
    )
    processor.save_pretrained(folder)
    return folder


def build_qwen2_5_vl(folder: str, min_pixels: int = 112 * 112, max_pixels: int = 224 * 224, seed: int = 0) -> str:
    """Qwen2.5-VL: a 2-block windowed ViT (patch 14, merge 2) + 2-layer Qwen2 with M-RoPE."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    os.makedirs(folder, exist_ok=True)
    specials = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = _tokenizer(folder, specials, "<|vision_start|><|image_pad|><|vision_end|>")
    ids = {s: tok.convert_tokens_to_ids(s) for s in specials}
    text = dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=len(tok), max_position_embeddings=1024, rope_theta=10000.0,
        rope_scaling={"type": "mrope", "mrope_section": [16, 8, 8], "rope_type": "default"},
        bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False,
    )
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=128, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1], in_chans=3,
        tokens_per_second=2,
    )
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    _seeded(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    _widen(model, seed)
    model.save_pretrained(folder, safe_serialization=True)
    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14,
                                            merge_size=2, temporal_patch_size=2)
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok, chat_template=tok.chat_template,
                                    video_processor=Qwen2VLVideoProcessor())
    processor.save_pretrained(folder)
    return folder


def _widen(model, seed: int) -> None:
    """Random init gives near-flat logits (ties across implementations); spread them out."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1]) ** 0.5)


def build_vae(folder: str, seed: int = 0) -> str:
    """A tiny diffusers AutoencoderKL: 3 blocks (2 downsamplings: latents at 1/4 of the image), 4 channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 16), latent_channels=4,
        layers_per_block=1, norm_num_groups=4, sample_size=64,
    )
    vae.save_pretrained(folder)
    return folder


def make_image(width: int, height: int, seed: int = 0):
    """A deterministic RGB PIL image with structure (so anchors and tokens vary over it)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    base = torch.stack([x, y, (x * y) ** 0.5])
    noise = torch.rand(3, height, width, generator=g) * 0.35
    arr = ((base * 0.65 + noise).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr, "RGB")


# -- the reference: plain transformers + g2tr_kernels on the reduced prompt ------------------

def _greedy(model, embeds: torch.Tensor, steps: int, position_ids_fn=None):
    """Greedy decoding from prompt embeddings [1, L, D] with a KV cache; position_ids_fn(step,
    length) -> the position ids of the step's tokens (None: the model's default). Returns the
    tokens and the log-probability of each."""
    out: List[int] = []
    logprobs: List[float] = []
    past = None
    x = embeds
    length = embeds.shape[1]
    for step in range(steps):
        kwargs = {}
        if position_ids_fn is not None:
            kwargs["position_ids"] = position_ids_fn(step, length)
        res = model(inputs_embeds=x, past_key_values=past, use_cache=True, **kwargs)
        past = res.past_key_values
        logits = res.logits[0, -1].float()
        nxt = int(logits.argmax())
        out.append(nxt)
        logprobs.append(float(torch.log_softmax(logits, dim=-1)[nxt]))
        x = model.get_input_embeddings()(torch.tensor([[nxt]]))
        length += 1
    return out, logprobs


def llava_reference(folder: str, vae_folder: str, prompt: str, image, keep_ratio: float, min_keep: int,
                    steps: int, pool="auto") -> Dict[str, object]:
    """LLaVA in transformers (fp32): features -> VAE anchors -> g2tr_kernels.reduce -> the prompt with
    K image tokens, the merged rows in their place -> greedy tokens."""
    from diffusers import AutoencoderKL
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    import g2tr_kernels
    from g2tr_kernels.anchors import anchors_from_vae
    from g2tr_kernels.integrations.vllm import unnormalize

    processor = AutoProcessor.from_pretrained(folder)
    model = LlavaForConditionalGeneration.from_pretrained(folder, torch_dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(vae_folder, torch_dtype=torch.float32).eval()
    inputs = processor(text=prompt, images=image, return_tensors="pt")
    ids = inputs["input_ids"][0]
    image_id = model.config.image_token_index
    with torch.no_grad():
        feats = model.get_image_features(
            pixel_values=inputs["pixel_values"], vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        )
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        feats = feats[0] if isinstance(feats, (list, tuple)) else feats
        feats = feats.reshape(-1, feats.shape[-1])
        n = feats.shape[0]
        side = int(round(n ** 0.5))
        ip = processor.image_processor
        img = unnormalize(inputs["pixel_values"][0], ip.image_mean, ip.image_std)
        kwargs = {"vit_grids": [(side, side)]} if pool == "auto" else {}
        anchors, agrids = anchors_from_vae(vae, [img], projection="interpolate", pool=pool,
                                           dim=model.config.text_config.hidden_size, **kwargs)
        out = g2tr_kernels.reduce(feats, anchors.to(feats.dtype), [(side, side)], agrids, keep_ratio=keep_ratio,
                                  min_keep=min_keep)
        k = g2tr_kernels.budgets([n], keep_ratio, min_keep)[0]
        pos = (ids == image_id).nonzero()[:, 0]
        assert pos.numel() == n, (pos.numel(), n)
        start = int(pos[0])
        reduced = torch.cat([ids[:start], torch.full((k,), image_id), ids[start + n:]])
        embeds = model.get_input_embeddings()(reduced[None]).clone()
        embeds[0, start:start + k] = out.merged
        tokens, logprobs = _greedy(model, embeds, steps)
    return {"tokens": tokens, "logprobs": logprobs, "prompt_len": int(reduced.numel()), "n": n, "k": k,
            "text_len": int(ids.numel()) - n}


def qwen_reference(folder: str, vae_folder: str, prompt: str, image, keep_ratio: float, min_keep: int,
                   steps: int, pool="auto") -> Dict[str, object]:
    """Qwen2.5-VL in transformers (fp32) on the reduced prompt: kept tokens at their unreduced
    M-RoPE positions, text at its unreduced positions (SPEC §5: ids taken at the kept positions).
    image: one PIL image or a list (one per image placeholder, in order)."""
    from diffusers import AutoencoderKL
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    import g2tr_kernels
    from g2tr_kernels.anchors import anchors_from_vae
    from g2tr_kernels.integrations.vllm import qwen_patches_to_images, unnormalize

    images = list(image) if isinstance(image, (list, tuple)) else [image]
    processor = AutoProcessor.from_pretrained(folder)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, torch_dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(vae_folder, torch_dtype=torch.float32).eval()
    inputs = processor(text=[prompt], images=images, return_tensors="pt")
    ids = inputs["input_ids"][0]
    cfg = model.config
    vc = cfg.vision_config
    m = vc.spatial_merge_size
    grid_thw = inputs["image_grid_thw"]
    grids = [(h // m, w // m) for _, h, w in grid_thw.tolist()]
    lengths = [h * w for h, w in grids]
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=inputs["pixel_values"], image_grid_thw=grid_thw)
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats
        assert feats.shape[0] == sum(lengths)
        # The unreduced M-RoPE positions, from transformers itself.
        types = inputs.get("mm_token_type_ids")
        if types is None:
            types = (inputs["input_ids"] == cfg.image_token_id).int()
        position_ids, _ = model.model.get_rope_index(ids[None], types, image_grid_thw=grid_thw,
                                                     attention_mask=torch.ones_like(ids[None]))
        position_ids = position_ids[:, 0]  # [3, L]
        ip = processor.image_processor
        frames = qwen_patches_to_images(inputs["pixel_values"].float(), grid_thw, vc.patch_size,
                                        vc.temporal_patch_size, m)
        vae_images = [unnormalize(f, ip.image_mean, ip.image_std) for f in frames]
        anchors, agrids = anchors_from_vae(vae, vae_images, projection="interpolate", pool=pool,
                                           dim=cfg.text_config.hidden_size, vit_grids=grids)
        out = g2tr_kernels.reduce(feats, anchors.to(feats.dtype), grids, agrids, keep_ratio=keep_ratio,
                                  min_keep=min_keep)
        kept = g2tr_kernels.budgets(lengths, keep_ratio, min_keep)
        is_image = (ids == cfg.image_token_id).tolist()
        starts = [i for i, v in enumerate(is_image) if v and (i == 0 or not is_image[i - 1])]
        assert len(starts) == len(grids)
        keep, offset, cursor = [], 0, 0
        cu = out.cu_seqlens.tolist()
        for b, (start, n) in enumerate(zip(starts, lengths)):
            keep.append(torch.arange(cursor, start))
            keep.append(start + out.keep_idx[cu[b]:cu[b + 1]] - offset)
            offset += n
            cursor = start + n
        keep.append(torch.arange(cursor, ids.numel()))
        keep = torch.cat(keep)
        reduced = ids[keep]
        kept_pos = position_ids[:, keep]  # [3, L']
        embeds = model.get_input_embeddings()(reduced[None]).clone()
        embeds[0, reduced == cfg.image_token_id] = out.merged
        next_pos = int(kept_pos.max()) + 1

        def positions(step: int, length: int):
            if step == 0:
                return kept_pos[:, None, :]
            return torch.full((3, 1, 1), next_pos + step - 1)

        tokens, logprobs = _greedy(model, embeds, steps, positions)
    return {"tokens": tokens, "logprobs": logprobs, "prompt_len": int(reduced.numel()), "n": sum(lengths),
            "k": sum(kept), "text_len": int(ids.numel()) - sum(lengths), "grid": grids[0], "grids": grids}

def run_engine(model: str, prompts, g2tr=None, max_tokens: int = 8, **kwargs):
    """Start one vLLM engine, greedy-decode every prompt, shut it down; returns
    [(prompt_token_ids, output_token_ids, their logprobs)] in prompt order."""
    import gc

    from vllm import LLM, SamplingParams

    overrides = {"g2tr": g2tr} if g2tr is not None else {}
    llm = LLM(
        model=model, dtype="float32", max_model_len=512, enforce_eager=True, seed=0, max_num_seqs=4,
        limit_mm_per_prompt={"image": 2}, hf_overrides=overrides, disable_log_stats=True, **kwargs,
    )
    try:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [
            (list(o.prompt_token_ids), list(o.outputs[0].token_ids),
             [step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
            for o in outs
        ]
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def engine_runs(model: str, prompts_fn, g2tr: dict, steps: int) -> dict:
    """The three engines each model's tests compare: G2TR as given, G2TR at keep 1.0, no key."""
    return {
        "g2tr": run_engine(model, prompts_fn(), g2tr=g2tr, max_tokens=steps),
        "keep1": run_engine(model, prompts_fn(), g2tr={**g2tr, "keep_ratio": 1.0}, max_tokens=steps),
        "stock": run_engine(model, prompts_fn(), g2tr=None, max_tokens=steps),
    }


LOGPROB_TOL = 1e-4  # fp32, vLLM's CPU kernels against transformers


def check_greedy_equals_reference(runs, references, keep: float) -> None:
    """G2TR in vLLM gives transformers' greedy tokens and per-step log-probabilities on the reduced prompt."""
    import pytest

    for b, ((_, tokens, logprobs), ref) in enumerate(zip(runs["g2tr"], references[keep])):
        where = f"prompt {b} (grid {ref.get('grid')})"
        assert tokens == ref["tokens"], where
        assert logprobs == pytest.approx(ref["logprobs"], abs=LOGPROB_TOL), where


def check_stock_is_the_unreduced_model(runs, references) -> None:
    """No "g2tr" key: N placeholders per image and the tokens of the unreduced model."""
    import pytest

    for (prompt_ids, tokens, logprobs), ref in zip(runs["stock"], references[1.0]):
        assert len(prompt_ids) == ref["n"] + ref["text_len"]
        assert tokens == ref["tokens"]
        assert logprobs == pytest.approx(ref["logprobs"], abs=LOGPROB_TOL)


__all__ = [
    "build_llava", "build_qwen2_5_vl", "build_vae", "llava_reference", "make_image", "qwen_reference", "run_engine",
    "engine_runs", "check_greedy_equals_reference", "check_stock_is_the_unreduced_model", "LOGPROB_TOL",
]

