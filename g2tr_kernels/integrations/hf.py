"""G2TR inside a Hugging Face transformers VLM, in one call.

    from g2tr_kernels.integrations.hf import apply_g2tr
    handle = apply_g2tr(model, vae=vae, keep_ratio=0.5)      # model: a ...ForConditionalGeneration
    out = model(**inputs, vae_pixel_values=images)            # images for the VAE, [-1, 1]
    ids = model.generate(**inputs, vae_pixel_values=images, max_new_tokens=64)
    with handle.disabled(): ...                               # the plain model, patch still in place
    handle.remove()                                           # back to the plain model

Which families are reduced, and how, is the table in hf_support.py (rendered in the README):
apply_g2tr looks the model up there and refuses, with NotImplementedError naming the
model_type, every model it cannot reduce exactly. Never a silently different result.

What happens on a call that carries pixel_values (the prefill):
  1. the model's own get_image_features runs (vision tower + projector): N tokens per image;
  2. the VAE encodes the images -> anchors (g2tr_kernels.anchors, projection "interpolate"
     to the LLM width by default, or a module such as BAGEL's vae2llm);
  3. g2tr_kernels.reduce keeps K of N tokens per image and merges the rest into them;
  4. input_ids, attention_mask, position_ids, labels and the family's other per-token inputs
     (token_type_ids, mm_token_type_ids) are taken at the kept positions (g2tr_kernels.layout):
     every run of N image-context tokens becomes K; tokens that are not image-context tokens
     (row breaks, image start / end markers) are all kept. M-RoPE models (Qwen2-VL, Qwen3.5, GLM-4V)
     get their 3-D position ids from their own get_rope_index on the unreduced prompt, taken
     at the kept positions, and rope_deltas that continue the sequence while decoding;
  5. the unmodified model runs on the shorter prompt with the reduced features passed as
     mm_encoder_outputs, so the language model (and its KV cache) sees K tokens per image.
Calls without pixel_values (decode steps, text only) pass through untouched.

Anchors come from vae_latents= (precomputed, normalised latents, one per vision-tower
image) or anchors= ((anchors, anchor_grids) from prepare_anchors) when a call passes them;
else from VAE images, in order: the vae_pixel_values= argument of forward /
generate; handle.images(...) used as a context manager; else the pixel_values the VLM got,
mapped back to [-1, 1] with the image_mean / image_std given to apply_g2tr (without them,
a ValueError: the VLM's normalised pixels are not VAE input). One VAE image per
vision-tower image (per tile for InternVL).

generate() returns the ORIGINAL prompt followed by the new tokens (so slicing
output[:, input_ids.shape[1]:] still gives the answer); apply_g2tr(..., restore_prompt=False)
returns the reduced prompt instead. forward() returns logits over the reduced sequence;
handle.last holds the reduction (reduce output, grids, layout with the column map) of the
last call.

The patch is an attribute of the model instance that copy.deepcopy and pickle carry over
(the copy reduces with its own weights). Apply it before torch.compile.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .. import ops
from ..anchors import Pool, Projection, encode_latents, prepare_anchors
from ..layout import PaddedLayout, gather_columns, rebuild_padded
from .hf_support import Family, resolve

_TOKEN_TYPES = ("token_type_ids", "mm_token_type_ids", "moe_mm_token_type_ids")

# Arguments with one entry per image or video, never per prompt token.
_PER_IMAGE_ARGUMENTS = ("image_grid_thw", "video_grid_thw", "image_sizes", "second_per_grid_ts", "pixel_values_videos",
                        "pixel_attention_mask", "image_sizes_videos", "batch_num_images")

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
class _Parts:
    """How an image's features split into grids: one grid per image, or (anyres) several."""

    grids: List[Tuple[int, int]]  # per part
    image: Optional[List[int]] = None  # image of each part
    positions: Optional[List[torch.Tensor]] = None  # rows of each part in the packed features (raster)
    fixed: Optional[torch.Tensor] = None  # rows kept as they are (image_newline tokens)
    fixed_per_image: Optional[List[int]] = None
    groups: Optional[List[int]] = None  # images in each entry of the model's features (Idefics3: per prompt)


@dataclass
class _CachedTurn:
    """A generate() prefill with images after cached turns: what the cache already holds."""

    image_grid_thw: Any  # every image of the conversation (get_rope_index walks them all)
    keep: torch.Tensor  # stand-in kept image tokens of the cached images (their ids are all the image token)
    tokens: int  # image tokens of the cached images in input_ids


