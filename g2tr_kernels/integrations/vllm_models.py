"""The vLLM model classes that serve G2TR (registered by g2tr_kernels.integrations.vllm.register).

Each subclass is its vLLM parent, unchanged, unless the HF config has a "g2tr" key: every
override starts with `if g2tr is None: return super()...`. Imported only inside vLLM
processes (it imports vLLM's model modules).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import List, Optional, Tuple

import numpy as np
import torch
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_info,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.vision import get_num_selected_vision_tokens, get_vision_encoder_info
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from .vllm import Reducer, ServingConfig, check_rows, qwen_patches_to_images, serving_config, unnormalize


def _processor_norm(model_config) -> Tuple[List[float], List[float]]:
    """image_mean / image_std of the model's image processor: how its pixels map back to [0, 1].

    Read from the checkpoint's own processor config, not vLLM's copy: with device-side
    normalisation vLLM turns the host normalisation off, and the tower's input_norm applies
    these same values.
    """
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(model_config.model, trust_remote_code=model_config.trust_remote_code)
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    if mean is None or std is None or not getattr(processor, "do_normalize", True):
        raise ValueError(
            f"g2tr.vllm: the image processor {type(processor).__name__} has no image_mean / image_std, so its pixels "
            "cannot be mapped back to the VAE's input range"
        )
    rescale = float(getattr(processor, "rescale_factor", 1 / 255))
    if getattr(processor, "do_rescale", True) and abs(rescale - 1 / 255) > 1e-12:
        raise ValueError("g2tr.vllm: the image processor rescales by something other than 1/255; refusing to guess")
    return list(mean), list(std)


class _G2TRModel:
    """The __init__ every G2TR model subclass shares (listed before its vLLM parent): the
    parent's, then, only when the HF config has a "g2tr" key, the processor's normalisation
    and the Reducer, then g2tr_setup for what the model adds or refuses."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.g2tr: Optional[Reducer] = None
        cfg = serving_config(self.config)
        if cfg is None:
            return
        self.g2tr_setup(vllm_config)
        self.g2tr_norm = _processor_norm(vllm_config.model_config)
        self.g2tr = Reducer(cfg, self.config.text_config.hidden_size)

    def g2tr_setup(self, vllm_config) -> None:
        raise NotImplementedError


# -- LLaVA (1-D RoPE) ---------------------------------------------------------------------

def llava_tokens_per_image(hf_config, image_width: int, image_height: int) -> int:
    """N: what vLLM's LLaVA processing info counts for an image (after the feature select)."""
    info = get_vision_encoder_info(hf_config)
    return get_num_selected_vision_tokens(
        info.get_num_image_tokens(image_width=image_width, image_height=image_height),
        hf_config.vision_feature_select_strategy,
    )


def llava_grid(hf_config) -> Tuple[int, int]:
    """The token grid of one LLaVA image, from the vision config; refuses layouts that are not a grid."""
    info = get_vision_encoder_info(hf_config)
    side = info.get_patch_grid_length()
    size = info.get_image_size()
    n = llava_tokens_per_image(hf_config, size, size)
    if n != side * side:
        raise ValueError(
            f"g2tr.vllm: LLaVA with vision_feature_select_strategy={hf_config.vision_feature_select_strategy!r} gives "
            f"{n} tokens per image, not the {side} x {side} patch grid (a CLS token is kept); G2TR needs the grid"
        )
    return side, side


class G2TRLlavaProcessingInfo(LlavaProcessingInfo):
    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        cfg = serving_config(self.get_hf_config())
        return n if cfg is None else cfg.budgets([n])[0]


def _build_llava_info(ctx):
    info = _build_llava_or_pixtral_hf_info(ctx)
    # Pixtral-HF configs keep vLLM's own info; the model refuses them when G2TR is on.
    return G2TRLlavaProcessingInfo(ctx) if type(info) is LlavaProcessingInfo else info


