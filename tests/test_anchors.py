"""Stage I anchors (SPEC.md §2): hand-computed expectations, then the VAE convenience."""
import pytest
import torch

import g2tr_kernels as g2tr
from g2tr_kernels.anchors import anchors_from_latents, anchors_from_vae, encode_latents, patchify, pool_grid

from helpers import tiny_vae


def identity(x):
    return x


def test_pool_partial_edge_blocks_average_only_their_cells():
    # 1 x 3 x 3 latent [[1, 2, 3], [4, 5, 6], [7, 8, 9]], q = 2 -> 2 x 2 pooled grid:
    # (1+2+4+5)/4 = 3, (3+6)/2 = 4.5, (7+8)/2 = 7.5, 9/1 = 9.
    z = torch.arange(1.0, 10.0).reshape(1, 3, 3)
    anchors, grids = anchors_from_latents(z, identity, pool=2)
    assert grids == [(2, 2)]
    assert anchors.tolist() == [[3.0], [4.5], [7.5], [9.0]]


def test_pool_wide_grid_and_larger_block():
    # 1 x 2 x 5 latent, q = 3: blocks cover columns {0,1,2} and {3,4}, and both rows.
    # rows [0, 1, 2, 3, 4] and [10, 11, 12, 13, 14]:
    # block 0 = (0+1+2+10+11+12)/6 = 6, block 1 = (3+4+13+14)/4 = 8.5
    z = torch.tensor([[[0.0, 1, 2, 3, 4], [10, 11, 12, 13, 14]]])
    anchors, grids = anchors_from_latents(z, identity, pool=3)
    assert grids == [(1, 2)]
    assert anchors.tolist() == [[6.0], [8.5]]


def test_patchify_vector_order_is_p_q_c():
    # C = 2, one 2 x 2 patch: z[0] = [[1, 2], [3, 4]], z[1] = [[10, 20], [30, 40]].
    # Order (p, q, c): (0,0,c0) (0,0,c1) (0,1,c0) (0,1,c1) (1,0,c0) ... as einsum("chpwq->hwpqc").
    z = torch.tensor([[[1.0, 2], [3, 4]], [[10, 20], [30, 40]]])
    grid = patchify(z, 2)
    assert grid.shape == (1, 1, 8)
    assert grid[0, 0].tolist() == [1, 10, 2, 20, 3, 30, 4, 40]


def test_patchify_crops_like_bagel():
    # 1 x 5 x 5 latent, p = 2: the last row and column do not fill a patch and are dropped.
    z = torch.arange(25.0).reshape(1, 5, 5)
    grid = patchify(z, 2)
    assert grid.shape == (2, 2, 4)
    # patch (1, 1) covers rows 2-3, columns 2-3: 12, 13, 17, 18 in (p, q) order
    assert grid[1, 1].tolist() == [12, 13, 17, 18]


def test_bagel_style_patch_pool_and_linear_projection():
    # z[c, y, x] = 16c + 4y + x, C = 2, 4 x 4 -> patchify 2 -> 2 x 2 grid of 8-d -> pool 2 -> 1 x 1.
    # The Linear picks vector entries 0 (c0 at p=0,q=0) and 7 (c1 at p=1,q=1):
    # entry 0 of patch (i, j) = z[0, 2i, 2j] = 8i + 2j: 0, 2, 8, 10 -> mean 5
    # entry 7 of patch (i, j) = z[1, 2i+1, 2j+1] = 21 + 8i + 2j: 21, 23, 29, 31 -> mean 26
    z = torch.arange(32.0).reshape(2, 4, 4)
    vae2llm = torch.nn.Linear(8, 2)
    with torch.no_grad():
        vae2llm.weight.zero_()
        vae2llm.weight[0, 0] = 1.0
        vae2llm.weight[1, 7] = 1.0
        vae2llm.bias.copy_(torch.tensor([0.5, -1.0]))
    anchors, grids = anchors_from_latents([z], vae2llm, patch=2, pool=2, dim=2)
    assert grids == [(1, 1)]
    assert torch.allclose(anchors, torch.tensor([[5.5, 25.0]]))


def test_interpolate_projection_upsamples_and_downsamples_channels():
    # C = 2 -> D = 4, align_corners=False: source x = (i + 0.5) * 2/4 - 0.5 = -0.25, 0.25, 0.75, 1.25
    # (clamped to [0, 1]) over channels [0, 1] -> 0, 0.25, 0.75, 1.
    z = torch.tensor([[[0.0]], [[1.0]]])  # [C=2, 1, 1]
    anchors, _ = anchors_from_latents(z, "interpolate", dim=4)
    assert torch.allclose(anchors, torch.tensor([[0.0, 0.25, 0.75, 1.0]]))
    # C = 3 -> D = 2: source x = (i + 0.5) * 3/2 - 0.5 = 0.25, 1.75 over [0, 10, 30] -> 2.5, 25.
    z = torch.tensor([[[0.0]], [[10.0]], [[30.0]]])
    anchors, _ = anchors_from_latents(z, "interpolate", dim=2)
    assert torch.allclose(anchors, torch.tensor([[2.5, 25.0]]))


