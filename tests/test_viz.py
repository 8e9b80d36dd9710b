"""Rendering kept tokens and merge groups to a PNG."""
import numpy as np
import pytest
import torch

import g2tr_kernels as g2tr
from g2tr_kernels.viz import draw_reduction, group_colours, image_reduction

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


def test_image_reduction_makes_indices_local():
    torch.manual_seed(0)
    grids, anchor_grids = [(4, 4), (3, 6)], [(2, 2), (1, 3)]
    out = g2tr.reduce(torch.randn(34, 8), torch.randn(7, 8), grids, anchor_grids, 0.5, min_keep=1)
    keep, assign = image_reduction(out, grids, image=1)
    assert keep.shape == (9,) and int(keep.min()) >= 0 and int(keep.max()) < 18
    assert torch.equal(keep + 16, out.keep_idx[8:])
    assert assign.shape == (18,) and int(assign.min()) == 0 and int(assign.max()) == 8
    # a kept token's group is itself
    assert torch.equal(assign[keep], torch.arange(9))


def test_png_of_expected_size_and_content(tmp_path):
    # 64 x 48 picture, 4 x 3 token grid (16 px cells), keep tokens 0 and 11, two groups
    image = np.full((64, 48, 3), 200, dtype=np.uint8)
    keep = [0, 11]
    assign = [0] * 6 + [1] * 6  # top half -> group 0, bottom half -> group 1
    path = tmp_path / "reduction.png"
    canvas = draw_reduction(image, (4, 3), keep, assign, path=path, dim=0.5, alpha=0.5)

    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    png = Image.open(path)
    png.load()
    assert png.format == "PNG" and png.size == (2 * 48, 64) and png.mode == "RGB"
    pixels = np.asarray(png)
    assert np.array_equal(pixels, np.asarray(canvas))
    # "kept" panel: a dropped token is dimmed to half, a kept token's inside keeps its value
    assert tuple(pixels[24, 24]) == (100, 100, 100)  # token 4 (row 1, col 1): dropped
    assert tuple(pixels[8, 8]) == (200, 200, 200)  # inside kept token 0, away from its outline
    # "groups" panel: the two halves carry different colours, the same within a half
    colours = group_colours(2)
    top, bottom = pixels[24, 48 + 24], pixels[40, 48 + 24]
    assert tuple(top) == tuple(((200 * 0.5 + colours[0] * 0.5) + 0.5).astype(np.uint8))
    assert tuple(bottom) == tuple(((200 * 0.5 + colours[1] * 0.5) + 0.5).astype(np.uint8))
    assert tuple(top) != tuple(bottom)


def test_tensor_image_scale_and_single_panel(tmp_path):
    img = torch.rand(3, 14, 14) * 2 - 1  # a VAE-range picture
    canvas = draw_reduction(img, (7, 7), keep=[0, 5, 48], scale=4, path=tmp_path / "k.png")
    assert canvas.size == (56, 56)  # no assign: only the "kept" panel
    with pytest.raises(ValueError, match="keep indices"):
        draw_reduction(img, (7, 7), keep=[49])
    with pytest.raises(ValueError, match="assign has"):
        draw_reduction(img, (7, 7), keep=[0], assign=[0] * 10)
