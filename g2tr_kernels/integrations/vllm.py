"""G2TR inside vLLM: image tokens reduced in the serving engine, switched on per model.

    pip install g2tr_kernels            # beside vLLM; bash tools/vllm_env.sh builds a CPU venv
    llm = vllm.LLM(model=path, hf_overrides={"g2tr": {"keep_ratio": 0.5, "min_keep": 32,
                                                       "pool": "auto", "vae": "/path/to/diffusers/vae"}})
    vllm serve path --hf-overrides '{"g2tr": {"keep_ratio": 0.5, "vae": "/path/to/vae"}}'

vLLM loads `register` (the "vllm.general_plugins" entry point of this package) in every
process it starts. It replaces the classes of the supported architectures with subclasses
(g2tr_kernels.integrations.vllm_models) that behave exactly as vLLM's own unless the model's
HF config has a "g2tr" key. With the key:
  * preprocessing: each image gets K = g2tr_kernels.budgets([N], keep_ratio, min_keep)[0]
    placeholder tokens instead of N (K depends only on N, so it is known before the encoder
    runs, and the scheduler and KV cache see K);
  * in the worker: the vision tower and projector give N tokens per image (in the LLM width);
    the VAE encodes the same image (the vision tower's pixels mapped back to [-1, 1]), anchors
    come from its latent (g2tr_kernels.anchors, "interpolate" to the LLM width), and
    g2tr_kernels.reduce (torch.ops.g2tr.reduce) keeps and merges K of them, on the tokens'
    device. The rows are checked against the placeholder count: vLLM itself would silently
    use the first K rows of a longer output.
Supported: LlavaForConditionalGeneration (1-D RoPE: nothing else changes) and
Qwen2_5_VLForConditionalGeneration (images; M-RoPE positions of the kept tokens are their
original ones, set through vLLM's multimodal-pruning hook). Any other architecture with a
"g2tr" key is refused when vLLM resolves the model class, never run unreduced.

The "g2tr" keys (SERVING_KEYS): keep_ratio, min_keep, merge_weight as g2tr_kernels.reduce;
vae: a folder holding a diffusers VAE (AutoencoderKL.from_pretrained; required); pool: the
anchor pool ("auto", an int or [q_h, q_w]); patch (1); sample ("mode"); vae_dtype
("float32"); backend ("auto").
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

from .. import ops

# Architecture name in an HF config -> the subclass that serves it with G2TR.
MODELS = {
    "LlavaForConditionalGeneration": "g2tr_kernels.integrations.vllm_models:G2TRLlavaForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": (
        "g2tr_kernels.integrations.vllm_models:G2TRQwen2_5_VLForConditionalGeneration"
    ),
}
KEY = "g2tr"
SERVING_KEYS = ("keep_ratio", "min_keep", "merge_weight", "vae", "pool", "patch", "sample", "vae_dtype", "backend")


@dataclass(frozen=True)
class ServingConfig:
    """The validated "g2tr" entry of a model's HF config."""

    vae: str
    keep_ratio: float = 0.5
    min_keep: int = 32
    merge_weight: float = 1.0
    pool: Union[str, int, Tuple[int, int]] = "auto"
    patch: int = 1
    sample: str = "mode"
    vae_dtype: str = "float32"
    backend: str = "auto"

    def budgets(self, lengths: Sequence[int]) -> List[int]:
        """K per image: the placeholder count and the reduced row count both come from here."""
        return ops.budgets(lengths, self.keep_ratio, self.min_keep)


