"""Draw what G2TR kept and merged over the input image, as in the paper's figures.

    out = g2tr_kernels.reduce(tokens, anchors, grids, anchor_grids)
    keep, assign = image_reduction(out, grids, image=0)
    draw_reduction(pixels, grids[0], keep, assign, path="reduction.png")

Panels, side by side, each the size of the image:
  "kept":   dropped tokens dimmed, kept tokens at full brightness with an outline;
  "groups": every merge group (a kept token and the tokens merged into it) in its own
            colour, the kept token marked with a dot.
Needs only Pillow.
"""
from __future__ import annotations

import colorsys
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

PANELS = ("kept", "groups")


def image_reduction(out, grids, image: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(keep, assign) of one image of a packed ReduceOutput, as indices local to that image.

    keep: [K] token indices in the image; assign: [N] row in keep of the token's group.
    """
    pairs = [tuple(g) for g in grids] if isinstance(grids[0], (tuple, list)) else [
        (grids[i], grids[i + 1]) for i in range(0, len(grids), 2)
    ]
    if not 0 <= image < len(pairs):
        raise IndexError(f"g2tr.viz: image {image} is out of range for {len(pairs)} images")
    token_start = sum(h * w for h, w in pairs[:image])
    n = pairs[image][0] * pairs[image][1]
    cu = out.cu_seqlens.tolist()
    keep = out.keep_idx[cu[image] : cu[image + 1]].cpu() - token_start
    assign = out.assign[token_start : token_start + n].cpu() - cu[image]
    return keep, assign


def _to_rgb_array(image) -> np.ndarray:
    """uint8 [H, W, 3] from a PIL image, a [H, W, 3] array or a [3, H, W] tensor ([0, 1] or [-1, 1])."""
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - Pillow ships with matplotlib and torchvision
        raise ImportError("g2tr.viz needs Pillow (pip install pillow)") from e
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB")).copy()
    if isinstance(image, torch.Tensor):
        x = image.detach().float().cpu()
        if x.dim() != 3 or x.shape[0] not in (1, 3):
            raise ValueError(f"g2tr.viz: a tensor image must be [3, H, W] or [1, H, W], got {list(x.shape)}")
        if x.min() < 0:
            x = (x + 1) / 2  # the VAE's [-1, 1]
        x = x.clamp(0, 1).expand(3, -1, -1).permute(1, 2, 0).numpy()
        return (x * 255 + 0.5).astype(np.uint8)
    x = np.asarray(image)
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=2)
    if x.ndim != 3 or x.shape[2] not in (3, 4):
        raise ValueError(f"g2tr.viz: an array image must be [H, W, 3], got shape {list(x.shape)}")
    x = x[..., :3]
    if x.dtype != np.uint8:
        x = (np.clip(x.astype(np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)
    return x.copy()


def group_colours(count: int, seed: int = 0) -> np.ndarray:
    """count distinct, saturated colours (golden-ratio hue steps), uint8 [count, 3]."""
    colours = []
    for i in range(count):
        hue = (seed * 0.1 + i * 0.618033988749895) % 1.0
        sat = 0.65 + 0.35 * ((i * 7) % 3) / 2
        colours.append(colorsys.hsv_to_rgb(hue, sat, 1.0))
    return (np.array(colours).reshape(-1, 3) * 255 + 0.5).astype(np.uint8)


def _cell_edges(size: int, parts: int) -> np.ndarray:
    return np.round(np.arange(parts + 1) * size / parts).astype(int)


def draw_reduction(
    image,
    grid: Tuple[int, int],
    keep: Union[torch.Tensor, Sequence[int]],
    assign: Optional[Union[torch.Tensor, Sequence[int]]] = None,
    path=None,
    panels: Sequence[str] = PANELS,
    dim: float = 0.3,
    alpha: float = 0.5,
    scale: int = 1,
    seed: int = 0,
):
    """Render the reduction of one image; returns a PIL image (and writes a PNG when path is given).

    image: the picture (PIL, [H, W, 3] array, or [3, H, W] tensor). grid: its token grid
    (h, w). keep: kept token indices (local). assign: for every token, the row in keep of
    the group it merged into (ReduceOutput.assign made local: see image_reduction); without
    it the "groups" panel is left out. dim: brightness of dropped tokens; alpha: opacity of
    the group colours; scale: integer upscaling of the picture first (small inputs).
    Output size: (W * scale * number of panels, H * scale).
    """
    from PIL import Image, ImageDraw

    rgb = _to_rgb_array(image)
    if scale != 1:
        rgb = np.asarray(Image.fromarray(rgb).resize((rgb.shape[1] * scale, rgb.shape[0] * scale), Image.NEAREST))
    height, width = rgb.shape[:2]
    h, w = int(grid[0]), int(grid[1])
    n = h * w
    keep = torch.as_tensor(keep, dtype=torch.long).reshape(-1).cpu().numpy()
    if keep.size and (keep.min() < 0 or keep.max() >= n):
        raise ValueError(f"g2tr.viz: keep indices must lie in [0, {n}) for a {h} x {w} grid")
    panels = [p for p in panels if not (p == "groups" and assign is None)]
    for p in panels:
        if p not in PANELS:
            raise ValueError(f"g2tr.viz: unknown panel {p!r}; choose from {PANELS}")
    if not panels:
        raise ValueError("g2tr.viz: nothing to draw (the 'groups' panel needs assign)")
    if assign is not None:
        assign = torch.as_tensor(assign, dtype=torch.long).reshape(-1).cpu().numpy()
        if assign.size != n:
            raise ValueError(f"g2tr.viz: assign has {assign.size} entries, the {h} x {w} grid has {n} tokens")
        if assign.size and (assign.min() < 0 or assign.max() >= max(keep.size, 1)):
            raise ValueError(f"g2tr.viz: assign must index the {keep.size} kept tokens")

    rows, cols = _cell_edges(height, h), _cell_edges(width, w)
    # Per-pixel token id, so the panels are whole-array operations.
    row_of = np.searchsorted(rows, np.arange(height), side="right") - 1
    col_of = np.searchsorted(cols, np.arange(width), side="right") - 1
    token = np.clip(row_of, 0, h - 1)[:, None] * w + np.clip(col_of, 0, w - 1)[None, :]
    kept_mask = np.zeros(n, dtype=bool)
    kept_mask[keep] = True
    base = rgb.astype(np.float32)

    def boxes(draw, which, colour, width_px):
        for t in which:
            r, c = divmod(int(t), w)
            draw.rectangle([cols[c], rows[r], cols[c + 1] - 1, rows[r + 1] - 1], outline=colour, width=width_px)

    line = max(1, min(height // h, width // w) // 12)
    rendered = []
    for p in panels:
        if p == "kept":
            factor = np.where(kept_mask[token], 1.0, dim)[..., None]
            panel = Image.fromarray((base * factor + 0.5).astype(np.uint8))
            boxes(ImageDraw.Draw(panel), keep, (255, 255, 255), line)
        else:
            colours = group_colours(max(keep.size, 1), seed).astype(np.float32)
            tint = colours[assign[token]]
            panel = Image.fromarray((base * (1 - alpha) + tint * alpha + 0.5).astype(np.uint8))
            draw = ImageDraw.Draw(panel)
            for t in keep:
                r, c = divmod(int(t), w)
                cy, cx = (rows[r] + rows[r + 1] - 1) / 2, (cols[c] + cols[c + 1] - 1) / 2
                radius = max(1.0, min(rows[r + 1] - rows[r], cols[c + 1] - cols[c]) / 5)
                dot = [cx - radius, cy - radius, cx + radius, cy + radius]
                draw.ellipse(dot, fill=(255, 255, 255), outline=(0, 0, 0))
        rendered.append(panel)

    canvas = Image.new("RGB", (width * len(rendered), height))
    for i, panel in enumerate(rendered):
        canvas.paste(panel, (i * width, 0))
    if path is not None:
        canvas.save(path, format="PNG")
    return canvas


__all__ = ["draw_reduction", "group_colours", "image_reduction"]