@dataclass
class G2TRHandle:
    model: Any
    vae: Any
    family: Family
    keep_ratio: float = 0.5
    min_keep: int = 32
    merge_weight: float = 1.0
    projection: Projection = "interpolate"
    patch: int = 1
    pool: Pool = "auto"
    image_mean: Optional[Sequence[float]] = None
    image_std: Optional[Sequence[float]] = None
    sample: str = "mode"
    scale_latents: bool = True
    grids: Optional[GridFn] = None
    backend: str = "auto"
    restore_prompt: bool = True
    enabled: bool = True
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

    @contextlib.contextmanager
    def disabled(self):
        """Run the plain model inside the block; G2TR stays applied and is back after it."""
        previous, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = previous

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
        padding_side: Optional[str] = "right",
        vae_latents=None,
        anchors=None,
        **other,
    ) -> Dict[str, Any]:
        """Runs steps 1-4; returns the keyword arguments for the unmodified forward.

        other: the call's remaining arguments (vision kwargs such as image_grid_thw, per-token
        inputs such as token_type_ids); the result replaces the ones it rebuilds.
        """
        arguments = dict(other, input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                         position_ids=position_ids, labels=labels)
        sources = _sources(vae_pixel_values, vae_latents, anchors)
        return self._prepare(arguments, sources, padding_side, for_generate=False)

    # -- internals ------------------------------------------------------------------------
    def _prepare(
        self, arguments: Dict[str, Any], sources: Dict[str, Any], padding_side: Optional[str], for_generate: bool
    ):
        """Pops what it consumes from `arguments`; returns the arguments for the plain model.

        padding_side None: left if the prompts are left-padded, else right (forward)."""
        family = self.family
        input_ids = arguments.pop("input_ids", None)
        pixel_values = arguments.pop("pixel_values")
        if input_ids is None:
            raise NotImplementedError("g2tr.hf: reducing needs input_ids (to find the image tokens), not inputs_embeds")
        if arguments.get("mm_encoder_outputs") is not None:
            raise ValueError("g2tr.hf: pass pixel_values or mm_encoder_outputs, not both")
        attention_mask = arguments.pop("attention_mask", None)
        position_ids = arguments.pop("position_ids", None)
        labels = arguments.pop("labels", None)
        mrope = "get_rope_index" in family.handles
        if family.videos_use_image_token and arguments.get("pixel_values_videos") is not None:
            raise NotImplementedError(
                f"g2tr.hf: {family.model_type}: images and videos in one call are not reduced (its video frames are "
                "image-token placeholders); pass them in separate calls (videos alone run unreduced)"
            )
        cache = arguments.get("past_key_values")
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        row_counts = self._start_host_copies(input_ids, arguments)

        turn = None
        if mrope and past and for_generate:
            pixel_values, turn = self._cached_turn(input_ids, pixel_values, arguments, past)
        vision_kwargs = {k: arguments[k] for k in family.vision_kwargs if arguments.get(k) is not None}
        encoded = self.model.get_image_features(pixel_values=pixel_values, return_dict=True, **vision_kwargs)
        features, lengths, as_tensor = _pack(encoded.pooler_output)
        parts = self._parts(lengths, arguments)
        if parts.positions is None and parts.groups is None and [h * w for h, w in parts.grids] != lengths:
            raise ValueError(f"g2tr.hf: grids {parts.grids} do not match the tokens per image {lengths}")

        anchors, anchor_grids = self._anchors(sources, pixel_values, arguments, parts, features)
        tokens, grids = features, parts.grids
        if parts.positions is not None:
            # Several parts per image (anyres: base tile, unpadded grid): each part is reduced on
            # its own grid against its image's anchors; the newline tokens are not reduced.
            index = torch.cat(parts.positions).to(features.device)
            tokens = features[index]
        out = ops.reduce(
            tokens, anchors, grids, anchor_grids, keep_ratio=self.keep_ratio, min_keep=self.min_keep,
            merge_weight=self.merge_weight, backend=self.backend,
        )
        part_lengths = [h * w for h, w in grids]
        kept = ops.budgets(part_lengths, self.keep_ratio, self.min_keep)  # host ints: no sync
        keep_idx, merged, kept_per_image = out.keep_idx, out.merged, kept
        if parts.positions is not None:
            kept_rows = index[out.keep_idx]
            keep_idx = torch.sort(torch.cat([kept_rows, parts.fixed.to(features.device)])).values
            full = features.clone()
            full[kept_rows] = out.merged
            merged = full[keep_idx]
            kept_per_image = [parts.fixed_per_image[i] for i in range(len(lengths))]
            for k, i in zip(kept, parts.image):
                kept_per_image[i] += k
        image_tokens = features.shape[0]
        if turn is not None:  # the layout covers the whole conversation, the cached images too
            keep_idx = torch.cat([turn.keep.to(keep_idx.device), keep_idx + turn.tokens])
            image_tokens += turn.tokens
        if parts.groups is not None:
            starts = [0]
            for g in parts.groups:
                starts.append(starts[-1] + g)
            kept_per_image = [sum(kept[a:b]) for a, b in zip(starts, starts[1:])]

        past_mask = None
        if attention_mask is not None and attention_mask.shape[-1] > input_ids.shape[-1]:
            # A prefill after cached turns: the mask also covers the cache, which is not rebuilt.
            past_mask = attention_mask[:, : -input_ids.shape[-1]]
            attention_mask = attention_mask[:, -input_ids.shape[-1] :]
        if mrope and (past or past_mask is not None) and turn is None:
            # Its ids are get_rope_index over the whole conversation, whose earlier turns the cache
            # holds reduced; transformers' own generate cannot run this case from pixel_values
            # either, so there is no plain result to be exact against.
            raise NotImplementedError(
                f"g2tr.hf: {family.model_type}: a forward with images after cached turns is not reduced (its M-RoPE "
                "ids continue the whole conversation, which forward does not get); call generate with the whole "
                "conversation and past_key_values (README, 'Hugging Face VLMs')"
            )
        rope_positions = rope_deltas = None
        if mrope and position_ids is None:
            rope_positions, rope_deltas = self._rope_index(
                input_ids, attention_mask, arguments if turn is None else dict(arguments, image_grid_thw=turn.image_grid_thw))
        row_lengths = self._row_lengths(row_counts, input_ids, keep_idx, image_tokens, lengths, kept_per_image)
        layout = rebuild_padded(
            input_ids, keep_idx, self.image_token_id, attention_mask=attention_mask, position_ids=position_ids,
            labels=labels, pad_token_id=self.pad_token_id, padding_side=padding_side or "auto",
            image_tokens=image_tokens, row_lengths=row_lengths,
        )
        self.last = Reduction(out, grids, anchor_grids, layout, part_lengths, kept)

        encoded.pooler_output = _unpack(merged, kept_per_image, as_tensor)
        if getattr(encoded, "deepstack_features", None) is not None:
            # Qwen3-VL adds these per-token features at the image positions in its first
            # layers: each layer's are merged with the same assignment as the tokens.
            encoded.deepstack_features = [
                _unpack(merge_by_assignment(_pack(layer)[0], out, self.merge_weight), kept, False)
                for layer in encoded.deepstack_features
            ]
        new_mask = layout.attention_mask
        if past_mask is not None:
            new_mask = torch.cat([past_mask, new_mask.to(past_mask.dtype)], dim=-1)
        result = {"input_ids": layout.input_ids, "attention_mask": new_mask}
        if turn is not None:
            result["image_grid_thw"] = turn.image_grid_thw
        mm = {"image": encoded}
        if arguments.get("pixel_values_videos") is not None:
            mm["video"] = self._video_features(arguments)
        result["mm_encoder_outputs"] = mm
        # The row's per-token inputs, and the token-type tensors processors return even where
        # the model only passes them on (generate slices and extends them like input_ids).
        for name in dict.fromkeys(family.rebuilt + _TOKEN_TYPES):
            if name in ("attention_mask", "position_ids", "labels"):
                continue
            value = arguments.pop(name, None)
            if value is None:
                continue
            if not isinstance(value, torch.Tensor) or tuple(value.shape[-2:]) != tuple(input_ids.shape):
                raise ValueError(f"g2tr.hf: {name} must be a tensor ending in the shape of input_ids "
                                 f"{list(input_ids.shape)}")
            result[name] = gather_columns(value, layout.index, 0)
        _refuse_unrebuilt(arguments, input_ids)
        if position_ids is not None:
            result["position_ids"] = layout.position_ids
        if labels is not None:
            result["labels"] = layout.labels
        if rope_positions is not None:
            positions = gather_columns(rope_positions, layout.index, 0)
            # The next position after each row is its largest id + 1, now reached after fewer tokens.
            dropped = (~layout.keep).sum(-1, keepdim=True).to(rope_deltas.device)
            _inner(self.model).rope_deltas = rope_deltas + dropped
            if for_generate:
                # generate's own layout: text positions first ([4, B, L]); it adds 1 per new token.
                text = layout.attention_mask.long().cumsum(-1) - 1
                text = text.masked_fill(layout.attention_mask == 0, 0)
                positions = torch.cat([text[None].to(positions), positions], dim=0)
            result["position_ids"] = positions
        return result

    def _video_features(self, arguments):
        """The call's videos, encoded by the model itself and not reduced: the model takes pixel values
        or encoder outputs, not both, and G2TR reduces images (a video's frames have no VAE image).
        Their tokens are not image tokens, so the layout keeps every one in place."""
        get_video_features = self.model.get_video_features
        accepted = inspect.signature(get_video_features).parameters
        # The forward arguments that shape the video features (the rest default from the config).
        names = ("video_grid_thw", "vision_feature_layer", "vision_feature_select_strategy")
        extra = {k: arguments[k] for k in names if k in accepted and arguments.get(k) is not None}
        return get_video_features(arguments.pop("pixel_values_videos"), return_dict=True, **extra)

    def _start_host_copies(self, input_ids, arguments) -> Optional["_HostCopy"]:
        """Before the vision tower is enqueued, the device values the host will need start on their
        way: each row's image-token count (a batch) and the per-image sizes (_host reads them)."""
        if torch.compiler.is_compiling():
            return None  # a traced graph cannot hold an event
        for name in _HOST_SIZES:
            value = arguments.get(name)
            if isinstance(value, torch.Tensor) and value.device.type != "cpu":
                _COPIES[value] = _HostCopy(value)
        if input_ids.shape[0] == 1:
            return None  # one prompt: its length follows from host sizes
        return _HostCopy((input_ids == self.image_token_id).sum(1))

    def _row_lengths(self, row_counts: Optional["_HostCopy"], input_ids, keep_idx, image_tokens: int, lengths,
                     kept) -> List[int]:
        """Each row's length after the reduction, as host ints (they size the new prompt).

        One prompt: from host sizes alone. A batch: from each row's image-token count, copied
        to the host when the prefill started (_HostCopy), and the host-side N and K of each
        image, images filling the rows in order. Only where that does not hold (an image whose
        tokens do not sit in one row, a token count that is not the features' count, or under
        torch.compile) are the kept tokens counted per row on the device and read back: one
        graph break under torch.compile, none with capture_scalar_outputs (unbacked sizes).
        """
        b, length = input_ids.shape
        if b == 1:
            return [length - (image_tokens - keep_idx.numel())]
        per_row = row_counts.wait() if row_counts is not None else None
        if per_row is not None:
            rows = _image_rows(per_row, lengths)
            if rows is not None:
                kept_per_row = per_row.new_zeros(b).scatter_add_(0, rows, torch.tensor(kept, dtype=per_row.dtype))
                return (length - per_row + kept_per_row).tolist()
        return self._row_lengths_from_device(input_ids, keep_idx)

    def _row_lengths_from_device(self, input_ids, keep_idx) -> List[int]:
        """The kept tokens of each row counted on the device, and read back (B ints)."""
        length = input_ids.shape[1]
        per_row = (input_ids == self.image_token_id).sum(1)
        kept_rows = torch.searchsorted(per_row.cumsum(0), keep_idx.to(per_row.device), right=True)
        kept_per_row = per_row.new_zeros(per_row.numel()).scatter_add_(0, kept_rows, torch.ones_like(kept_rows))
        row_lengths = (length - per_row + kept_per_row).tolist()
        if torch.compiler.is_compiling():  # traced .tolist(): unbacked sizes under capture_scalar_outputs
            for n in row_lengths:
                # What tracing cannot know of an unbacked length: a row keeps K >= 1 of each
                # image and all its other tokens, so it is never empty and never longer than before.
                torch._check(n >= 1)
                torch._check(n <= length)
        return row_lengths

    def _parts(self, lengths: List[int], arguments) -> "_Parts":
        if self.family.grids == "anyres":
            return self._anyres_parts(lengths, arguments)
        if self.family.grids == "per_prompt":
            # Idefics3 / SmolVLM: one entry per prompt, its images' square grids one after another.
            vision = self.model.config.vision_config
            patches = (int(vision.image_size) // int(vision.patch_size)) ** 2
            per_image = patches // int(self.model.config.scale_factor) ** 2
            side = math.isqrt(per_image)
            if side * side != per_image or any(n % per_image for n in lengths):
                raise ValueError(f"g2tr.hf: prompts with {lengths} image tokens are not {per_image}-token images")
            groups = [n // per_image for n in lengths]
            return _Parts([(side, side)] * sum(groups), groups=groups)
        return _Parts(self._grids(lengths, arguments))

    def _anyres_parts(self, lengths: List[int], arguments) -> "_Parts":
        """LLaVA-NeXT / OneVision: each image's features are a base tile (S x S) and, for a
        multi-tile image, an unpadded grid whose rows each end in an image_newline token.

        The layout is read by running the model's own pack_image_features on zeros with a
        newline of ones (on the CPU, from image_sizes: no device read), so it follows the
        model's unpadding and OneVision's downsampling exactly.
        """
        inner, config = _inner(self.model, "pack_image_features"), self.model.config
        sizes = arguments.get("image_sizes")
        if sizes is None:
            raise ValueError(f"g2tr.hf: {self.family.model_type} needs image_sizes")
        sizes = torch.as_tensor(_host(sizes))
        side = int(config.vision_config.image_size) // int(config.vision_config.patch_size)
        to_patches = inspect.getmodule(type(inner)).image_size_to_num_patches
        counts = arguments.get("batch_num_images")
        if counts is None:
            tiled = [True] * len(sizes)
        else:  # OneVision: only a prompt's single image is tiled
            tiled = [int(n) == 1 for n in _host_flat(counts) for _ in range(int(n))]
        patches = [
            to_patches(image_size=size, grid_pinpoints=config.image_grid_pinpoints,
                       patch_size=config.vision_config.image_size) if t else 1
            for size, t in zip(sizes, tiled)
        ]
        kwargs = {"image_newline": torch.ones(1)}
        accepted = inspect.signature(inner.pack_image_features).parameters
        if "vision_feature_select_strategy" in accepted:
            kwargs["vision_feature_select_strategy"] = "default"
        if "vision_aspect_ratio" in accepted:
            kwargs["vision_aspect_ratio"] = arguments.get("vision_aspect_ratio") or config.vision_aspect_ratio
        packed, _ = inner.pack_image_features([torch.zeros(n, side * side, 1) for n in patches], sizes, **kwargs)
        grids, image, positions, fixed, fixed_per_image, offset = [], [], [], [], [], 0
        for i, (seq, n) in enumerate(zip(packed, lengths)):
            newline = seq[:, 0] == 1
            if seq.shape[0] != n or bool(newline[: side * side].any()):
                raise ValueError(f"g2tr.hf: image {i}: the features do not have the base + unpadded layout")
            grids.append((side, side))
            image.append(i)
            positions.append(torch.arange(offset, offset + side * side))
            rest = newline[side * side :]
            rows = int(rest.sum())
            if rest.numel() > rows:  # an unpadded grid: rows x cols tokens, a newline after each row
                cols = rest.numel() // rows - 1
                expected = torch.zeros(rows, cols + 1, dtype=torch.bool)
                expected[:, -1] = True
                if rows * (cols + 1) != rest.numel() or not torch.equal(rest, expected.reshape(-1)):
                    raise ValueError(f"g2tr.hf: image {i}: the unpadded grid is not rows of tokens + newline")
                grid_positions = torch.arange(rest.numel()).reshape(rows, cols + 1)[:, :cols].reshape(-1)
                grids.append((rows, cols))
                image.append(i)
                positions.append(offset + side * side + grid_positions)
            fixed.append(offset + side * side + torch.nonzero(rest).reshape(-1))
            fixed_per_image.append(rows)
            offset += n
        return _Parts(grids, image, positions, torch.cat(fixed), fixed_per_image)

    def _grids(self, lengths: List[int], arguments) -> List[Tuple[int, int]]:
        kind, config = self.family.grids, self.model.config
        if kind == "square":
            return list(self.grids(lengths) if self.grids is not None else square_grids(lengths))
        if kind == "image_sizes":
            sizes = arguments.get("image_sizes")
            if sizes is None:
                raise ValueError(f"g2tr.hf: {self.family.model_type} needs image_sizes to know each image's grid")
            ratio = int(config.vision_config.patch_size) * int(getattr(config, "spatial_merge_size", 1))
            return [(int(h) // ratio, int(w) // ratio) for h, w in _host(sizes)]
        if kind == "grid_thw":
            thw = arguments.get("image_grid_thw")
            if thw is None:
                raise ValueError(f"g2tr.hf: {self.family.model_type} needs image_grid_thw to know each image's grid")
            merge = int(config.vision_config.spatial_merge_size)
            grids = []
            for b, (t, h, w) in enumerate(_host(thw)):
                if int(t) != 1:
                    raise ValueError(f"g2tr.hf: image {b} has {t} temporal patches; an image has 1")
                grids.append((int(h) // merge, int(w) // merge))
            return grids
        raise AssertionError(kind)

    def _continue_reduced_cache(self, input_ids, kwargs) -> Optional[torch.Tensor]:
        """A later turn without images on a cache that holds a reduced conversation: the caller's
        input_ids (the conversation as generate returned it, unreduced) shortened by the columns
        the cache never held, so generate feeds exactly the new tokens. None: nothing to shorten."""
        cache = kwargs.get("past_key_values")
        if not hasattr(cache, "_g2tr_dropped") or cache._g2tr_dropped == 0:
            return None
        dropped, past = cache._g2tr_dropped, cache.get_seq_length()
        if dropped is None:
            raise NotImplementedError("g2tr.hf: a cache filled by a reduced batch of prompts is not continued (its "
                                      "rows dropped different numbers of tokens); one conversation at a time")
        length = input_ids.shape[-1]
        if input_ids.shape[0] != 1 or length <= past + dropped:
            raise ValueError(f"g2tr.hf: past_key_values holds {past} columns of a conversation reduced by {dropped}; "
                             f"input_ids {list(input_ids.shape)} do not continue it")
        keep = torch.cat([torch.arange(past), torch.arange(past + dropped, length)]).to(input_ids.device)
        for name in ("attention_mask",) + _TOKEN_TYPES:
            value = kwargs.get(name)
            if isinstance(value, torch.Tensor) and value.shape[-1] == length:
                kwargs[name] = value[..., keep]
        return input_ids[..., keep]

    def _cached_turn(self, input_ids, pixel_values, arguments, past: int):
        """generate() on a conversation whose first `past` columns the cache holds, reduced by an
        earlier call (a second turn with new images). input_ids, image_grid_thw, mm_token_type_ids
        (and pixel_values, or only the new images' rows) cover the whole conversation as the
        processor returns it; the VAE sources cover the new images only.

        Returns the new images' pixel_values (image_grid_thw in `arguments` becomes theirs) and
        the cached part: each cached image keeps the first K of its N placeholders (all are the
        image token, so which K does not change the reduced ids; the cache has the real ones).
        Reads input_ids back once (get_rope_index reads the token types back anyway).
        """
        name = self.family.model_type
        if input_ids.shape[0] != 1:
            raise NotImplementedError(f"g2tr.hf: {name}: images after cached turns are reduced for one conversation "
                                      f"at a time, got a batch of {input_ids.shape[0]}")
        if arguments.get("pixel_values_videos") is not None or arguments.get("video_grid_thw") is not None:
            raise NotImplementedError(f"g2tr.hf: {name}: videos in a conversation with cached turns are not reduced")
        if arguments.get("image_grid_thw") is None:
            raise ValueError(f"g2tr.hf: {name} needs image_grid_thw (every image of the conversation)")
        thw = _host(arguments["image_grid_thw"])
        merge = int(self.model.config.vision_config.spatial_merge_size)
        tokens = [int(t) * int(h) * int(w) // merge**2 for t, h, w in thw]
        kept = ops.budgets(tokens, self.keep_ratio, self.min_keep)
        image_of, within = [], []  # per image token, as masked_scatter fills them
        for i, n in enumerate(tokens):
            image_of += [i] * n
            within += range(n)
        dropped = getattr(arguments["past_key_values"], "_g2tr_dropped", None)
        if dropped is None:
            raise ValueError(f"g2tr.hf: {name}: past_key_values was not filled by this handle's generate (one "
                             "conversation), so where it ends in the unreduced conversation is unknown")
        # The cache ends before the (past + 1)-th column the reduced conversation keeps.
        count, end, end_column, seen = 0, None, 0, 0
        for column, token in enumerate(input_ids[0].tolist()):
            is_image = token == self.image_token_id
            if is_image and seen >= len(image_of):
                raise ValueError(f"g2tr.hf: {name}: more image tokens than image_grid_thw describes")
            if not is_image or within[seen] < kept[image_of[seen]]:
                if count == past:
                    end, end_column = seen, column
                    break
                count += 1
            seen += is_image
        if end is None:
            raise ValueError(f"g2tr.hf: {name}: the cache ({past} columns) covers the whole prompt")
        if end_column - past != dropped:
            raise ValueError(f"g2tr.hf: {name}: past_key_values holds a conversation reduced by {dropped} tokens, "
                             f"these input_ids reduce the part it would hold by {end_column - past}")
        cached = image_of[end] if end < len(image_of) else len(tokens)
        if end < len(image_of) and within[end] != 0:
            raise ValueError(f"g2tr.hf: {name}: the cache ({past} columns) ends inside image {cached}; it was not "
                             "filled by this handle's reduction of the earlier turns")
        rows = [int(t) * int(h) * int(w) for t, h, w in thw]
        if pixel_values.shape[0] == sum(rows):
            pixel_values = pixel_values[sum(rows[:cached]):]
        elif pixel_values.shape[0] != sum(rows[cached:]):
            raise ValueError(f"g2tr.hf: {name}: pixel_values has {pixel_values.shape[0]} rows; the conversation's "
                             f"images have {sum(rows)}, the ones after the cache {sum(rows[cached:])}")
        all_thw = arguments["image_grid_thw"]
        arguments["image_grid_thw"] = all_thw[cached:]
        keep = [torch.arange(sum(tokens[:i]), sum(tokens[:i]) + kept[i]) for i in range(cached)]
        return pixel_values, _CachedTurn(all_thw, torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long),
                                         sum(tokens[:cached]))

    def _rope_index(self, input_ids, attention_mask, arguments):
        """The model's own 3-D M-RoPE ids [3, B, L] and rope_deltas [B, 1] for the UNREDUCED prompt."""
        mm_token_type_ids = arguments.get("mm_token_type_ids")
        if mm_token_type_ids is None:
            raise ValueError(
                f"g2tr.hf: {self.family.model_type} needs mm_token_type_ids (its processor returns them) for its "
                "M-RoPE ids"
            )
        get_rope_index = _inner(self.model).get_rope_index
        accepted = inspect.signature(get_rope_index).parameters
        names = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
        extra = {k: arguments.get(k) for k in names if k in accepted}
        return get_rope_index(input_ids, mm_token_type_ids=mm_token_type_ids, attention_mask=attention_mask, **extra)

    def _anchors(self, sources: Dict[str, Any], pixel_values, arguments, parts: "_Parts", features):
        """Anchors for every part, from exactly one source: vae_latents=, anchors=, or VAE images
        (vae_pixel_values=, handle.images(...), or the VLM's pixel_values mapped back)."""
        if len(sources) > 1:
            raise ValueError(f"g2tr.hf: pass one of vae_pixel_values, vae_latents or anchors, got {', '.join(sources)}")
        n_vision = sum(parts.groups) if parts.groups is not None else (
            len(parts.grids) if parts.image is None else parts.image[-1] + 1)
        per_part = parts.image  # None: one part per image
        recipe = dict(projection=self.projection, patch=self.patch, pool=self.pool, dim=self.hidden_size,
                      like=features)
        if "anchors" in sources:
            anchors, anchor_grids = sources["anchors"]
            anchors, anchor_grids = prepare_anchors(
                [parts.grids[per_part.index(i)] for i in range(n_vision)] if per_part else parts.grids,
                anchors=(anchors, anchor_grids), dim=self.hidden_size, like=features,
            )
            if per_part is not None:
                pieces = list(torch.split(anchors, [h * w for h, w in anchor_grids]))
                anchors = torch.cat([pieces[i] for i in per_part])
                anchor_grids = [anchor_grids[i] for i in per_part]
            return anchors, anchor_grids
        latents = sources.get("vae_latents")
        if latents is None:
            images = self._vae_images(sources.get("images"), pixel_values, arguments)
            n_images = images.shape[0] if isinstance(images, torch.Tensor) else len(images)
            if n_images != n_vision:
                raise ValueError(
                    f"g2tr.hf: {n_images} VAE images for {n_vision} vision-tower images; give one per image (tile)"
                )
            if per_part is None:
                return prepare_anchors(parts.grids, vae=self.vae, images=images, sample=self.sample,
                                       scale=self.scale_latents, **recipe)
            latents = encode_latents(self.vae, images, sample=self.sample, scale=self.scale_latents)
        latents = list(latents.unbind(0)) if isinstance(latents, torch.Tensor) and latents.dim() in (4, 5) else list(
            latents if not isinstance(latents, torch.Tensor) else [latents])
        if len(latents) != n_vision:
            raise ValueError(
                f"g2tr.hf: {len(latents)} VAE latents for {n_vision} vision-tower images; give one per image"
            )
        if per_part is not None:
            # Each part against its image's latent, pooled for that part's own grid.
            latents = [latents[i] for i in per_part]
        return prepare_anchors(parts.grids, vae_latents=latents, **recipe)

    def _vae_images(self, vae_pixel_values, pixel_values, arguments):
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
        if self.family.grids == "grid_thw" or pixel_values.dim() != 4:
            raise ValueError(
                f"g2tr.hf: {self.family.model_type} gets its pixel_values as patches, not images; pass the images "
                "for the VAE as vae_pixel_values="
            )
        images = pixel_values.float()
        mean = torch.as_tensor(self.image_mean, dtype=images.dtype, device=images.device).reshape(1, -1, 1, 1)
        std = torch.as_tensor(self.image_std, dtype=images.dtype, device=images.device).reshape(1, -1, 1, 1)
        images = (images * std + mean) * 2.0 - 1.0  # processor space -> [0, 1] -> the VAE's [-1, 1]
        if self.family.grids == "image_sizes":
            # A padded batch: each image sits in the top-left corner of its slot.
            return [img[:, : int(h), : int(w)] for img, (h, w) in zip(images, _host(arguments["image_sizes"]))]
        return images

    def _call_forward(self, original, signature, args, kwargs):
        if not self.enabled:
            return original(*args, **kwargs)
        sources = _pop_sources(kwargs)
        arguments = signature.bind_partial(*args, **kwargs).arguments
        extra = arguments.pop("kwargs", {})
        arguments.update(extra)
        if arguments.get("pixel_values") is None:
            return original(**arguments)
        arguments.update(self._prepare(arguments, sources, None, for_generate=False))
        return original(**arguments)

    def _call_generate(self, original, args, kwargs):
        if not self.enabled:
            return original(*args, **kwargs)
        sources = _pop_sources(kwargs)
        if args:
            input_ids, args = args[0], args[1:]
        else:
            input_ids = kwargs.pop("input_ids", None)
            if input_ids is None:
                input_ids = kwargs.pop("inputs", None)
        if input_ids is None:
            return original(*args, **kwargs)
        if kwargs.get("pixel_values") is None:
            shortened = self._continue_reduced_cache(input_ids, kwargs)
            if shortened is None:
                return original(input_ids, *args, **kwargs)
            out = original(shortened, *args, **kwargs)
            return _restore_prompt(out, input_ids, shortened.shape[-1])
        kwargs["input_ids"] = input_ids
        # Batched generation appends on the right, so new padding goes on the left.
        reduced = self._prepare(kwargs, sources, "left", for_generate=True)
        reduced_ids = reduced.pop("input_ids")
        kwargs.update(reduced)
        # generate's first parameter takes the ids, so positional arguments after it still line up.
        out = original(reduced_ids, *args, **kwargs)
        # How many columns the cache is short of the conversation the caller sees (None: a batch,
        # whose rows differ): a later turn on this cache is shortened by it (_cached_turn,
        # _continue_reduced_cache) instead of being read at the wrong columns.
        for cache in (kwargs.get("past_key_values"), getattr(out, "past_key_values", None)):
            if cache is not None and self.restore_prompt:
                cache._g2tr_dropped = input_ids.shape[-1] - reduced_ids.shape[-1] if input_ids.shape[0] == 1 else None
        if not self.restore_prompt:
            return out
        return _restore_prompt(out, input_ids, reduced_ids.shape[-1])


class _HostCopy:
    """A few device values on their way to the host from the start of the prefill.

    Read where they are needed (the layout, after the reduction), they would wait for
    everything queued before them: the vision tower, the VAE, the reduction, a pipeline stall.
    Copied first, non-blocking into pinned memory with an event, the host waits only for a
    copy that finished long before.
    """

    def __init__(self, values: torch.Tensor):
        self.event = None
        if values.device.type != "cuda":
            self.values = values.cpu()  # the CPU: no copy; other devices: nothing of this prefill queued yet
            return
        self.values = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        self.values.copy_(values, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record(torch.cuda.current_stream(values.device))  # the stream the copy went on

    def wait(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
        return self.values


# Per-image sizes read on the host (grids, anyres layout, crops): processors return them on the
# CPU, but inputs moved with .to(device) bring them along; those are copied at the start.
_HOST_SIZES = ("image_sizes", "image_grid_thw", "batch_num_images")
_COPIES = WeakIdKeyDictionary()  # device tensor -> its _HostCopy; an entry goes with its tensor


def _image_rows(per_row: torch.Tensor, lengths: List[int]) -> Optional[torch.Tensor]:
    """The row of each image (host tensors), or None if some image's tokens are not all in one row
    or the rows hold another number of image tokens than the features."""
    ends = per_row.cumsum(0)
    if not lengths or int(ends[-1]) != sum(lengths):
        return None
    sizes = torch.tensor(lengths, dtype=ends.dtype)
    starts = sizes.cumsum(0) - sizes
    first = torch.searchsorted(ends, starts, right=True).clamp_(max=per_row.numel() - 1)
    last = torch.searchsorted(ends, starts + sizes - 1, right=True).clamp_(max=per_row.numel() - 1)
    if not torch.equal(first[sizes > 0], last[sizes > 0]):
        return None
    return first


class _Patched:
    """model.forward / model.generate while G2TR is applied.

    An object holding the handle, not a closure over the bound method: copy.deepcopy and
    pickle copy it with the model, and the copy calls its own model's method (its own weights).
    """

    def __init__(self, handle: G2TRHandle, name: str, previous):
        self.handle, self.name, self.previous = handle, name, previous
        # The class's function, looked up once: under torch.compile a lookup on the instance's
        # type at call time can resolve to this very object and recurse.
        self.function = getattr(type(handle.model), name)

    def _original(self):
        if self.previous is not None:  # an instance attribute that was there before (accelerate hooks)
            return self.previous
        return functools.partial(self.function, self.handle.model)

    @property
    def __signature__(self):  # generate() inspects forward's parameters
        return inspect.signature(self._original())

    @property
    def __doc__(self):
        return self._original().__doc__

    def __call__(self, *args, **kwargs):
        original = self._original()
        if self.name == "forward":
            return self.handle._call_forward(original, inspect.signature(original), args, kwargs)
        return self.handle._call_generate(original, args, kwargs)


def apply_g2tr(
    model,
    vae,
    keep_ratio: float = 0.5,
    min_keep: int = 32,
    merge_weight: float = 1.0,
    projection: Projection = "interpolate",
    patch: int = 1,
    pool: Pool = "auto",
    image_mean: Optional[Sequence[float]] = None,
    image_std: Optional[Sequence[float]] = None,
    sample: str = "mode",
    scale_latents: bool = True,
    grids: Optional[GridFn] = None,
    backend: str = "auto",
    restore_prompt: bool = True,
) -> G2TRHandle:
    """Make `model` (a transformers VLM ...ForConditionalGeneration) reduce its image tokens with G2TR.

    vae: a diffusers VAE (see g2tr_kernels.anchors.VAE_ADAPTERS); None if every call passes
    vae_latents= or anchors=.
    keep_ratio, min_keep, merge_weight: as g2tr_kernels.reduce. projection / patch / pool:
    the anchor recipe of g2tr_kernels.anchors (InternVL-U: "interpolate", 1, 1; BAGEL:
    its vae2llm Linear, 2, 2); pool="auto" sizes each image's anchor grid to its ViT grid.
    image_mean / image_std: the VLM processor's normalisation,
    used to hand the VLM's pixel_values to the VAE when no vae_pixel_values are given.
    grids: callable(tokens per image) -> [(h, w), ...] for families whose tokens form one
    grid per image (square by default). restore_prompt: generate() returns the original
    prompt (True) or the reduced one (False) in front of the new tokens.
    Patches model.forward and model.generate on this instance; returns a handle
    (.remove(), .disabled(), .last). Raises NotImplementedError for a model it cannot
    reduce exactly (see hf_support.FAMILIES).
    """
    dynamo = getattr(torch, "_dynamo", None)
    optimized = getattr(getattr(dynamo, "eval_frame", None), "OptimizedModule", ())
    if (optimized and isinstance(model, optimized)) or getattr(model, "_compiled_call_impl", None) is not None:
        raise TypeError("g2tr.hf: the model is already compiled; apply before torch.compile (apply_g2tr, then compile)")
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
    family = resolve(model)  # NotImplementedError now, not at the first call
    ops.budgets([1], keep_ratio, min_keep)  # validates keep_ratio / min_keep now, not at the first call
    if grids is not None and family.grids != "square":
        raise ValueError(f"g2tr.hf: {family.model_type} takes its grids from its inputs; grids= is not used")

    handle = G2TRHandle(
        model=model, vae=vae, family=family, keep_ratio=keep_ratio, min_keep=min_keep, merge_weight=merge_weight,
        projection=projection, patch=patch, pool=pool, image_mean=image_mean, image_std=image_std, sample=sample,
        scale_latents=scale_latents, grids=grids, backend=backend, restore_prompt=restore_prompt,
    )
    _ = handle.image_token_id  # fails now, not at the first call, on configs without an image token

    # The bare ...Model classes have no generate.
    names = ["forward"] + (["generate"] if callable(getattr(model, "generate", None)) else [])
    # Instance attributes shadow the class methods; nn.Module.__call__ and generate() look
    # forward up on the instance.
    for name in names:
        previous = model.__dict__.get(name)
        handle._originals[name] = previous
        model.__dict__[name] = _Patched(handle, name, previous)
    model._g2tr_handle = handle
    return handle
def merge_by_assignment(values: torch.Tensor, out: ops.ReduceOutput, merge_weight: float = 1.0) -> torch.Tensor:
    """Other per-token features [N, F] merged exactly as reduce merged the tokens (SPEC.md §4):
    row k = (merge_weight * v_k + sum of the v_j assigned to k) / (merge_weight + n_k), in fp32."""
    weight = torch.ones(values.shape[0], dtype=torch.float32, device=values.device)
    weight[out.keep_idx.to(values.device)] = merge_weight
    assign = out.assign.to(values.device)
    rows = out.keep_idx.shape[0]
    total = values.new_zeros(rows, values.shape[-1], dtype=torch.float32)
    total.index_add_(0, assign, values.float() * weight[:, None])
    count = weight.new_zeros(rows).index_add_(0, assign, weight)
    return (total / count[:, None]).to(values.dtype)


def _sources(vae_pixel_values=None, vae_latents=None, anchors=None) -> Dict[str, Any]:
    given = {"images": vae_pixel_values, "vae_latents": vae_latents, "anchors": anchors}
    return {k: v for k, v in given.items() if v is not None}


def _pop_sources(kwargs) -> Dict[str, Any]:
    """The anchor sources of a forward / generate call (never passed on to the model)."""
    return _sources(kwargs.pop("vae_pixel_values", None), kwargs.pop("vae_latents", None), kwargs.pop("anchors", None))


def _inner(model, method: str = "get_rope_index"):
    """The ...Model inside a ...ForConditionalGeneration (it holds get_rope_index and rope_deltas)."""
    inner = getattr(model, "model", None)
    return inner if inner is not None and hasattr(inner, method) else model


def _host_flat(values) -> List[int]:
    return _host_tensor(values).reshape(-1).tolist() if isinstance(values, torch.Tensor) else [int(v) for v in values]


def _host(values) -> List[List[int]]:
    """Per-image sizes as host ints: a CPU tensor as it is, a device one from its copy (_HostCopy)."""
    if isinstance(values, torch.Tensor):
        return _host_tensor(values).tolist()
    return [list(v) for v in values]


def _host_tensor(values: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return values  # no copies were started (_start_host_copies)
    copy = _COPIES.get(values)
    return copy.wait() if copy is not None else values


def _refuse_unrebuilt(arguments: Dict[str, Any], input_ids: torch.Tensor) -> None:
    # A per-token input that the family's row does not rebuild would reach the model with the
    # unreduced length: an error here, not a wrong result or a shape error deep in the model.
    for name, value in arguments.items():
        if name in _PER_IMAGE_ARGUMENTS:
            continue
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and tuple(value.shape[-2:]) == tuple(input_ids.shape):
            raise ValueError(
                f"g2tr.hf: {name} has one entry per prompt token and is not rebuilt for the reduced prompt; "
                "drop it or reduce by hand (g2tr_kernels.layout.gather_columns)"
            )


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


__all__ = ["G2TRHandle", "Reduction", "apply_g2tr", "merge_by_assignment", "square_grids"]