def serving_config(hf_config: Any) -> Optional[ServingConfig]:
    """The G2TR settings of a model, or None when its config has no "g2tr" key (stock vLLM)."""
    raw = getattr(hf_config, KEY, None)
    if raw is None:
        return None
    if isinstance(raw, ServingConfig):
        return raw
    if not isinstance(raw, dict):
        raise TypeError(f"g2tr.vllm: hf_overrides['{KEY}'] must be a dict, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SERVING_KEYS))
    if unknown:
        raise ValueError(f"g2tr.vllm: unknown keys {unknown} in hf_overrides['{KEY}']; known: {list(SERVING_KEYS)}")
    if not raw.get("vae"):
        raise ValueError(
            f"g2tr.vllm: hf_overrides['{KEY}'] needs 'vae': the folder of a diffusers VAE whose latents give "
            "the anchors"
        )
    vae = str(raw["vae"])
    if not os.path.isdir(vae):
        raise ValueError(f"g2tr.vllm: hf_overrides['{KEY}']['vae'] = {vae!r} is not a folder")
    pool = raw.get("pool", "auto")
    if isinstance(pool, list):
        pool = tuple(pool)
    cfg = ServingConfig(
        vae=vae,
        keep_ratio=raw.get("keep_ratio", 0.5),
        min_keep=raw.get("min_keep", 32),
        merge_weight=raw.get("merge_weight", 1.0),
        pool=pool,
        patch=raw.get("patch", 1),
        sample=raw.get("sample", "mode"),
        vae_dtype=raw.get("vae_dtype", "float32"),
        backend=raw.get("backend", "auto"),
    )
    cfg.budgets([1])  # keep_ratio / min_keep checked now, in the process that reads the config
    if cfg.backend not in ops.BACKENDS:
        raise ValueError(f"g2tr.vllm: backend must be one of {ops.BACKENDS}, got {cfg.backend!r}")
    if cfg.vae_dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"g2tr.vllm: vae_dtype must be float32, bfloat16 or float16, got {cfg.vae_dtype!r}")
    return cfg


def check_rows(rows: Sequence[int], placeholders: Sequence[int], model: str) -> None:
    """Each image's embedding rows must equal its placeholder count (vLLM truncates longer ones)."""
    if len(rows) != len(placeholders):
        raise RuntimeError(f"g2tr.vllm: {model} returned {len(rows)} image embeddings for {len(placeholders)} images")
    for b, (got, want) in enumerate(zip(rows, placeholders)):
        if got != want:
            raise RuntimeError(
                f"g2tr.vllm: {model} image {b}: the encoder returned {got} rows but the prompt holds {want} "
                "placeholder tokens for it (G2TR budgets); refusing to let vLLM truncate or fail later"
            )


class Reducer:
    """Anchors from the VAE and the reduction, in a vLLM worker (one per model instance).

    The VAE is loaded lazily on first use and moved to the tokens' device; it is kept outside
    the vLLM module tree so the checkpoint loader neither looks for its weights nor moves it.
    """

    def __init__(self, cfg: ServingConfig, hidden_size: int):
        self.cfg = cfg
        self.hidden_size = int(hidden_size)
        self._vae = None

    def vae(self, device):
        import torch

        if self._vae is None:
            from diffusers import AutoencoderKL

            dtype = getattr(torch, self.cfg.vae_dtype)
            self._vae = AutoencoderKL.from_pretrained(self.cfg.vae, torch_dtype=dtype).eval()
        param = next(self._vae.parameters(), None)
        if param is not None and param.device != device:
            self._vae = self._vae.to(device)
        return self._vae

    def __call__(self, features, grids: Sequence[Tuple[int, int]], images, model: str):
        """features: N_b x D rows per image (a list, or one packed tensor); images: the same
        images for the VAE, each [3, H, W] in [-1, 1]. Returns K_b x D rows per image."""
        import torch

        from ..anchors import anchors_from_vae

        if isinstance(features, torch.Tensor):
            features = list(features) if features.dim() == 3 else [features]
        lengths = [int(f.shape[0]) for f in features]
        for b, ((h, w), n) in enumerate(zip(grids, lengths)):
            if h * w != n:
                raise RuntimeError(f"g2tr.vllm: {model} image {b}: {n} tokens from the encoder, grid {h} x {w}")
        tokens = torch.cat(features) if len(features) > 1 else features[0]
        tokens = tokens.contiguous()
        vae = self.vae(tokens.device)
        anchors, anchor_grids = anchors_from_vae(
            vae, [img.to(tokens.device) for img in images], projection="interpolate", patch=self.cfg.patch,
            pool=self.cfg.pool, dim=self.hidden_size, sample=self.cfg.sample, vit_grids=list(grids), like=tokens,
        )
        out = ops.reduce(
            tokens, anchors, list(grids), anchor_grids, keep_ratio=self.cfg.keep_ratio, min_keep=self.cfg.min_keep,
            merge_weight=self.cfg.merge_weight, backend=self.cfg.backend,
        )
        kept = self.cfg.budgets(lengths)
        pieces = list(torch.split(out.merged, kept))
        return pieces, out


