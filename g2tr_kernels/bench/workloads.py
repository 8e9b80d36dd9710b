"""The SHAPES.md workloads as data, and a deterministic generator of realistic inputs.

Random Gaussian tokens would make every cosine similarity about 0 in D = 3584, so the
scores would all tie near 0 and the merge argmax would be decided by noise. Real ViT
tokens after the connector share a large common component and vary smoothly over the
image, and the anchors (VAE latent, projected) follow the same image content. The
generator mimics that: per image, a smooth low-rank field over the image plane (a few
random low-frequency plane waves) mapped to D by loadings shared across images, plus a
common direction and noise, with token norms that vary. Anchors sample the same field
at the anchor cell centres through a perturbed copy of the loadings.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace
from typing import Dict, List, Sequence, Tuple

import torch

from ..reference.budget import budget

Grid = Tuple[int, int]


@dataclass(frozen=True)
class Workload:
    id: str
    scenario: str
    grids: Tuple[Grid, ...]  # ViT grid (h, w) per image, packed in order
    anchor_grids: Tuple[Grid, ...]  # anchor grid (h_a, w_a) per image
    dim: int

    @property
    def images(self) -> int:
        return len(self.grids)

    @property
    def lengths(self) -> List[int]:
        return [h * w for h, w in self.grids]

    @property
    def n_total(self) -> int:
        return sum(self.lengths)

    @property
    def cell_counts(self) -> List[int]:
        return [h * w for h, w in self.anchor_grids]

    def budgets(self, keep_ratio: float = 0.5, min_keep: int = 32) -> List[int]:
        return [budget(n, keep_ratio, min_keep) for n in self.lengths]

    def k_total(self, keep_ratio: float = 0.5, min_keep: int = 32) -> int:
        return sum(self.budgets(keep_ratio, min_keep))

    def tiny(self) -> "Workload":
        """Same image count and aspect ratios at about 1/4 of the side and D = 64: a smoke-test size.

        Use it with a small min_keep (SMOKE_MIN_KEEP): at min_keep 32 most tiny images keep everything.
        """

        def shrink(g: Grid, lo: int) -> Grid:
            return (max(lo, math.ceil(g[0] / 4)), max(lo, math.ceil(g[1] / 4)))

        return replace(
            self,
            id=f"{self.id}-tiny",
            scenario=f"{self.scenario} (tiny smoke-test variant)",
            grids=tuple(shrink(g, 2) for g in self.grids),
            anchor_grids=tuple(shrink(g, 1) for g in self.anchor_grids),
            dim=64,
        )

    def describe(self) -> str:
        shapes = {}
        for g, a in zip(self.grids, self.anchor_grids):
            key = f"{g[0]}x{g[1]} (anchors {a[0]}x{a[1]})"
            shapes[key] = shapes.get(key, 0) + 1
        return ", ".join(f"{c} x {k}" if c > 1 else k for k, c in shapes.items())


def _repeat(pairs: Sequence[Grid], times: int) -> Tuple[Grid, ...]:
    return tuple(pairs) * times


# SHAPES.md, row for row.
WORKLOADS: Dict[str, Workload] = {
    w.id: w
    for w in (
        Workload("S1", "InternVL-U, one 448 tile per image", _repeat([(16, 16)], 16), _repeat([(32, 32)], 16), 2048),
        Workload("S2", "BAGEL, 512x512 images", _repeat([(37, 37)], 8), _repeat([(16, 16)], 8), 3584),
        Workload("M1", "BAGEL, one 1024x1024 image", ((70, 70),), ((32, 32),), 3584),
        Workload(
            "M2",
            "BAGEL, mixed sizes packed",
            ((70, 70), (52, 70), (70, 52), (39, 70), (37, 37), (27, 27)),
            ((32, 32), (24, 32), (32, 24), (18, 32), (16, 16), (16, 16)),
            3584,
        ),
        Workload("L1", "BAGEL, 8 max-size images", _repeat([(70, 70)], 8), _repeat([(32, 32)], 8), 3584),
        Workload(
            "L2",
            "stress, 32 mixed images",
            _repeat([(70, 70), (52, 70), (70, 52), (39, 70)], 8),
            _repeat([(32, 32), (24, 32), (32, 24), (18, 32)], 8),
            3584,
        ),
    )
}
DEFAULT_WORKLOADS = ("S1", "S2", "M1", "M2")
SMOKE_MIN_KEEP = 4
LARGE_WORKLOADS = ("L1", "L2")


def get(name: str) -> Workload:
    """A workload by id; "<id>-tiny" gives its smoke-test variant."""
    base = name[: -len("-tiny")] if name.endswith("-tiny") else name
    if base not in WORKLOADS:
        raise KeyError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)} (and <id>-tiny)")
    return WORKLOADS[base].tiny() if name.endswith("-tiny") else WORKLOADS[base]


def single_image(h: int, w: int, dim: int = 3584) -> Workload:
    """One BAGEL-like image of h x w ViT tokens, anchors pooled as BAGEL does at 70 -> 32."""
    a = (max(1, round(h * 32 / 70)), max(1, round(w * 32 / 70)))
    return Workload(f"1x{h}x{w}", f"one image, {h}x{w} tokens", ((h, w),), (a,), dim)


# Shape of the synthetic content: enough rank for the field to look like an image, low
# enough frequency that neighbouring tokens resemble each other, noise enough that
# ties are rare.
_RANK = 24
_MAX_CYCLES = 3.0
_COMMON = 0.8
_NOISE = 0.45
_ANCHOR_NOISE = 0.6
_ANCHOR_COMMON = 0.1


def _field(gen: torch.Generator, h: int, w: int, freqs: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
    """[h*w, rank] plane waves sampled at the cell centres of an h x w grid of the unit square."""
    y = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    x = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    yy = y[:, None].expand(h, w).reshape(-1, 1)
    xx = x[None, :].expand(h, w).reshape(-1, 1)
    return torch.cos(2 * math.pi * (yy * freqs[:, 0] + xx * freqs[:, 1]) + phases) * math.sqrt(2.0 / _RANK)


def make_inputs(
    workload: Workload,
    dtype: torch.dtype = torch.bfloat16,
    device="cpu",
    seed: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(tokens [N, D], anchors [M, D]) in dtype on device; the same values for the same
    (workload, seed) on every device: generated on the CPU in fp32, then cast and moved."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(workload.id.encode()))
    d = workload.dim
    loadings = torch.randn(_RANK, d, generator=gen) / math.sqrt(d)
    common = torch.randn(d, generator=gen) / math.sqrt(d)
    anchor_loadings = loadings + 0.5 * torch.randn(_RANK, d, generator=gen) / math.sqrt(d)
    tokens = torch.empty(workload.n_total, d, dtype=dtype, device=device)
    anchors = torch.empty(sum(workload.cell_counts), d, dtype=dtype, device=device)
    t0 = a0 = 0
    for (h, w), (h_a, w_a) in zip(workload.grids, workload.anchor_grids):
        freqs = torch.rand(_RANK, 2, generator=gen) * 2 * _MAX_CYCLES - _MAX_CYCLES
        phases = torch.rand(_RANK, generator=gen) * 2 * math.pi
        n, m = h * w, h_a * w_a
        # How much detail each region carries: flat regions are mostly the common
        # direction (low score against their anchor), detailed ones follow the field.
        detail = 0.9 + 0.7 * _field(gen, h, w, freqs[:1] / 2, phases[:1]).squeeze(1) * math.sqrt(_RANK / 2)
        v = _COMMON * common + detail[:, None] * (_field(gen, h, w, freqs, phases) @ loadings)
        v += _NOISE * torch.randn(n, d, generator=gen) / math.sqrt(d)
        v *= torch.exp(0.25 * torch.randn(n, 1, generator=gen))  # token norms vary, as in real ViTs
        a = _ANCHOR_COMMON * common + _field(gen, h_a, w_a, freqs, phases) @ anchor_loadings
        a += _ANCHOR_NOISE * torch.randn(m, d, generator=gen) / math.sqrt(d)
        tokens[t0 : t0 + n] = v.to(dtype)
        anchors[a0 : a0 + m] = a.to(dtype)
        t0 += n
        a0 += m
    return tokens, anchors