def test_images_of_different_sizes_pack_in_order():
    a = torch.arange(1.0, 10.0).reshape(1, 3, 3)  # pools to 2 x 2: 3, 4.5, 7.5, 9
    b = torch.full((1, 2, 4), 2.0)  # pools to 1 x 2: 2, 2
    anchors, grids = anchors_from_latents([a, b], identity, pool=2)
    assert grids == [(2, 2), (1, 2)]
    assert anchors[:, 0].tolist() == [3.0, 4.5, 7.5, 9.0, 2.0, 2.0]


def test_padded_batch_with_sizes_crops_each_latent():
    batch = torch.zeros(2, 1, 3, 3)
    batch[0] = torch.arange(1.0, 10.0).reshape(1, 3, 3)
    batch[1, 0, :2, :2] = torch.tensor([[1.0, 3.0], [5.0, 7.0]])
    batch[1, 0, 2, :] = 100.0  # padding: must not leak into image 1's anchor
    anchors, grids = anchors_from_latents(batch, identity, pool=2, sizes=[(3, 3), (2, 2)])
    assert grids == [(2, 2), (1, 1)]
    assert anchors[:, 0].tolist() == [3.0, 4.5, 7.5, 9.0, 4.0]


def test_dtype_and_pool_grid_precision():
    z = torch.randn(4, 5, 7, dtype=torch.bfloat16)
    anchors, grids = anchors_from_latents(z, "interpolate", pool=2, dim=16, dtype=torch.bfloat16)
    assert anchors.dtype == torch.bfloat16 and anchors.shape == (3 * 4, 16) and grids == [(3, 4)]
    # pool_grid accumulates in fp32 even for bf16 input
    assert pool_grid(z.permute(1, 2, 0), 2).dtype == torch.float32


def test_bad_arguments_name_the_problem():
    z = torch.randn(4, 4, 4)
    with pytest.raises(ValueError, match="dim"):
        anchors_from_latents(z, "interpolate")
    with pytest.raises(ValueError, match="projection"):
        anchors_from_latents(z, "bilinear", dim=8)
    with pytest.raises(ValueError, match="pool"):
        anchors_from_latents(z, identity, pool=0)
    with pytest.raises(ValueError, match="image 1"):
        anchors_from_latents([z, torch.randn(4, 4)], identity)
    with pytest.raises(ValueError, match="returns D"):
        anchors_from_latents(z, identity, dim=8)


def test_anchors_from_vae_matches_encode_then_anchors_and_feeds_reduce():
    vae = tiny_vae()  # downsamples by 2
    torch.manual_seed(1)
    images = [torch.rand(3, 32, 32) * 2 - 1, torch.rand(3, 24, 40) * 2 - 1]
    anchors, grids = anchors_from_vae(vae, images, projection="interpolate", pool=4, dim=24)
    assert grids == [(4, 4), (3, 5)]  # latents 16 x 16 and 12 x 20, pooled by 4
    with torch.no_grad():
        expected = []
        for img in images:
            z = vae.encode(img[None]).latent_dist.mode()[0] * vae.config.scaling_factor
            # 4 x 4 block means of the latent, then channels 4 -> 24
            h, w = z.shape[1:]
            blocks = z.reshape(4, h // 4, 4, w // 4, 4).mean(dim=(2, 4)).permute(1, 2, 0).reshape(-1, 4)
            expected.append(torch.nn.functional.interpolate(blocks[:, None], size=24, mode="linear")[:, 0])
    assert torch.allclose(anchors, torch.cat(expected), atol=1e-6)

    # Same grids from a batched tensor of equal-size images.
    latents = encode_latents(vae, torch.stack([images[0], images[0]]))
    assert [tuple(z.shape) for z in latents] == [(4, 16, 16), (4, 16, 16)]

    tokens = torch.randn(6 * 6 + 5 * 7, 24)
    out = g2tr.reduce(tokens, anchors, [(6, 6), (5, 7)], grids, keep_ratio=0.5, min_keep=1, backend="reference")
    assert out.cu_seqlens.tolist() == [0, 18, 36]  # round(36 * .5) = 18, round(35 * .5) = 18 (17.5 -> 18, even)
