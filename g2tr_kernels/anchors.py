"""Stage I: anchors from the generation VAE's latents (SPEC.md §2).

    anchors, anchor_grids = anchors_from_latents(latents, projection=model.vae2llm, patch=2, pool=2)
    out = g2tr_kernels.reduce(vit_tokens, anchors.to(vit_tokens.dtype), vit_grids, anchor_grids)

latents: one [C, H', W'] latent per image (sizes may differ), or a batched [B, C, H', W']
tensor. Per image:
  1. optional p x p patchify: an h x w grid (h = H' // p, the latent is cropped like BAGEL
     does) of p*p*C vectors laid out (p, q, c), i.e. einsum("chpwq->hwpqc");
  2. q x q average pooling; an edge block that sticks out of the grid averages only the
     cells it contains, so the pooled grid is ceil(h / q) x ceil(w / q);
  3. projection to the LLM width D: a module / callable applied to the [M, p*p*C] rows
     (BAGEL: its trained vae2llm Linear), or "interpolate": the C' channels stretched to D
     by 1-D linear interpolation along the channel axis, align_corners=False (InternVL-U).
Anchors come back packed image after image, [sum(h_a * w_a), D], with their grids.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

Projection = Union[str, Callable[[torch.Tensor], torch.Tensor]]
Latents = Union[torch.Tensor, Sequence[torch.Tensor]]


def patchify(latent: torch.Tensor, patch: int) -> torch.Tensor:
    """[C, H', W'] -> [H' // p, W' // p, p * p * C] in BAGEL's (p, q, c) order."""
    c, height, width = latent.shape
    h, w = height // patch, width // patch
    if h == 0 or w == 0:
        raise ValueError(f"g2tr.anchors: a {height} x {width} latent is smaller than one {patch} x {patch} patch")
    x = latent[:, : h * patch, : w * patch].reshape(c, h, patch, w, patch)
    return torch.einsum("chpwq->hwpqc", x).reshape(h, w, patch * patch * c)


def pool_grid(grid: torch.Tensor, pool: int) -> torch.Tensor:
    """Average q x q blocks of an [h, w, F] grid; partial edge blocks average the cells they hold.

    Returns [ceil(h / q), ceil(w / q), F] in fp32.
    """
    h, w, f = grid.shape
    x = grid.float()
    if pool == 1:
        return x
    h_a, w_a = math.ceil(h / pool), math.ceil(w / pool)
    # Zero padding plus a count of the real cells in each block gives exact partial means;
    # avg_pool2d's divisor rules for ceil_mode overhangs are not something to lean on.
    padded = x.new_zeros(h_a * pool, w_a * pool, f)
    padded[:h, :w] = x
    count = x.new_zeros(h_a * pool, w_a * pool)
    count[:h, :w] = 1.0
    total = padded.reshape(h_a, pool, w_a, pool, f).sum(dim=(1, 3))
    cells = count.reshape(h_a, pool, w_a, pool).sum(dim=(1, 3))
    return total / cells[..., None]


def interpolate_channels(vectors: torch.Tensor, dim: int) -> torch.Tensor:
    """[M, C] -> [M, D]: 1-D linear interpolation along the channel axis, align_corners=False."""
    return F.interpolate(vectors[:, None, :], size=dim, mode="linear", align_corners=False)[:, 0, :]


def _as_latent_list(latents: Latents, sizes) -> List[torch.Tensor]:
    if isinstance(latents, torch.Tensor):
        if latents.dim() == 3:
            latents = [latents]
        elif latents.dim() == 4:
            latents = list(latents.unbind(0))
        else:
            raise ValueError(
                f"g2tr.anchors: latents must be [C, H', W'], [B, C, H', W'] or a list of [C, H', W'], "
                f"got shape {list(latents.shape)}"
            )
    latents = list(latents)
    for b, z in enumerate(latents):
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


def anchors_from_latents(
    latents: Latents,
    projection: Projection,
    patch: int = 1,
    pool: int = 1,
    dim: Optional[int] = None,
    sizes: Optional[Sequence[Tuple[int, int]]] = None,
    dtype: Optional[torch.dtype] = None,
) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
    """Anchors [M, D] and anchor_grids [(h_a, w_a), ...] from per-image VAE latents.

    projection: a module / callable mapping [M, patch*patch*C] to [M, D] (BAGEL's vae2llm),
    or "interpolate" (needs dim = D). sizes: the real (H', W') of each latent when
    `latents` is a padded batch. dtype: output dtype (default: the projection's output, or
    the latent dtype for "interpolate"); pass the ViT tokens' dtype to feed reduce directly.
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
    for name, value in (("patch", patch), ("pool", pool)):
        if int(value) != value or value < 1:
            raise ValueError(f"g2tr.anchors: {name} must be an integer >= 1, got {value}")
    latents = _as_latent_list(latents, sizes)
    if not latents:
        raise ValueError("g2tr.anchors: no latents given")

    pooled, grids = [], []
    for z in latents:
        grid = patchify(z, patch) if patch > 1 else z.permute(1, 2, 0)
        p = pool_grid(grid, pool)
        grids.append((p.shape[0], p.shape[1]))
        pooled.append(p.reshape(-1, p.shape[-1]))
    vectors = torch.cat(pooled)

    if isinstance(projection, str):
        anchors = interpolate_channels(vectors, int(dim))
        out_dtype = dtype or latents[0].dtype
    else:
        weight = next((t for t in getattr(projection, "parameters", lambda: iter(()))()), None)
        # Run the projection in its own dtype (a bf16 vae2llm takes bf16 rows).
        anchors = projection(vectors.to(weight.dtype) if weight is not None and weight.is_floating_point() else vectors)
        out_dtype = dtype or anchors.dtype
        if dim is not None and anchors.shape[-1] != int(dim):
            raise ValueError(f"g2tr.anchors: the projection returns D = {anchors.shape[-1]}, expected dim = {dim}")
    return anchors.to(out_dtype).contiguous(), grids


@torch.no_grad()
def encode_latents(
    vae,
    images: Union[torch.Tensor, Sequence[torch.Tensor]],
    sample: str = "mode",
    scale: bool = True,
) -> List[torch.Tensor]:
    """Latents [C, H/f, W/f] of each image with a diffusers AutoencoderKL (or any VAE whose
    encode(x) returns .latent_dist or a tensor).

    images: [B, 3, H, W] or a list of [3, H, W] (sizes may differ), in the VAE's input range
    ([-1, 1] for the diffusers VAEs). sample: "mode" or "mean" of the latent distribution
    (the same for a Gaussian). scale=True applies (z - shift_factor) * scaling_factor from
    vae.config, as the diffusion pipelines (and BAGEL's FLUX AE) do.
    """
    if sample not in ("mode", "mean"):
        raise ValueError(f"g2tr.anchors: sample must be 'mode' or 'mean', got {sample!r}")
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            images = [images]
        elif images.dim() != 4:
            raise ValueError(
                f"g2tr.anchors: images must be [B, 3, H, W] or a list of [3, H, W], got {list(images.shape)}"
            )
    param = next(vae.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    config = getattr(vae, "config", None)
    scaling = getattr(config, "scaling_factor", None) if scale else None
    shift = getattr(config, "shift_factor", None) if scale else None

    def encode(batch: torch.Tensor) -> torch.Tensor:
        out = vae.encode(batch.to(device=device, dtype=dtype))
        dist = getattr(out, "latent_dist", None)
        if dist is None and isinstance(out, (tuple, list)):
            dist = out[0]
        if dist is None:
            dist = out
        if isinstance(dist, torch.Tensor):
            z = dist
        else:
            z = dist.mode() if sample == "mode" else dist.mean
        if shift is not None:
            z = z - shift
        if scaling is not None:
            z = z * scaling
        return z

    if isinstance(images, torch.Tensor):
        return list(encode(images).unbind(0))
    # Images of different sizes cannot share a batch; same-size runs could, one call each is simpler.
    return [encode(img[None])[0] for img in images]


def anchors_from_vae(
    vae,
    images: Union[torch.Tensor, Sequence[torch.Tensor]],
    projection: Projection = "interpolate",
    patch: int = 1,
    pool: int = 1,
    dim: Optional[int] = None,
    sample: str = "mode",
    scale: bool = True,
    dtype: Optional[torch.dtype] = None,
) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
    """encode -> latent mode/mean -> anchors_from_latents. Returns (anchors [M, D], anchor_grids)."""
    latents = encode_latents(vae, images, sample=sample, scale=scale)
    return anchors_from_latents(latents, projection, patch=patch, pool=pool, dim=dim, dtype=dtype)


__all__ = [
    "anchors_from_latents",
    "anchors_from_vae",
    "encode_latents",
    "interpolate_channels",
    "patchify",
    "pool_grid",
]