@MULTIMODAL_REGISTRY.register_processor(
    _build_llava_or_pixtral_hf_processor, info=_build_llava_info, dummy_inputs=LlavaDummyInputsBuilder
)
class G2TRLlavaForConditionalGeneration(_G2TRModel, LlavaForConditionalGeneration):
    def g2tr_setup(self, vllm_config) -> None:
        if self.config.vision_config.model_type == "pixtral":
            raise NotImplementedError("g2tr.vllm: Pixtral-HF LLaVA checkpoints (variable image grids) are not served")
        self.g2tr_grid = llava_grid(self.config)

    def embed_multimodal(self, **kwargs: object):
        if self.g2tr is None:
            return super().embed_multimodal(**kwargs)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if image_input["type"] != "pixel_values":
            raise ValueError("g2tr.vllm: image embeddings carry no pixels for the VAE anchors; send images")
        features = self._process_image_input(image_input)  # projected: in the LLM width, as SPEC §1
        pixels = image_input["pixel_values"]
        h, w = self.g2tr_grid
        images = [unnormalize(p, *self.g2tr_norm) for p in pixels]
        pieces, _ = self.g2tr(features, [(h, w)] * len(images), images, "LLaVA")
        size = self.config.vision_config.image_size
        n = llava_tokens_per_image(self.config, size, size)
        check_rows([p.shape[0] for p in pieces], self.g2tr.cfg.budgets([n] * len(images)), "LLaVA")
        return tuple(pieces)


# -- Qwen2.5-VL (M-RoPE) ------------------------------------------------------------------

def _always_on() -> bool:
    return True


class G2TRQwen2_5_VLProcessingInfo(Qwen2_5_VLProcessingInfo):
    def g2tr(self) -> Optional[ServingConfig]:
        return serving_config(self.get_hf_config())

    def get_supported_mm_limits(self) -> Mapping[str, Optional[int]]:
        limits = super().get_supported_mm_limits()
        # Videos are not reduced, and their tokens would need the same position hook: with
        # G2TR on, vLLM itself rejects video inputs (limit 0) instead of serving them differently.
        return {**limits, "video": 0} if self.g2tr() is not None else limits

    def get_num_image_tokens(self, *, image_width, image_height, image_processor, mm_kwargs) -> int:
        n = super().get_num_image_tokens(
            image_width=image_width, image_height=image_height, image_processor=image_processor, mm_kwargs=mm_kwargs
        )
        cfg = self.g2tr()
        return n if cfg is None else cfg.budgets([n])[0]


def qwen_tokens_per_image(grid_thw, merge_size: int) -> int:
    """N: the merged tokens of an image, as vLLM's Qwen2.5-VL processor counts placeholders."""
    return int(torch.as_tensor(grid_thw).prod()) // (merge_size * merge_size)


class G2TRQwen2_5_VLMultiModalProcessor(Qwen2_5_VLMultiModalProcessor):
    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        cfg = serving_config(self.info.get_hf_config())
        if cfg is None:
            return updates
        merge = self.info.get_hf_config().vision_config.spatial_merge_size
        out = []
        for update in updates:
            if update.modality != "image":
                out.append(update)
                continue
            token = update.target[0]

            def replacement(item_idx: int, token=token):
                grid = out_mm_kwargs["image"][item_idx]["image_grid_thw"].data
                return [token] * cfg.budgets([qwen_tokens_per_image(grid, merge)])[0]

            out.append(PromptReplacement(modality="image", target=update.target, replacement=replacement))
        return out


