"""G2TR inside a Hugging Face transformers VLM, in one call.

    from g2tr_kernels.integrations.hf import apply_g2tr
    handle = apply_g2tr(model, vae=vae, keep_ratio=0.5)      # model: InternVL / LLaVA ...ForConditionalGeneration
    out = model(**inputs, vae_pixel_values=images)            # images for the VAE, [-1, 1]
    ids = model.generate(**inputs, vae_pixel_values=images, max_new_tokens=64)
    handle.remove()                                           # back to the plain model

What happens on a call that carries pixel_values (the prefill):
  1. the model's own get_image_features runs (vision tower + projector): N tokens per image;
  2. the VAE encodes the images -> anchors (g2tr_kernels.anchors, projection "interpolate"
     to the LLM width by default, or a module such as BAGEL's vae2llm);
  3. g2tr_kernels.reduce keeps K of N tokens per image and merges the rest into them;
  4. input_ids / attention_mask / position_ids / labels are rebuilt (g2tr_kernels.layout):
     every run of N image-context tokens becomes K;
  5. the unmodified model runs on the shorter prompt with the reduced features passed as
     mm_encoder_outputs, so the language model (and its KV cache) sees K tokens per image.
Calls without pixel_values (decode steps, text only) pass through untouched.

Where the VAE images come from, in order: the vae_pixel_values= argument of forward /
generate; handle.images(...) used as a context manager; else the pixel_values the VLM got,
mapped back to [-1, 1] with the image_mean / image_std given to apply_g2tr (without them,
a ValueError: the VLM's normalised pixels are not VAE input). One VAE image per vision-tower image (per tile for InternVL).

generate() returns the ORIGINAL prompt followed by the new tokens (so slicing
output[:, input_ids.shape[1]:] still gives the answer); restore_prompt=False returns the
reduced prompt instead. forward() returns logits over the reduced sequence; handle.last
holds the reduction (reduce output, grids, layout with the column map) of the last call.

Models whose forward accepts mm_encoder_outputs and that expose get_image_features with
one square grid of tokens per image work (InternVL, LLaVA); pass grids= for other
shapes. Models with multimodal RoPE ids (Qwen2-VL family) are refused: their position ids
are computed from the unreduced token grid inside the model.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import ops
from ..anchors import Projection, anchors_from_vae
from ..layout import PaddedLayout, rebuild_padded

_MROPE_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen2_5_omni", "glm4v", "glm4v_moe")
_VISION_KWARGS = ("vision_feature_layer", "vision_feature_select_strategy", "image_sizes")

GridFn = Callable[[List[int]], Sequence[Tuple[int, int]]]


def square_grids(lengths: List[int]) -> List[Tuple[int, int]]:
    """The ViT grid of each image when its tokens form a square (InternVL tiles, LLaVA)."""
    grids = []
    for b, n in enumerate(lengths):
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(
                f"g2tr.hf: image {b} has {n} tokens, not a square grid; pass grids=callable(lengths) -> [(h, w), ...] "
                "to apply_g2tr (a CLS token left in the features also causes this)"
            )
        grids.append((side, side))
    return grids


@dataclass
class Reduction:
    """What the last reducing call did (for inspection and visualisation)."""

    output: ops.ReduceOutput
    grids: List[Tuple[int, int]]
    anchor_grids: List[Tuple[int, int]]
    layout: PaddedLayout
    lengths: List[int]  # N per image
    kept: List[int]  # K per image


@dataclass
class G2TRHandle:
    model: Any
    vae: Any
    keep_ratio: float = 0.5
    min_keep: int = 32
    merge_weight: float = 1.0
    projection: Projection = "interpolate"
    patch: int = 1
    pool: int = 1
    image_mean: Optional[Sequence[float]] = None
    image_std: Optional[Sequence[float]] = None
    sample: str = "mode"
    scale_latents: bool = True
    grids: Optional[GridFn] = None
    backend: str = "auto"
    restore_prompt: bool = True
    last: Optional[Reduction] = None
    _pending: List[Any] = field(default_factory=list)
    _originals: Dict[str, Any] = field(default_factory=dict)

    # -- configuration read from the model ------------------------------------------------
    @property
    def image_token_id(self) -> int:
        config = self.model.config
        token = getattr(config, "image_token_id", None)
        if token is None:
            token = getattr(config, "image_token_index", None)
        if token is None:
            raise ValueError("g2tr.hf: the model config has no image_token_id / image_token_index")
        return int(token)

    @property
    def pad_token_id(self) -> int:
        for source in (getattr(self.model, "generation_config", None), self.model.config, _text_config(self.model)):
            value = getattr(source, "pad_token_id", None) if source is not None else None
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if value is not None:
                return int(value)
        return 0

    @property
    def hidden_size(self) -> int:
        return int(_text_config(self.model).hidden_size)

    # -- public ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def images(self, vae_pixel_values):
        """Give the VAE images to calls that cannot take an extra argument (pipelines)."""
        self._pending.append(vae_pixel_values)
        try:
            yield self
        finally:
            self._pending.pop()

    def remove(self) -> None:
        """Undo apply_g2tr: the model's own forward and generate come back."""
        for name in ("forward", "generate"):
            if name in self._originals:
                if self._originals[name] is None:
                    self.model.__dict__.pop(name, None)
                else:
                    self.model.__dict__[name] = self._originals[name]
        self._originals.clear()
        if getattr(self.model, "_g2tr_handle", None) is self:
            del self.model._g2tr_handle

    def reduce_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        vae_pixel_values=None,
        padding_side: str = "right",
        **vision_kwargs,
    ) -> Dict[str, Any]:
        """Runs steps 1-4; returns the keyword arguments for the unmodified forward/generate."""
        if input_ids is None:
            raise NotImplementedError("g2tr.hf: reducing needs input_ids (to find the image tokens), not inputs_embeds")
        vision_kwargs = {k: v for k, v in vision_kwargs.items() if v is not None}
        encoded = self.model.get_image_features(pixel_values=pixel_values, return_dict=True, **vision_kwargs)
        features, lengths, as_tensor = _pack(encoded.pooler_output)
        grids = list(self.grids(lengths) if self.grids is not None else square_grids(lengths))
        if [h * w for h, w in grids] != lengths:
            raise ValueError(f"g2tr.hf: grids {grids} do not match the tokens per image {lengths}")

        images = self._vae_images(vae_pixel_values, pixel_values)
        n_images = images.shape[0] if isinstance(images, torch.Tensor) else len(images)
        if n_images != len(lengths):
            raise ValueError(
                f"g2tr.hf: {n_images} VAE images for {len(lengths)} vision-tower images; give one per image (tile)"
            )
        anchors, anchor_grids = anchors_from_vae(
            self.vae, images, projection=self.projection, patch=self.patch, pool=self.pool, dim=self.hidden_size,
            sample=self.sample, scale=self.scale_latents,
        )
        anchors = anchors.to(device=features.device, dtype=features.dtype)
        out = ops.reduce(
            features, anchors, grids, anchor_grids, keep_ratio=self.keep_ratio, min_keep=self.min_keep,
            merge_weight=self.merge_weight, backend=self.backend,
        )
        kept = ops.budgets(lengths, self.keep_ratio, self.min_keep)  # host ints: no sync

        past_mask = None
        if attention_mask is not None and attention_mask.shape[-1] > input_ids.shape[-1]:
            # A prefill after cached turns: the mask also covers the cache, which is not rebuilt.
            past_mask = attention_mask[:, : -input_ids.shape[-1]]
            attention_mask = attention_mask[:, -input_ids.shape[-1] :]
        layout = rebuild_padded(
            input_ids, out.keep_idx, self.image_token_id, attention_mask=attention_mask, position_ids=position_ids,
            labels=labels, pad_token_id=self.pad_token_id, padding_side=padding_side,
        )
        self.last = Reduction(out, grids, anchor_grids, layout, lengths, kept)

        encoded.pooler_output = _unpack(out.merged, kept, as_tensor)
        new_mask = layout.attention_mask
        if past_mask is not None:
            new_mask = torch.cat([past_mask, new_mask.to(past_mask.dtype)], dim=-1)
        result = {"input_ids": layout.input_ids, "attention_mask": new_mask, "mm_encoder_outputs": {"image": encoded}}
        if position_ids is not None:
            result["position_ids"] = layout.position_ids
        if labels is not None:
            result["labels"] = layout.labels
        return result

    # -- internals ------------------------------------------------------------------------
    def _vae_images(self, vae_pixel_values, pixel_values):
        if vae_pixel_values is None and self._pending:
            vae_pixel_values = self._pending[-1]
        if vae_pixel_values is not None:
            return vae_pixel_values
        if self.image_mean is None or self.image_std is None:
            # The VLM's pixels are normalised for its vision tower, not in the VAE's [-1, 1]:
            # feeding them as they are would give wrong anchors without a word.
            raise ValueError(
                "g2tr.hf: no images for the VAE: pass vae_pixel_values= (or use handle.images(...)), or give "
                "apply_g2tr(..., image_mean=..., image_std=...) so the VLM's pixel_values can be mapped back"
            )
        images = pixel_values.float()
        mean = torch.as_tensor(self.image_mean, dtype=images.dtype, device=images.device).reshape(1, -1, 1, 1)
        std = torch.as_tensor(self.image_std, dtype=images.dtype, device=images.device).reshape(1, -1, 1, 1)
        return (images * std + mean) * 2.0 - 1.0  # processor space -> [0, 1] -> the VAE's [-1, 1]

    def _forward(self, original, signature, *args, **kwargs):
        vae_pixel_values = kwargs.pop("vae_pixel_values", None)
        arguments = signature.bind_partial(*args, **kwargs).arguments
        extra = arguments.pop("kwargs", {})
        arguments.update(extra)
        if arguments.get("pixel_values") is None:
            return original(**arguments)
        if arguments.get("mm_encoder_outputs") is not None:
            raise ValueError("g2tr.hf: pass pixel_values or mm_encoder_outputs, not both")
        mask = arguments.pop("attention_mask", None)
        reduced = self.reduce_inputs(
            input_ids=arguments.pop("input_ids", None),
            pixel_values=arguments.pop("pixel_values"),
            attention_mask=mask,
            position_ids=arguments.pop("position_ids", None),
            labels=arguments.pop("labels", None),
            vae_pixel_values=vae_pixel_values,
            padding_side=_padding_side(mask),
            **{k: arguments.get(k) for k in _VISION_KWARGS},
        )
        arguments.update(reduced)
        return original(**arguments)

    def _generate(self, original, *args, **kwargs):
        vae_pixel_values = kwargs.pop("vae_pixel_values", None)
        if args:
            input_ids, args = args[0], args[1:]
        else:
            input_ids = kwargs.pop("input_ids", None)
            if input_ids is None:
                input_ids = kwargs.pop("inputs", None)
        if kwargs.get("pixel_values") is None or input_ids is None:
            return original(*args, **kwargs) if input_ids is None else original(input_ids, *args, **kwargs)
        mask = kwargs.pop("attention_mask", None)
        reduced = self.reduce_inputs(
            input_ids=input_ids,
            pixel_values=kwargs.pop("pixel_values"),
            attention_mask=mask,
            vae_pixel_values=vae_pixel_values,
            # Batched generation appends on the right, so new padding goes on the left.
            padding_side="left",
            **{k: kwargs.get(k) for k in _VISION_KWARGS},
        )
        reduced_ids = reduced.pop("input_ids")
        # generate's first parameter takes the ids, so positional arguments after it still line up.
        out = original(reduced_ids, *args, **reduced, **kwargs)
        if not self.restore_prompt:
            return out
        return _restore_prompt(out, input_ids, reduced_ids.shape[-1])