def unnormalize(pixels, mean: Sequence[float], std: Sequence[float]):
    """[..., 3, H, W] pixels normalised for a vision tower -> [-1, 1], the VAE's input range."""
    import torch

    shape = (-1, 1, 1)
    m = torch.as_tensor(list(mean), dtype=torch.float32, device=pixels.device).reshape(shape)
    s = torch.as_tensor(list(std), dtype=torch.float32, device=pixels.device).reshape(shape)
    return (pixels.float() * s + m) * 2.0 - 1.0


def qwen_patches_to_images(pixels, grid_thw, patch: int, temporal_patch: int, merge: int) -> list:
    """Qwen2-VL-style flattened patches [sum(t*h*w), C*tp*p*p] -> one [C, H, W] frame per image.

    The inverse of Qwen2VLImageProcessor's flattening (t, h/m, w/m, m, m, C, tp, p, p); the
    first temporal copy of each image (an image is repeated tp times). Values stay as given.
    """
    images, start = [], 0
    p, tp, m = int(patch), int(temporal_patch), int(merge)
    for t, h, w in (tuple(int(v) for v in g) for g in grid_thw):
        rows = pixels[start : start + t * h * w]
        start += t * h * w
        c = rows.shape[-1] // (tp * p * p)
        x = rows.reshape(t, h // m, w // m, m, m, c, tp, p, p).permute(0, 6, 5, 1, 3, 7, 2, 4, 8)
        images.append(x.reshape(t * tp, c, h * p, w * p)[0])
    return images


def _guard_unsupported(registry) -> None:
    """Refuse a "g2tr" key on an architecture this plugin does not serve.

    vLLM resolves every model through ModelRegistry.inspect_model_cls (after hf_overrides are
    applied to the config); the wrapper only looks at configs that carry the key, so stock
    models resolve exactly as before.
    """
    inspect = registry.inspect_model_cls
    if getattr(inspect, "_g2tr_guard", False):
        return

    def inspect_model_cls(architectures, model_config=None, *args, **kwargs):
        result = inspect(architectures, model_config, *args, **kwargs)
        hf_config = getattr(model_config, "hf_config", None)
        if hf_config is not None and getattr(hf_config, KEY, None) is not None:
            arch = result[1] if isinstance(result, tuple) else None
            if arch not in MODELS:
                raise ValueError(
                    f"g2tr.vllm: the model's config has a '{KEY}' key, but architecture {arch or architectures} is not "
                    f"served with G2TR (supported: {sorted(MODELS)}); remove the key to run it unreduced"
                )
            serving_config(hf_config)
        return result

    inspect_model_cls._g2tr_guard = True
    registry.inspect_model_cls = inspect_model_cls


def _enable_cpu_pruning_hook() -> None:
    """On the CPU, let vLLM call a G2TR model's recompute_mrope_positions.

    vLLM's GPU runner enables its multimodal-pruning hook after loading a model that supports
    it when pruning is on (the G2TR Qwen2.5-VL model tells its multimodal config so); the CPU
    runner overrides load_model and never sets the flag, so on the CPU the hook (EVS too) is
    never called. The wrapper sets it after loading, for models that ask (g2tr_mrope) only.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    load_model = CPUModelRunner.load_model
    if getattr(load_model, "_g2tr_hook", False):
        return

    def load_model_with_hook(self, *args, **kwargs):
        out = load_model(self, *args, **kwargs)
        if getattr(self.get_model(), "g2tr_mrope", False):
            self.is_multimodal_pruning_enabled = True
        return out

    load_model_with_hook._g2tr_hook = True
    CPUModelRunner.load_model = load_model_with_hook


def register() -> None:
    """The vllm.general_plugins entry point: idempotent, cheap (no model module is imported)."""
    from vllm import ModelRegistry

    for arch, target in MODELS.items():
        current = ModelRegistry.models.get(arch)
        if getattr(current, "module_name", None) == target.split(":")[0]:
            continue
        ModelRegistry.register_model(arch, target)
    _guard_unsupported(ModelRegistry)
    _enable_cpu_pruning_hook()


__all__ = [
    "KEY", "MODELS", "Reducer", "ServingConfig", "check_rows", "qwen_patches_to_images", "register", "serving_config",
    "unnormalize",
]