@MULTIMODAL_REGISTRY.register_processor(
    G2TRQwen2_5_VLMultiModalProcessor, info=G2TRQwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class G2TRQwen2_5_VLForConditionalGeneration(_G2TRModel, Qwen2_5_VLForConditionalGeneration):
    """M-RoPE: a kept token keeps the (t, h, w) position it had in the unreduced image, and every
    text token keeps its unreduced position (text after an image starts max(h, w) past it).

    Text positions depend only on the grid, so get_mrope_input_positions sets them up front;
    the kept tokens' positions are known only after the reduction, so embed_multimodal
    appends them to the embeddings as 4 extra channels (t, h, w, row in the placeholder run),
    the layout of vLLM's multimodal-pruning interface (SupportsMultiModalPruning, EVS), and
    recompute_mrope_positions (that interface's hook) writes them into the request's
    positions before the prefill.
    vLLM calls that hook only when multimodal pruning is enabled, which it ties to video
    pruning: the worker's copy of the multimodal config is told pruning is on (what vLLM's
    GPU runners read after loading), and g2tr_mrope asks the CPU runner (see
    integrations.vllm._enable_cpu_pruning_hook). Videos are refused under G2TR, so no video
    path changes. If the hook does not run, the extra channels reach vLLM's embedding merge
    and it fails: never a silently wrong position.
    """

    g2tr_mrope = False

    def g2tr_setup(self, vllm_config) -> None:
        # The image-embedding path below replaces vLLM's EVS one; never EVS-prune as well.
        self.is_multimodal_pruning_enabled = False
        # The encoder CUDA-graph path would bypass embed_multimodal: keep it eager.
        self.supports_encoder_cudagraph = False
        self.g2tr_mrope = True
        object.__setattr__(vllm_config.model_config.multimodal_config, "is_multimodal_pruning_enabled", _always_on)

    def _g2tr_images(self, pixel_values: torch.Tensor, grid_thw: List[List[int]]) -> List[torch.Tensor]:
        """The images the vision tower saw, [3, H, W] in [-1, 1], from its flattened patches."""
        vc = self.config.vision_config
        pixels = self.visual.input_norm(pixel_values, torch.float32)  # as the tower normalises them
        frames = qwen_patches_to_images(pixels, grid_thw, vc.patch_size, vc.temporal_patch_size, vc.spatial_merge_size)
        return [unnormalize(f, *self.g2tr_norm) for f in frames]

    def embed_multimodal(self, **kwargs: object):
        if self.g2tr is None:
            return super().embed_multimodal(**kwargs)
        inputs = self._parse_and_validate_multimodal_inputs(**kwargs)
        if inputs.get("video") is not None:
            raise ValueError("g2tr.vllm: Qwen2.5-VL video inputs are not served with G2TR")
        image_input = inputs.get("image")
        if image_input is None:
            return []
        if image_input["type"] != "pixel_values":
            raise ValueError("g2tr.vllm: image embeddings carry no pixels for the VAE anchors; send images")
        grid_thw = image_input["image_grid_thw"].tolist()
        m = self.config.vision_config.spatial_merge_size
        for b, (t, _, _) in enumerate(grid_thw):
            if t != 1:
                raise ValueError(f"g2tr.vllm: Qwen2.5-VL image {b} has {t} temporal patches; images have 1")
        grids = [(h // m, w // m) for _, h, w in grid_thw]
        features = self._process_image_input(image_input)
        images = self._g2tr_images(image_input["pixel_values"], grid_thw)
        pieces, out = self.g2tr(list(features), grids, images, "Qwen2.5-VL")
        check_rows(
            [x.shape[0] for x in pieces],
            self.g2tr.cfg.budgets([qwen_tokens_per_image(g, m) for g in grid_thw]),
            "Qwen2.5-VL",
        )
        embeds = []
        cu = out.cu_seqlens.tolist()
        offset = 0
        for b, ((h, w), rows) in enumerate(zip(grids, pieces)):
            exact = {torch.bfloat16: 256, torch.float16: 2048}.get(rows.dtype)
            if exact is not None and max(h, w) > exact:
                raise ValueError(
                    f"g2tr.vllm: Qwen2.5-VL image {b}: a {h} x {w} grid's positions are not exact in {rows.dtype} "
                    "embedding channels (vLLM's pruning layout); serve in float32 or use smaller images"
                )
            local = out.keep_idx[cu[b] : cu[b + 1]] - offset
            offset += h * w
            # (t, h, w) of each kept token; the 4th channel of vLLM's layout is unused here.
            positions = torch.stack([torch.zeros_like(local), local // w, local % w, torch.zeros_like(local)], dim=1)
            embeds.append(torch.cat([rows, positions.to(rows.dtype)], dim=1))
        return tuple(embeds)

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        """Write the kept tokens' positions (base + (t, h, w)) into their placeholder rows.

        Text positions are already right (get_mrope_input_positions). The pieces handed over
        are the images whose placeholders are scheduled, in prompt order, starting with the
        first placeholder run that ends after num_computed_tokens; only that first one can be
        cut by chunked prefill (vLLM slices it from num_computed_tokens on). vLLM's EVS version
        instead finds media by vision-start tokens from a cursor it advances by the embedding
        count only, which misplaces a second image after long text.
        """
        if self.g2tr is None:
            return super().recompute_mrope_positions(
                input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens
            )
        ids = torch.as_tensor(input_ids, device=mrope_positions.device).long().reshape(-1)
        is_image = ids == self.config.image_token_id
        change = torch.diff(is_image.int(), prepend=torch.zeros(1, dtype=torch.int, device=ids.device))
        starts = (change == 1).nonzero()[:, 0].tolist()
        ends = (change == -1).nonzero()[:, 0].tolist() + ([ids.numel()] if bool(is_image[-1]) else [])
        runs = [(a, e) for a, e in zip(starts, ends) if e > num_computed_tokens]
        positions = mrope_positions.clone()
        embeds = []
        for i, (piece, (start, end)) in enumerate(zip(multimodal_embeddings, runs)):
            channels = piece[:, -4:].long().T
            first = start + (max(num_computed_tokens - start, 0) if i == 0 else 0)
            rows = torch.arange(first, first + piece.shape[0], device=positions.device)
            if first + piece.shape[0] > end:
                raise RuntimeError("g2tr.vllm: Qwen2.5-VL image rows do not fit their placeholder run")
            base = positions[0, start - 1] + 1 if start > 0 else 0
            positions[:, rows] = (channels[:3] + base).to(positions.dtype)
            embeds.append(piece[:, :-4])
        if len(embeds) != len(multimodal_embeddings):
            raise RuntimeError(
                f"g2tr.vllm: {len(multimodal_embeddings)} Qwen2.5-VL image pieces for {len(runs)} placeholder runs"
            )
        delta = int(positions.max() + 1 - ids.numel()) if positions.numel() else -ids.numel()
        return embeds, positions, delta

    def get_mrope_input_positions(self, input_tokens: list, mm_features: list) -> Tuple[torch.Tensor, int]:
        if self.g2tr is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        m = self.config.vision_config.spatial_merge_size
        parts: List[np.ndarray] = []
        st = st_idx = 0
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            if feature.modality != "image":
                raise ValueError(f"g2tr.vllm: Qwen2.5-VL {feature.modality} inputs are not served with G2TR")
            _, h, w = feature.data["image_grid_thw"].data.tolist()
            h, w = h // m, w // m
            offset, k = feature.mm_position.offset, feature.mm_position.length
            text = offset - st
            parts.append(np.broadcast_to(np.arange(text), (3, text)) + st_idx)
            base = st_idx + text
            # Stand-ins until recompute_mrope_positions writes the kept tokens' own positions.
            idx = np.arange(k)
            parts.append(np.stack([np.zeros_like(idx), idx // w, idx % w]) + base)
            st, st_idx = offset + k, base + max(h, w)
        if st < len(input_tokens):
            text = len(input_tokens) - st
            parts.append(np.broadcast_to(np.arange(text), (3, text)) + st_idx)
        positions = np.concatenate(parts, axis=1).reshape(3, -1) if parts else np.zeros((3, 0), dtype=np.int64)
        delta = int(positions.max() + 1 - len(input_tokens)) if positions.size else 0
        return torch.from_numpy(np.ascontiguousarray(positions)), delta


__all__ = [
    "G2TRLlavaForConditionalGeneration",
    "G2TRQwen2_5_VLForConditionalGeneration",
    "llava_grid",
    "llava_tokens_per_image",
    "qwen_tokens_per_image",
]