def apply_g2tr(
    model,
    vae,
    keep_ratio: float = 0.5,
    min_keep: int = 32,
    merge_weight: float = 1.0,
    projection: Projection = "interpolate",
    patch: int = 1,
    pool: int = 1,
    image_mean: Optional[Sequence[float]] = None,
    image_std: Optional[Sequence[float]] = None,
    sample: str = "mode",
    scale_latents: bool = True,
    grids: Optional[GridFn] = None,
    backend: str = "auto",
    restore_prompt: bool = True,
) -> G2TRHandle:
    """Make `model` (a transformers VLM ...ForConditionalGeneration) reduce its image tokens with G2TR.

    vae: a diffusers AutoencoderKL (or anything with encode(x) -> .latent_dist / tensor).
    keep_ratio, min_keep, merge_weight: as g2tr_kernels.reduce. projection / patch / pool:
    the anchor recipe of g2tr_kernels.anchors (InternVL-U: "interpolate", 1, 1; BAGEL:
    its vae2llm Linear, 2, 2). image_mean / image_std: the VLM processor's normalisation,
    used to hand the VLM's pixel_values to the VAE when no vae_pixel_values are given.
    grids: callable(tokens per image) -> [(h, w), ...] when the grids are not square.
    Patches model.forward and model.generate on this instance; returns a handle (.remove()).
    """
    model_type = getattr(model.config, "model_type", "")
    if model_type in _MROPE_MODEL_TYPES:
        raise NotImplementedError(
            f"g2tr.hf: {model_type} computes multimodal RoPE ids from the unreduced token grid inside the model; "
            "reduce its features with g2tr_kernels.reduce and rebuild position ids with g2tr_kernels.layout instead"
        )
    if not callable(getattr(model, "get_image_features", None)):
        raise TypeError(
            f"g2tr.hf: {type(model).__name__} has no get_image_features(); pass the ...ForConditionalGeneration model"
        )
    if "mm_encoder_outputs" not in inspect.signature(model.forward).parameters:
        raise TypeError(
            f"g2tr.hf: {type(model).__name__}.forward does not take mm_encoder_outputs (transformers >= 5 VLMs do)"
        )
    if getattr(model, "_g2tr_handle", None) is not None:
        raise RuntimeError("g2tr.hf: G2TR is already applied to this model; call handle.remove() first")
    ops.budgets([1], keep_ratio, min_keep)  # validates keep_ratio / min_keep now, not at the first call

    handle = G2TRHandle(
        model=model, vae=vae, keep_ratio=keep_ratio, min_keep=min_keep, merge_weight=merge_weight,
        projection=projection, patch=patch, pool=pool, image_mean=image_mean, image_std=image_std, sample=sample,
        scale_latents=scale_latents, grids=grids, backend=backend, restore_prompt=restore_prompt,
    )
    _ = handle.image_token_id  # fails now, not at the first call, on configs without an image token

    original_forward = model.forward
    signature = inspect.signature(original_forward)

    @functools.wraps(original_forward)
    def forward(*args, **kwargs):
        return handle._forward(original_forward, signature, *args, **kwargs)

    patches = [("forward", forward)]
    original_generate = getattr(model, "generate", None)
    if callable(original_generate):  # the bare ...Model classes have no generate

        @functools.wraps(original_generate)
        def generate(*args, **kwargs):
            return handle._generate(original_generate, *args, **kwargs)

        patches.append(("generate", generate))

    # Instance attributes shadow the class methods; nn.Module.__call__ and generate() look
    # forward up on the instance, and functools.wraps keeps the signature generate inspects.
    for name, fn in patches:
        handle._originals[name] = model.__dict__.get(name)
        model.__dict__[name] = fn
    model._g2tr_handle = handle
    return handle


