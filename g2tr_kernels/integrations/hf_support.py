"""Which transformers VLM families apply_g2tr reduces exactly, as data (SPEC.md §6).

One row per transformers ``model_type``. apply_g2tr looks the model up here when it is
called and compares what the model can do (its capabilities, read from its forward
signature and its modules) with what the row handles. A model_type without a row, a
refused row, or a capability the row does not handle raises NotImplementedError at apply
time, naming the model_type and the manual route: a model is reduced exactly or refused,
never run with an input that G2TR left stale.

The README's support table is render_markdown() of this data.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Optional, Tuple

MANUAL_ROUTE = (
    "reduce the image features yourself with g2tr_kernels.reduce and rebuild the prompt with "
    "g2tr_kernels.layout.rebuild_padded (README, 'Hugging Face VLMs')"
)

# Layouts of the image features, as the README names them.
SQUARE = "square grid per image or tile"
IMAGE_SIZES = "non-square grid per image from image_sizes; row-break tokens kept"
MROPE = "grid per image from image_grid_thw; 3-D M-RoPE ids"
ANYRES = "anyres: base tile + unpadded grid with image_newline tokens"
PER_PROMPT = "per-prompt grouping of square tiles"
MROPE_UNCHECKED = "3-D M-RoPE ids; feature layout not checked"
_MROPE_AUDIO = "grid per image from image_grid_thw; M-RoPE ids with audio"


@dataclass(frozen=True)
class Family:
    model_type: str
    layout: str
    grids: Optional[str]  # how apply_g2tr gets each image's (h, w): "square", "image_sizes", "grid_thw"; None: refused
    rebuilt: Tuple[str, ...]  # per-token inputs rebuilt at the kept positions
    handles: FrozenSet[str]  # capabilities (see CAPABILITIES) this row handles
    vision_kwargs: Tuple[str, ...] = ()  # forward arguments passed on to get_image_features
    vision_towers: Optional[Tuple[str, ...]] = None  # accepted vision_config.model_type, None: the family's own
    refused: Optional[str] = None  # why the family is not reduced in one call yet
    notes: str = ""
    # GLM-4V: video frames are placeholders of the IMAGE token (mm_token_type_ids tells them
    # apart), so the image-token runs of a call with videos are not the images' runs.
    videos_use_image_token: bool = False


_BASE = ("attention_mask", "position_ids", "labels")
_LLAVA_KW = ("vision_feature_layer", "vision_feature_select_strategy")
_MROPE_HANDLES = {"get_rope_index", "mm_token_type_ids", "image_grid_thw", "videos"}
_GLM_NOTES = ("as qwen2_vl; its video frames are image-token placeholders, so images and videos in one call are "
              "refused (videos alone run unreduced)")
_UNVERIFIED = ("it computes M-RoPE ids (get_rope_index / rope_deltas) and has not been checked against the "
               "reduction yet")


def _mrope_row(model_type, notes, handles=_MROPE_HANDLES, **kw) -> "Family":
    return _row(model_type, MROPE, "grid_thw", rebuilt=("mm_token_type_ids",), handles=handles,
                vision_kwargs=("image_grid_thw",), notes=notes, **kw)


def _refused_row(model_type, layout, why) -> "Family":
    return _row(model_type, layout, None, refused=why)


def _row(model_type, layout, grids, rebuilt=(), handles=(), **kw) -> Family:
    return Family(model_type, layout, grids, _BASE + tuple(rebuilt), frozenset(handles), **kw)


FAMILIES: Dict[str, Family] = {
    f.model_type: f
    for f in (
        _row("llava", SQUARE, "square", handles={"image_sizes"}, vision_kwargs=_LLAVA_KW,
             vision_towers=("clip_vision_model", "siglip_vision_model"),
             notes="CLIP (strategy 'default': CLS dropped) or SigLIP (strategy 'full') towers"),
        _row("internvl", SQUARE, "square", handles={"image_sizes"}, vision_kwargs=_LLAVA_KW,
             notes="each 448 tile is its own image (one VAE image per tile)"),
        _row("gemma3", SQUARE, "square", rebuilt=("token_type_ids",), handles={"token_type_ids"},
             notes="token_type_ids (bidirectional image blocks) rebuilt"),
        _row("paligemma", SQUARE, "square", rebuilt=("token_type_ids",), handles={"token_type_ids"},
             notes="token_type_ids (prefix-LM mask, loss) rebuilt"),
        _row("mistral3", IMAGE_SIZES, "image_sizes", handles={"image_sizes"},
             vision_kwargs=("image_sizes", "vision_feature_layer"),
             notes="grid = image_sizes // (patch_size * spatial_merge_size); [IMG_BREAK] / [IMG_END] kept"),
        _row("qwen2_vl", MROPE, "grid_thw", rebuilt=("mm_token_type_ids",),
             handles={"get_rope_index", "mm_token_type_ids", "image_grid_thw", "videos"},
             vision_kwargs=("image_grid_thw",),
             notes="M-RoPE ids from the model's get_rope_index on the unreduced prompt, taken at the kept "
                   "positions; rope_deltas set for decoding; videos pass unreduced"),
        _row("qwen2_5_vl", MROPE, "grid_thw", rebuilt=("mm_token_type_ids",),
             handles={"get_rope_index", "mm_token_type_ids", "image_grid_thw", "videos", "second_per_grid_ts"},
             vision_kwargs=("image_grid_thw",), notes="as qwen2_vl"),
        _row("llava_next", ANYRES, "anyres", handles={"image_sizes", "image_newline"},
             vision_kwargs=("image_sizes",) + _LLAVA_KW, vision_towers=("clip_vision_model", "siglip_vision_model"),
             notes="the base tile and the unpadded grid are reduced on their own grids (against the same VAE "
                   "image); image_newline tokens are kept and never merged"),
        _row("llava_onevision", ANYRES, "anyres",
             handles={"image_sizes", "image_newline", "videos", "vision_aspect_ratio", "batch_num_images"},
             vision_kwargs=("image_sizes", "vision_aspect_ratio", "batch_num_images") + _LLAVA_KW,
             vision_towers=("clip_vision_model", "siglip_vision_model"),
             notes="as llava_next (the downsampled grid of anyres_max is a grid too); videos pass unreduced, "
                   "alone or next to images, their tokens kept in place"),
        _row("idefics3", PER_PROMPT, "per_prompt", handles={"pixel_attention_mask"},
             vision_kwargs=("pixel_attention_mask",),
             notes="features come per prompt; each image (tile) is reduced on its own square grid; "
                   "pixel_attention_mask is passed to the vision tower"),
        _row("smolvlm", PER_PROMPT, "per_prompt", handles={"pixel_attention_mask"},
             vision_kwargs=("pixel_attention_mask",), notes="as idefics3"),
        _row("qwen3_vl", MROPE, "grid_thw", rebuilt=("mm_token_type_ids", "deepstack features"),
             handles={"get_rope_index", "mm_token_type_ids", "image_grid_thw", "videos", "deepstack"},
             vision_kwargs=("image_grid_thw",),
             notes="as qwen2_vl; each deepstack layer's features are merged with the tokens' assignment"),
        _row("qwen3_vl_moe", MROPE, "grid_thw", rebuilt=("mm_token_type_ids", "deepstack features"),
             handles={"get_rope_index", "mm_token_type_ids", "image_grid_thw", "videos", "deepstack"},
             vision_kwargs=("image_grid_thw",), notes="as qwen3_vl"),
        # Every other transformers 5.23 family whose model computes M-RoPE ids: served where the
        # model's own get_rope_index on the unreduced prompt, taken at the kept columns, was
        # checked against the prompt reduced by hand (tests/test_hf_mrope.py), refused otherwise.
        _mrope_row("glm4v", "GLM-4.1V; " + _GLM_NOTES, videos_use_image_token=True),
        _mrope_row("glm4v_moe", "GLM-4.5V; as glm4v", videos_use_image_token=True),
        _mrope_row("glm46v", "GLM-4.6V; as glm4v", videos_use_image_token=True),
        _mrope_row("glm_ocr", "as glm4v", videos_use_image_token=True),
        _mrope_row("qwen3_5", "Qwen3.5; as qwen2_vl (its linear-attention layers see the shortened prompt too)"),
        _mrope_row("qwen3_5_moe", "as qwen3_5"),
        _refused_row("hunyuan_vl", "grid per image with an image_newline token per row; 3-D M-RoPE ids",
                     "its vision merger appends an image_newline token to every feature row, so an image's features "
                     "are no plain grid"),
        _refused_row("qwen2_5_omni_thinker", _MROPE_AUDIO, "its M-RoPE ids interleave audio (use_audio_in_video) "
                     "and its forward takes audio inputs G2TR does not rebuild"),
        _refused_row("qwen3_omni_moe_thinker", _MROPE_AUDIO, "as qwen2_5_omni_thinker"),
        _refused_row("minicpmv4_7", "image slices from target_sizes", "its images are slices described by "
                     "target_sizes / downsample_mode, not one image_grid_thw grid"),
        _refused_row("glm_image", "generated VQ image tokens", "an image-generation model: its image tokens are VQ "
                                                               "codes per images_per_sample, not vision-tower features"),
        *(_refused_row(name, MROPE_UNCHECKED, _UNVERIFIED) for name in (
            "ernie4_5_vl_moe", "paddleocr_vl", "hyperclovax_vision_v2", "exaone4_5", "cohere_compass",
            "cosmos3_edge", "cosmos3_omni", "qwen4_exp")),
    )
}

# Forward arguments that carry nothing per image token: a model whose forward takes any
# argument outside these and the capabilities below has an input G2TR would not rebuild.
NEUTRAL_ARGUMENTS = frozenset({
    "self", "input_ids", "pixel_values", "attention_mask", "position_ids", "past_key_values", "inputs_embeds",
    "labels", "use_cache", "logits_to_keep", "mm_encoder_outputs", "kwargs", "args", "return_dict",
    "output_attentions", "output_hidden_states", "cache_position", "output_router_logits",
    "vision_feature_layer", "vision_feature_select_strategy",
})

# Capability name -> forward argument that reveals it (module-level ones are read in capabilities()).
_ARGUMENT_CAPABILITIES = {
    "token_type_ids": "token_type_ids",
    "mm_token_type_ids": "mm_token_type_ids",
    "image_sizes": "image_sizes",
    "image_grid_thw": "image_grid_thw",
    "videos": "pixel_values_videos",
    "video_grid_thw": "video_grid_thw",
    "second_per_grid_ts": "second_per_grid_ts",
    "pixel_attention_mask": "pixel_attention_mask",
    "vision_aspect_ratio": "vision_aspect_ratio",
    "batch_num_images": "batch_num_images",
    "videos_sizes": "image_sizes_videos",
}

CAPABILITIES = {
    "get_rope_index": "computes multimodal RoPE ids from the image grid (get_rope_index)",
    "image_newline": "inserts learned image_newline tokens between feature rows",
    "deepstack": "injects deepstack visual features into the language model at the image positions",
    "token_type_ids": "takes per-token token_type_ids",
    "mm_token_type_ids": "takes per-token mm_token_type_ids",
    "image_sizes": "takes image_sizes",
    "image_grid_thw": "takes image_grid_thw",
    "videos": "takes videos (pixel_values_videos)",
    "video_grid_thw": "takes video_grid_thw",
    "second_per_grid_ts": "takes second_per_grid_ts",
    "pixel_attention_mask": "takes pixel_attention_mask",
    "vision_aspect_ratio": "takes vision_aspect_ratio",
    "batch_num_images": "takes batch_num_images",
}


def _inner(model):
    return getattr(model, "model", None)


def capabilities(model) -> Tuple[FrozenSet[str], Tuple[str, ...]]:
    """(capabilities, unknown forward arguments) of a transformers VLM instance."""
    params = list(inspect.signature(model.forward).parameters)
    caps = {cap for cap, arg in _ARGUMENT_CAPABILITIES.items() if arg in params}
    for goes_with_videos in ("video_grid_thw", "videos_sizes"):
        if goes_with_videos in caps:
            caps.discard(goes_with_videos)
            caps.add("videos")
    known = NEUTRAL_ARGUMENTS | set(_ARGUMENT_CAPABILITIES.values())
    unknown = tuple(p for p in params if p not in known)
    holders = [m for m in (model, _inner(model)) if m is not None]
    if any(callable(getattr(m, "get_rope_index", None)) for m in holders):
        caps.add("get_rope_index")
    if any("image_newline" in name for name, _ in model.named_parameters()):
        caps.add("image_newline")
    vision = getattr(model.config, "vision_config", None)
    if getattr(vision, "deepstack_visual_indexes", None):
        caps.add("deepstack")
    return frozenset(caps), unknown


def resolve(model) -> Family:
    """The family row of `model`, or NotImplementedError naming its model_type and the manual route."""
    model_type = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__

    def refuse(why: str):
        raise NotImplementedError(f"g2tr.hf: {model_type} is not supported by apply_g2tr: {why}; {MANUAL_ROUTE}")

    family = FAMILIES.get(model_type)
    if family is None:
        refuse("its model_type has no row in the support table (g2tr_kernels.integrations.hf_support)")
    if family.refused:
        refuse(family.refused)
    caps, unknown = capabilities(model)
    if unknown:
        refuse(f"its forward takes {', '.join(unknown)}, which G2TR does not know how to rebuild")
    missing = sorted(caps - family.handles)
    if missing:
        refuse("the model " + "; ".join(CAPABILITIES[c] for c in missing) + ", which its row does not handle")
    if family.vision_towers is not None:
        tower = getattr(getattr(model.config, "vision_config", None), "model_type", None)
        if tower not in family.vision_towers:
            refuse(f"its vision tower {tower!r} is not one of {', '.join(family.vision_towers)}")
    check = _CHECKS.get(model_type)
    if check is not None:
        why = check(model)
        if why:
            refuse(why)
    return family


def _llava_check(model) -> Optional[str]:
    strategy = getattr(model.config, "vision_feature_select_strategy", "default")
    tower = getattr(getattr(model.config, "vision_config", None), "model_type", None)
    has_cls = tower in ("clip_vision_model", "internvl_vision")
    if has_cls and strategy != "default":
        return f"vision_feature_select_strategy {strategy!r} keeps the CLS token of {tower}: the tokens are no grid"
    if not has_cls and strategy == "default":
        return f"vision_feature_select_strategy 'default' drops a patch token of {tower} (it has no CLS token)"
    return None


# Which feature strategies leave a grid of patch tokens (CLS dropped, no patch dropped).
_CHECKS: Dict[str, Callable] = {name: _llava_check for name in ("llava", "internvl", "llava_next", "llava_onevision")}


def render_markdown() -> str:
    """The README support table."""
    lines = [
        "| model_type | image features | rebuilt per-token inputs | status |",
        "|---|---|---|---|",
    ]
    for f in FAMILIES.values():
        if f.refused:
            status = f"refused at apply time: {f.refused}"
        else:
            status = "one call" + (f"; {f.notes}" if f.notes else "")
        lines.append(f"| `{f.model_type}` | {f.layout} | {', '.join(f.rebuilt) if not f.refused else '-'} | {status} |")
    lines.append("| any other | - | - | refused at apply time (NotImplementedError naming the model_type) |")
    return "\n".join(lines)


__all__ = ["CAPABILITIES", "FAMILIES", "Family", "MANUAL_ROUTE", "capabilities", "render_markdown", "resolve"]
