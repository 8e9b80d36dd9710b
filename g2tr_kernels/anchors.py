"""Stage I: anchors from the generation VAE's latents (SPEC.md §2).

    anchors, anchor_grids = anchors_from_latents(latents, model.vae2llm, patch=2, pool=2, like=vit_tokens)
    out = g2tr_kernels.reduce(vit_tokens, anchors, vit_grids, anchor_grids)

latents: one [C, H', W'] latent per image (sizes may differ), or a batched [B, C, H', W']
tensor (video VAEs' [C, 1, H', W'] / [B, C, 1, H', W'] with one frame are accepted too).
Per image:
  1. optional p x p patchify: an h x w grid (h = H' // p, the latent is cropped like BAGEL
     does) of p*p*C vectors laid out (p, q, c), i.e. einsum("chpwq->hwpqc");
  2. q x q average pooling; an edge block that sticks out of the grid averages only the
     cells it contains, so the pooled grid is ceil(h / q) x ceil(w / q). pool="auto" picks,
     per image and per axis, the smallest q whose pooled grid is no finer than that image's
     ViT grid: q = ceil(h / h_v) (see auto_pool);
  3. projection to the LLM width D: a module / callable applied to the [M, p*p*C] rows
     (BAGEL: its trained vae2llm Linear), or "interpolate": the C' channels stretched to D
     by 1-D linear interpolation along the channel axis, align_corners=False (InternVL-U).
Anchors come back packed image after image, [sum(h_a * w_a), D], with their grids; like=tokens
gives them the tokens' dtype and device, which reduce requires.

Latents from a diffusers VAE go through VAE_ADAPTERS: one row per VAE class saying how its
encoder is called and how its latent is normalised before the generation transformer sees
it, as that model's diffusers pipeline does (encode_latents / normalize_latents).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ._checks import grid_pairs

Projection = Union[str, Callable[[torch.Tensor], torch.Tensor]]
Latents = Union[torch.Tensor, Sequence[torch.Tensor]]
Pool = Union[int, Tuple[int, int], str]
Grids = Sequence  # [(h, w), ...] or [h0, w0, h1, w1, ...], host ints

_OP = "g2tr.anchors"


def patchify(latent: torch.Tensor, patch: int) -> torch.Tensor:
    """[C, H', W'] -> [H' // p, W' // p, p * p * C] in BAGEL's (p, q, c) order."""
    c, height, width = latent.shape
    h, w = height // patch, width // patch
    if h == 0 or w == 0:
        raise ValueError(f"g2tr.anchors: a {height} x {width} latent is smaller than one {patch} x {patch} patch")
    x = latent[:, : h * patch, : w * patch].reshape(c, h, patch, w, patch)
    return torch.einsum("chpwq->hwpqc", x).reshape(h, w, patch * patch * c)


def _pool_pair(pool) -> Tuple[int, int]:
    """An explicit pool: q (square blocks) or (q_h, q_w), each an integer >= 1."""
    pair = tuple(pool) if isinstance(pool, (tuple, list)) else (pool, pool)
    try:
        qh, qw = (operator.index(q) for q in pair)
    except (TypeError, ValueError):
        qh = qw = 0
    if len(pair) != 2 or isinstance(pool, bool) or qh < 1 or qw < 1:
        raise ValueError(f"g2tr.anchors: pool must be 'auto', an integer >= 1 or a pair of them, got {pool!r}")
    return qh, qw


def pool_grid(grid: torch.Tensor, pool) -> torch.Tensor:
    """Average q_h x q_w blocks of an [h, w, F] grid; partial edge blocks average the cells they hold.

    pool: q or (q_h, q_w). Returns [ceil(h / q_h), ceil(w / q_w), F] in fp32.
    """
    qh, qw = _pool_pair(pool)
    h, w, f = grid.shape
    x = grid.float()
    if qh == 1 and qw == 1:
        return x
    h_a, w_a = math.ceil(h / qh), math.ceil(w / qw)
    # Zero padding plus a count of the real cells in each block gives exact partial means;
    # avg_pool2d's divisor rules for ceil_mode overhangs are not something to lean on.
    padded = x.new_zeros(h_a * qh, w_a * qw, f)
    padded[:h, :w] = x
    count = x.new_zeros(h_a * qh, w_a * qw)
    count[:h, :w] = 1.0
    total = padded.reshape(h_a, qh, w_a, qw, f).sum(dim=(1, 3))
    cells = count.reshape(h_a, qh, w_a, qw).sum(dim=(1, 3))
    return total / cells[..., None]


def auto_pool(latent_grid: Tuple[int, int], vit_grid: Tuple[int, int]) -> Tuple[int, int]:
    """pool="auto": per axis, the smallest q with ceil(h / q) <= h_v, i.e. q = ceil(h / h_v).

    Why: reduce maps ViT token row r to anchor row r * h_a // h_v. With h_a <= h_v that map
    hits every anchor row, so every pooled cell is some token's anchor and covers at least
    that token's footprint of the latent. With a finer anchor grid (pool 1 on a 448 InternVL
    tile: 56 x 56 latent cells for 16 x 16 tokens) each token compares itself with one of the
    ~12 latent cells under it, and the cells between the sampled ones are never looked at.
    Larger q than this would merge the areas of several tokens into one anchor for no reason.
    A latent grid already no finer than the ViT grid is not pooled (q = 1): nothing is upsampled.
    """
    (h, w), (h_v, w_v) = latent_grid, vit_grid
    return max(1, -(-h // h_v)), max(1, -(-w // w_v))


def interpolate_channels(vectors: torch.Tensor, dim: int) -> torch.Tensor:
    """[M, C] -> [M, D]: 1-D linear interpolation along the channel axis, align_corners=False."""
    return F.interpolate(vectors[:, None, :], size=dim, mode="linear", align_corners=False)[:, 0, :]


def _one_frame(z: torch.Tensor, b: int) -> torch.Tensor:
    """A video VAE's [C, T, H', W'] latent of one image (T = 1) -> [C, H', W']."""
    if z.shape[1] != 1:
        raise ValueError(
            f"g2tr.anchors: latent of image {b} has {z.shape[1]} frames (shape {list(z.shape)}); "
            "anchors take the latent of one image (T = 1)"
        )
    return z[:, 0]


def _as_latent_list(latents: Latents, sizes) -> List[torch.Tensor]:
    if isinstance(latents, torch.Tensor):
        if latents.dim() == 3:
            latents = [latents]
        elif latents.dim() in (4, 5):
            latents = list(latents.unbind(0))
        else:
            raise ValueError(
                f"g2tr.anchors: latents must be [C, H', W'], [B, C, H', W'] ([B, C, 1, H', W'] for video VAEs) "
                f"or a list of [C, H', W'], got shape {list(latents.shape)}"
            )
    latents = list(latents)
    for b, z in enumerate(latents):
        if isinstance(z, torch.Tensor) and z.dim() == 4:
            latents[b] = z = _one_frame(z, b)
        if not isinstance(z, torch.Tensor) or z.dim() != 3:
            desc = list(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"g2tr.anchors: latent of image {b} must be a [C, H', W'] tensor, got {desc}")
        if not z.is_floating_point():
            raise TypeError(f"g2tr.anchors: latent of image {b} must be floating point, got {z.dtype}")
    if sizes is not None:
        sizes = [(int(h), int(w)) for h, w in sizes]
        if len(sizes) != len(latents):
            raise ValueError(f"g2tr.anchors: sizes has {len(sizes)} entries but there are {len(latents)} latents")
        # A padded batch: each latent holds its own image in the top-left corner.
        latents = [z[:, :h, :w] for z, (h, w) in zip(latents, sizes)]
    return latents


def _vit_grid_pairs(vit_grids, n_images: int):
    if vit_grids is None:
        return None
    pairs = grid_pairs(_OP, "vit_grids", vit_grids)
    if len(pairs) != n_images:
        raise ValueError(f"g2tr.anchors: vit_grids describe {len(pairs)} images but there are {n_images} latents")
    return pairs


def _placed(anchors: torch.Tensor, dtype, like, default_dtype: torch.dtype) -> torch.Tensor:
    """One cast to the output dtype (dtype=, else like's, else the default) and like's device."""
    if like is not None and not isinstance(like, torch.Tensor):
        raise TypeError(f"g2tr.anchors: like must be a tensor (the ViT tokens), got {type(like).__name__}")
    dtype = dtype or (like.dtype if like is not None else default_dtype)
    device = like.device if like is not None else anchors.device
    return anchors.to(device=device, dtype=dtype).contiguous()


def anchors_from_latents(
    latents: Latents,
    projection: Projection,
    patch: int = 1,
    pool: Pool = 1,
    dim: Optional[int] = None,
    sizes: Optional[Sequence[Tuple[int, int]]] = None,
    dtype: Optional[torch.dtype] = None,
    *,
    vit_grids: Optional[Grids] = None,
    like: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
    """Anchors [M, D] and anchor_grids [(h_a, w_a), ...] from per-image latents, used as given.

    latents are taken as they are (already normalised: see encode_latents / normalize_latents).
    projection: a module / callable mapping [M, patch*patch*C] to [M, D] (BAGEL's vae2llm),
    or "interpolate" (needs dim = D). pool: q, (q_h, q_w) or "auto" (needs vit_grids, the ViT
    grid of each image; see auto_pool). The default here is the recipe as written, 1;
    anchors_from_vae / prepare_anchors / apply_g2tr default to "auto". sizes: the real
    (H', W') of each latent when `latents` is a padded batch. like: the ViT tokens; the anchors
    come back in their dtype and on their device, as reduce requires. dtype: an explicit output
    dtype (default: like's, else the projection's output, or the latent dtype for "interpolate").
    """
    if isinstance(projection, str):
        if projection != "interpolate":
            raise ValueError(f"g2tr.anchors: projection must be a module, a callable or 'interpolate', "
                             f"got {projection!r}")
        if dim is None or int(dim) < 1:
            raise ValueError("g2tr.anchors: projection='interpolate' needs dim = the LLM hidden size D (>= 1)")
    elif not callable(projection):
        raise TypeError(f"g2tr.anchors: projection must be a module, a callable or 'interpolate', "
                        f"got {type(projection).__name__}")
    if int(patch) != patch or patch < 1:
        raise ValueError(f"g2tr.anchors: patch must be an integer >= 1, got {patch}")
    auto = isinstance(pool, str)
    if auto and pool != "auto":
        raise ValueError(f"g2tr.anchors: pool must be 'auto', an integer >= 1 or a pair of them, got {pool!r}")
    if not auto:
        _pool_pair(pool)
    latents = _as_latent_list(latents, sizes)
    if not latents:
        raise ValueError("g2tr.anchors: no latents given")
    vit = _vit_grid_pairs(vit_grids, len(latents))
    if auto and vit is None:
        raise ValueError(
            "g2tr.anchors: pool='auto' needs vit_grids= (the ViT grid (h_v, w_v) of each image) to size the pool; "
            "or pass an integer pool"
        )

    pooled, grids = [], []
    for b, z in enumerate(latents):
        grid = patchify(z, patch) if patch > 1 else z.permute(1, 2, 0)
        p = pool_grid(grid, auto_pool(grid.shape[:2], vit[b]) if auto else pool)
        grids.append((p.shape[0], p.shape[1]))
        pooled.append(p.reshape(-1, p.shape[-1]))
    vectors = torch.cat(pooled)

    if isinstance(projection, str):
        anchors = interpolate_channels(vectors, int(dim))
        default_dtype = latents[0].dtype
    else:
        weight = next((t for t in getattr(projection, "parameters", lambda: iter(()))()), None)
        # Run the projection in its own dtype (a bf16 vae2llm takes bf16 rows).
        anchors = projection(vectors.to(weight.dtype) if weight is not None and weight.is_floating_point() else vectors)
        if dim is not None and anchors.shape[-1] != int(dim):
            raise ValueError(f"g2tr.anchors: the projection returns D = {anchors.shape[-1]}, expected dim = {dim}")
        default_dtype = anchors.dtype
    return _placed(anchors, dtype, like, default_dtype), grids


# -- diffusers VAEs: one adapter per class ---------------------------------------------------
#
# Each normaliser takes the encoder's raw latent [B, C, H', W'] (mode of the posterior, or
# .latent / .latents; a video VAE's single frame already squeezed) and returns the latent
# exactly as that model's diffusers pipeline hands it to the generation transformer, with
# the same operations in the same dtype, so the anchors see the same numbers the model does.


def _config_channels(vae, name: str, z: torch.Tensor) -> torch.Tensor:
    values = getattr(vae.config, name)
    if len(values) != z.shape[1]:
        raise ValueError(
            f"g2tr.anchors: {type(vae).__name__}.config.{name} has {len(values)} entries but the latent has "
            f"{z.shape[1]} channels"
        )
    return torch.tensor(values).view(1, z.shape[1], 1, 1).to(z.device, z.dtype)


def _scale_shift(vae, z: torch.Tensor) -> torch.Tensor:
    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    shift = getattr(config, "shift_factor", None)
    if mean is not None and std is not None:
        if shift:
            raise NotImplementedError(
                f"g2tr.anchors: {type(vae).__name__}.config sets both latents_mean / latents_std and shift_factor; "
                "no diffusers pipeline applies both. Normalise the latents as your pipeline does and pass them "
                "as latents (vae_latents= in apply_g2tr)"
            )
        # pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl_img2img.py, prepare_latents:
        #   init_latents = (init_latents - latents_mean) * self.vae.config.scaling_factor / latents_std
        return (z - _config_channels(vae, "latents_mean", z)) * config.scaling_factor / _config_channels(
            vae, "latents_std", z
        )
    # pipelines/flux/pipeline_flux_img2img.py and stable_diffusion_3 (_encode_vae_image):
    #   image_latents = (image_latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor
    # pipelines/stable_diffusion/pipeline_stable_diffusion_img2img.py (no shift_factor):
    #   init_latents = self.vae.config.scaling_factor * init_latents
    # pipelines/sana/pipeline_sana_controlnet.py (AutoencoderDC, no shift_factor):
    #   control_image = self.vae.encode(control_image).latent * self.vae.config.scaling_factor
    # AutoencoderTiny takes the place of the pipeline's AutoencoderKL (taesd, taesdxl, taef1 with its
    # own shift_factor / scaling_factor), so the same line applies.
    if shift is not None:
        z = z - shift
    return z * config.scaling_factor


def _flux2(vae, z: torch.Tensor) -> torch.Tensor:
    # pipelines/flux2/pipeline_flux2.py, _encode_vae_image: _patchify_latents (2 x 2 patches, channels in
    # (c, p, q) order: [B, 4C, H'/2, W'/2]), then the VAE's batch-norm running statistics:
    #   latents_bn_mean = self.vae.bn.running_mean.view(1, -1, 1, 1).to(device, dtype)
    #   latents_bn_std = torch.sqrt(self.vae.bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps)
    #   image_latents = (image_latents - latents_bn_mean) / latents_bn_std
    # An odd last latent row / column does not fill a patch and is cropped, as patchify() does
    # (the pipeline only ever sees sizes that are multiples of 16 pixels).
    ph, pw = vae.config.patch_size
    b, c, height, width = z.shape
    h, w = height // ph, width // pw
    if h == 0 or w == 0:
        raise ValueError(f"g2tr.anchors: a {height} x {width} latent is smaller than one {ph} x {pw} patch")
    z = z[:, :, : h * ph, : w * pw].reshape(b, c, h, ph, w, pw).permute(0, 1, 3, 5, 2, 4).reshape(b, c * ph * pw, h, w)
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(z.device, z.dtype)
    return (z - mean) / std


def _mean_over_std(vae, z: torch.Tensor) -> torch.Tensor:
    # pipelines/qwenimage/pipeline_qwenimage_edit.py (and qwenimage21), _encode_vae_image:
    #   image_latents = (image_latents - latents_mean) / latents_std
    return (z - _config_channels(vae, "latents_mean", z)) / _config_channels(vae, "latents_std", z)


def _mean_times_inv_std(vae, z: torch.Tensor) -> torch.Tensor:
    # pipelines/wan/pipeline_wan_i2v.py, prepare_latents (the reciprocal is taken in the latent dtype):
    #   latents_std = 1.0 / torch.tensor(self.vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(device, dtype)
    #   latent_condition = (latent_condition - latents_mean) * latents_std
    return (z - _config_channels(vae, "latents_mean", z)) * (1.0 / _config_channels(vae, "latents_std", z))


@dataclass(frozen=True)
class VAEAdapter:
    """How one diffusers VAE class is encoded and normalised (one row of VAE_ADAPTERS)."""

    video: bool  # encode() takes [B, C, T, H, W]: an image goes in as T = 1 and its latent frame comes back
    output: str  # encoder output field: "latent_dist" (KL: its mode / mean), "latent", "latents"
    normalise: Callable[[Any, torch.Tensor], torch.Tensor]
    formula: str  # the normalisation, for the README table and error messages
    pipeline: str  # the diffusers pipeline code it follows


VAE_ADAPTERS: Dict[str, VAEAdapter] = {
    "AutoencoderKL": VAEAdapter(
        False, "latent_dist", _scale_shift,
        "`(z - shift_factor) * scaling_factor`, or `z * scaling_factor` without a shift_factor; with "
        "latents_mean / latents_std in the config: `(z - mean) * scaling_factor / std`",
        "flux, stable_diffusion_3, stable_diffusion, stable_diffusion_xl img2img",
    ),
    "AutoencoderKLFlux2": VAEAdapter(
        False, "latent_dist", _flux2,
        "2 x 2 patchify to `[4C, H'/2, W'/2]` (channels in c, p, q order), then "
        "`(z - bn.running_mean) / sqrt(bn.running_var + batch_norm_eps)`",
        "flux2 `_encode_vae_image`",
    ),
    "AutoencoderKLQwenImage": VAEAdapter(
        True, "latent_dist", _mean_over_std, "`(z - latents_mean) / latents_std` per channel",
        "qwenimage edit `_encode_vae_image`",
    ),
    "AutoencoderKLQwenImage21": VAEAdapter(
        True, "latent_dist", _mean_over_std, "`(z - latents_mean) / latents_std` per channel",
        "qwenimage21 `_encode_vae_image`",
    ),
    "AutoencoderKLWan": VAEAdapter(
        True, "latent_dist", _mean_times_inv_std, "`(z - latents_mean) * (1 / latents_std)` per channel",
        "wan i2v `prepare_latents`",
    ),
    "AutoencoderDC": VAEAdapter(
        False, "latent", _scale_shift, "`z * scaling_factor`", "sana controlnet (control image)",
    ),
    "AutoencoderTiny": VAEAdapter(
        False, "latents", _scale_shift, "`(z - shift_factor) * scaling_factor` (shift_factor 0 by default)",
        "that of the VAE it stands in for (stable_diffusion, flux img2img)",
    ),
}


def vae_adapter(vae) -> VAEAdapter:
    """The VAE_ADAPTERS row for `vae` (its class or the nearest supported base class).

    Raises NotImplementedError naming the supported classes and the way out for any other VAE.
    """
    cls = type(getattr(vae, "_orig_mod", vae))  # a torch.compile'd VAE wraps the module
    for base in cls.__mro__:
        if base.__name__ in VAE_ADAPTERS:
            return VAE_ADAPTERS[base.__name__]
    raise NotImplementedError(
        f"g2tr.anchors: no VAE adapter for {cls.__name__}; supported: {', '.join(VAE_ADAPTERS)}. For another "
        "VAE, encode and normalise the latents as its pipeline does and pass them instead: "
        "anchors_from_latents(latents, ...), or vae_latents= / anchors= to an apply_g2tr model's forward / generate"
    )


def vae_support_table() -> str:
    """VAE_ADAPTERS as the Markdown table in the README."""
    rows = [
        "| VAE class | encoder input | latent | normalisation (as the pipeline applies it) | diffusers pipeline |",
        "|---|---|---|---|---|",
    ]
    for name, a in VAE_ADAPTERS.items():
        shape = "`[B, C_in, 1, H, W]` (video, T = 1)" if a.video else "`[B, C_in, H, W]`"
        latent = {"latent_dist": "`latent_dist.mode()`", "latent": "`.latent`", "latents": "`.latents`"}[a.output]
        rows.append(f"| `{name}` | {shape} | {latent} | {a.formula} | {a.pipeline} |")
    return "\n".join(rows)


def _image_channels(vae, adapter: VAEAdapter) -> Optional[int]:
    """The channels of the images the VAE takes (3 = RGB; AutoencoderKLQwenImage21 takes RGBA)."""
    config = getattr(vae, "config", None)
    channels = getattr(config, "input_channels", None) or getattr(config, "in_channels", None)
    patch = getattr(config, "patch_size", None) if adapter.video else None
    # Wan 2.2 / Qwen-Image 2 patchify pixels inside encode(): in_channels counts the patchified ones.
    return channels // (patch * patch) if channels and patch else channels


def _latent_of(out, adapter: VAEAdapter, sample: str) -> torch.Tensor:
    if adapter.output == "latent_dist":
        dist = out.latent_dist
        return dist.mode() if sample == "mode" else dist.mean
    return getattr(out, adapter.output)


def normalize_latents(vae, latents: Latents) -> List[torch.Tensor]:
    """Raw latents of `vae` (what its encoder returns: the posterior's mode, .latent, .latents)
    -> the latents its pipeline feeds the generation transformer, one [C', h, w] per image.

    For a model that already holds the raw encoder output: normalise it like the adapter
    would, without encoding again. latents: a list of [C, H', W'] (sizes may differ) or a
    batched [B, C, H', W']; video VAEs' [C, 1, H', W'] / [B, C, 1, H', W'] too.
    encode_latents(vae, x) == normalize_latents(vae, encode_latents(vae, x, scale=False)).
    """
    adapter = vae_adapter(vae)
    return [adapter.normalise(vae, z[None])[0] for z in _as_latent_list(latents, None)]


@torch.no_grad()
def encode_latents(
    vae,
    images: Union[torch.Tensor, Sequence[torch.Tensor]],
    sample: str = "mode",
    scale: bool = True,
) -> List[torch.Tensor]:
    """Latents [C', h, w] of each image with a diffusers VAE of VAE_ADAPTERS.

    images: [B, C_in, H, W] or a list of [C_in, H, W] (sizes may differ; C_in = 3 for RGB, 4 for
    AutoencoderKLQwenImage21's RGBA), in the VAE's input range ([-1, 1] for the diffusers VAEs);
    video VAEs get them as one frame (T = 1). sample: "mode"
    or "mean" of a KL VAE's posterior (the same for a Gaussian; the pipelines' "argmax").
    scale=True normalises the latent as the model's pipeline does (VAE_ADAPTERS: scaling and
    shift factors, latents_mean / latents_std, Flux2's patchify and batch-norm statistics);
    scale=False returns the encoder's raw latent (normalize_latents applies the rest).
    Unknown VAE classes raise NotImplementedError (pass precomputed latents instead).
    """
    if sample not in ("mode", "mean"):
        raise ValueError(f"g2tr.anchors: sample must be 'mode' or 'mean', got {sample!r}")
    adapter = vae_adapter(vae)
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            images = [images]
        elif images.dim() != 4:
            raise ValueError(
                f"g2tr.anchors: images must be [B, C_in, H, W] or a list of [C_in, H, W], got {list(images.shape)}"
            )
    else:
        images = list(images)
    channels = _image_channels(vae, adapter)
    for b, img in enumerate(images):  # a batch tensor iterates image by image too
        if not isinstance(img, torch.Tensor) or img.dim() != 3:
            desc = list(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
            raise ValueError(f"g2tr.anchors: image {b} must be a [C_in, H, W] tensor, got {desc}")
        if channels is not None and img.shape[0] != channels:
            raise ValueError(
                f"g2tr.anchors: image {b} has {img.shape[0]} channels but {type(vae).__name__} takes {channels}"
            )
    param = next(vae.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32

    def encode(batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(device=device, dtype=dtype)
        z = _latent_of(vae.encode(x[:, :, None] if adapter.video else x), adapter, sample)
        if adapter.video:
            z = z[:, :, 0]  # one frame in, one latent frame out (causal VAEs encode frame 0 alone)
        return adapter.normalise(vae, z) if scale else z

    if isinstance(images, torch.Tensor):
        return list(encode(images).unbind(0))
    # Images of different sizes cannot share a batch; same-size runs could, one call each is simpler.
    return [encode(img[None])[0] for img in images]


def anchors_from_vae(
    vae,
    images: Union[torch.Tensor, Sequence[torch.Tensor]],
    projection: Projection = "interpolate",
    patch: int = 1,
    pool: Pool = "auto",
    dim: Optional[int] = None,
    sample: str = "mode",
    scale: bool = True,
    dtype: Optional[torch.dtype] = None,
    *,
    vit_grids: Optional[Grids] = None,
    like: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
    """encode_latents -> anchors_from_latents. Returns (anchors [M, D], anchor_grids).

    pool defaults to "auto", which needs vit_grids (the ViT grid of each image); like=tokens
    gives the anchors the tokens' dtype and device.
    """
    latents = encode_latents(vae, images, sample=sample, scale=scale)
    return anchors_from_latents(
        latents, projection, patch=patch, pool=pool, dim=dim, dtype=dtype, vit_grids=vit_grids, like=like
    )


def prepare_anchors(
    vit_grids: Grids,
    vae=None,
    images=None,
    vae_latents: Optional[Latents] = None,
    anchors=None,
    projection: Projection = "interpolate",
    patch: int = 1,
    pool: Pool = "auto",
    dim: Optional[int] = None,
    sample: str = "mode",
    scale: bool = True,
    like: Optional[torch.Tensor] = None,
    dtype: Optional[torch.dtype] = None,
) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
    """The anchors for one reduce call of B images, from exactly one of three sources.

    vit_grids: the ViT grid (h_v, w_v) of each of the B images (tiles), in token order.
    - images (with vae): VAE input, [B, 3, H, W] or a list of B [3, H, W] in [-1, 1]; encoded
      and normalised by the VAE's adapter (encode_latents), then the recipe below.
    - vae_latents: precomputed latents, NORMALISED as encode_latents returns them (what the
      generation transformer takes: after scaling / shift, latents_mean / latents_std, or
      Flux2's patchify + batch norm; raw encoder output goes through normalize_latents first),
      one per image: a list of B [C, H', W'] (sizes may differ) or a [B, C, H', W'] batch
      (video VAEs' [C, 1, H', W'] / [B, C, 1, H', W'] too). No VAE call; vae is not needed.
    - anchors: precomputed (anchors [M, D], anchor_grids [(h_a, w_a)] * B), as returned by
      anchors_from_latents / anchors_from_vae; used as they are (checked, then placed like `like`).
    Recipe for images / vae_latents: projection, patch, pool ("auto" by default: the anchor
    grid of each image as fine as its ViT grid, no finer), dim = D. like: the ViT tokens, whose
    dtype and device the anchors take (dtype= overrides the dtype).
    """
    given = [name for name, v in (("images", images), ("vae_latents", vae_latents), ("anchors", anchors))
             if v is not None]
    if len(given) != 1:
        raise ValueError(
            f"g2tr.anchors: give exactly one of images (with vae), vae_latents or anchors, got "
            f"{' and '.join(given) if given else 'none'}"
        )
    vit = grid_pairs(_OP, "vit_grids", vit_grids)
    if images is not None:
        if vae is None:
            raise ValueError("g2tr.anchors: images need a vae to encode them; or pass vae_latents / anchors")
        n = (images.shape[0] if images.dim() == 4 else 1) if isinstance(images, torch.Tensor) else len(images)
        if n != len(vit):
            raise ValueError(f"g2tr.anchors: {n} VAE images for {len(vit)} ViT images (grids); give one per image")
        return anchors_from_vae(
            vae, images, projection, patch=patch, pool=pool, dim=dim, sample=sample, scale=scale, dtype=dtype,
            vit_grids=vit, like=like,
        )
    if vae_latents is not None:
        return anchors_from_latents(
            vae_latents, projection, patch=patch, pool=pool, dim=dim, dtype=dtype, vit_grids=vit, like=like
        )
    if not isinstance(anchors, (tuple, list)) or len(anchors) != 2:
        raise TypeError("g2tr.anchors: anchors must be the pair (anchors [M, D], anchor_grids) of anchors_from_*")
    tensor, anchor_grids = anchors
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or not tensor.is_floating_point():
        desc = f"{list(tensor.shape)} {tensor.dtype}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"g2tr.anchors: anchors must be a floating-point [M, D] tensor, got {desc}")
    pairs = grid_pairs(_OP, "anchor_grids", anchor_grids)
    if len(pairs) != len(vit):
        raise ValueError(f"g2tr.anchors: anchor_grids describe {len(pairs)} images but vit_grids describe {len(vit)}")
    m = sum(h * w for h, w in pairs)
    if tensor.shape[0] != m:
        raise ValueError(f"g2tr.anchors: anchors have M = {tensor.shape[0]} rows but anchor_grids describe {m}")
    if dim is not None and tensor.shape[1] != int(dim):
        raise ValueError(f"g2tr.anchors: anchors have D = {tensor.shape[1]}, expected dim = {dim}")
    return _placed(tensor, dtype, like, tensor.dtype), pairs


__all__ = [
    "VAE_ADAPTERS",
    "VAEAdapter",
    "anchors_from_latents",
    "anchors_from_vae",
    "auto_pool",
    "encode_latents",
    "interpolate_channels",
    "normalize_latents",
    "patchify",
    "pool_grid",
    "prepare_anchors",
    "vae_adapter",
    "vae_support_table",
]