def _text_config(model):
    config = model.config
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else getattr(config, "text_config", config)


def _pack(features) -> Tuple[torch.Tensor, List[int], bool]:
    """Image features as one packed [sum N_i, D] tensor, the N_i, and whether they came batched."""
    if isinstance(features, torch.Tensor):
        if features.dim() != 3:
            raise ValueError(f"g2tr.hf: expected image features [images, N, D], got shape {list(features.shape)}")
        return features.reshape(-1, features.shape[-1]), [features.shape[1]] * features.shape[0], True
    features = list(features)
    return torch.cat(features), [f.shape[0] for f in features], False


def _unpack(merged: torch.Tensor, kept: List[int], as_tensor: bool):
    if as_tensor and len(set(kept)) <= 1:
        return merged.reshape(len(kept), kept[0] if kept else 0, merged.shape[-1])
    return list(torch.split(merged, kept))


def _padding_side(attention_mask) -> str:
    """Left if some row starts with padding while every row ends with a real token."""
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape[-1] == 0:
        return "right"
    if bool((attention_mask[:, -1] != 0).all()) and bool((attention_mask[:, 0] == 0).any()):
        return "left"
    return "right"


def _restore_prompt(out, input_ids: torch.Tensor, reduced_length: int):
    sequences = out if isinstance(out, torch.Tensor) else getattr(out, "sequences", None)
    if sequences is None:
        return out
    repeat = sequences.shape[0] // input_ids.shape[0]
    prompt = input_ids.to(sequences.device)
    if repeat > 1:
        prompt = prompt.repeat_interleave(repeat, dim=0)
    restored = torch.cat([prompt, sequences[:, reduced_length:]], dim=-1)
    if isinstance(out, torch.Tensor):
        return restored
    out.sequences = restored
    return out


__all__ = ["G2TRHandle", "Reduction", "apply_g2tr", "square_grids"]
