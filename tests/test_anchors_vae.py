"""VAE adapters, precomputed latents / anchors and pool="auto" (g2tr_kernels.anchors).

Every diffusers VAE class of VAE_ADAPTERS is built from a tiny random config (nothing is
downloaded) with non-trivial normalisation constants; its adapter must give, bit for bit,
the formula of its pipeline written out here by hand on the VAE's own encoder output.
"""
import math
import pathlib

import pytest
import torch

import g2tr_kernels as g2tr
from g2tr_kernels.anchors import (
    VAE_ADAPTERS,
    anchors_from_latents,
    anchors_from_vae,
    auto_pool,
    encode_latents,
    normalize_latents,
    prepare_anchors,
    vae_adapter,
    vae_support_table,
)

diffusers = pytest.importorskip("diffusers")

C = 4  # latent channels of every tiny VAE; each one downsamples by 2


def identity(x):
    return x


def _kl(cls=None, **config):
    torch.manual_seed(0)
    return (cls or diffusers.AutoencoderKL)(
        in_channels=3, out_channels=3, latent_channels=C, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, sample_size=32, **config,
    ).eval()


def _flux2():
    vae = _kl(diffusers.AutoencoderKLFlux2)
    torch.manual_seed(1)
    # Trained statistics, not the (0, 1) of a fresh BatchNorm, so the normalisation shows.
    vae.bn.running_mean.copy_(torch.randn(4 * C))
    vae.bn.running_var.copy_(torch.rand(4 * C) * 3 + 0.1)
    return vae


MEAN, STD = [0.3, -1.2, 0.05, 2.0], [1.7, 0.45, 2.9, 1.1]


def _video(cls, dim_mult=(1, 2), **config):
    torch.manual_seed(0)
    return cls(
        base_dim=8, z_dim=C, dim_mult=list(dim_mult), num_res_blocks=1, temperal_downsample=[False],
        latents_mean=MEAN, latents_std=STD, **config,
    ).eval()


def _qwen21():
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage21 import AutoencoderKLQwenImage21

    # Its residual down blocks need equal widths at this size.
    return _video(AutoencoderKLQwenImage21, dim_mult=(1, 1), decoder_base_dim=8, in_channels=3, out_channels=3)


def _dc():
    torch.manual_seed(0)
    return diffusers.AutoencoderDC(
        in_channels=3, latent_channels=C, encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16),
        encoder_block_types=("ResBlock",) * 2, decoder_block_types=("ResBlock",) * 2,
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), ()), decoder_qkv_multiscales=((), ()), decoder_norm_types="rms_norm",
        decoder_act_fns="silu", scaling_factor=0.41407,
    ).eval()


def _tiny(**config):
    torch.manual_seed(0)
    return diffusers.AutoencoderTiny(
        in_channels=3, out_channels=3, encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        latent_channels=C, num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), **config,
    ).eval()


def _channels(values, z):
    return torch.tensor(values).view(1, -1, 1, 1).to(z.dtype)


def _flux2_by_hand(vae, z):
    # pipeline_flux2._patchify_latents: channel c * 4 + p * 2 + q of patch (i, j) is z[c, 2i + p, 2j + q].
    h, w = z.shape[2] // 2, z.shape[3] // 2
    x = torch.stack([z[:, c, p : 2 * h : 2, q : 2 * w : 2] for c in range(C) for p in range(2) for q in range(2)], 1)
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return (x - mean) / std


# name -> (build, raw encoder output -> latent, the pipeline's normalisation written out)
CASES = {
    "sd": (lambda: _kl(scaling_factor=0.18215), lambda o: o.latent_dist.mode(), lambda v, z: 0.18215 * z),
    "flux": (
        lambda: _kl(scaling_factor=0.3611, shift_factor=0.1159),
        lambda o: o.latent_dist.mode(),
        lambda v, z: (z - 0.1159) * 0.3611,
    ),
    "sdxl_mean_std": (
        lambda: _kl(scaling_factor=0.5, latents_mean=MEAN, latents_std=STD),
        lambda o: o.latent_dist.mode(),
        lambda v, z: (z - _channels(MEAN, z)) * 0.5 / _channels(STD, z),
    ),
    "flux2": (_flux2, lambda o: o.latent_dist.mode(), _flux2_by_hand),
    "qwenimage": (
        lambda: _video(diffusers.AutoencoderKLQwenImage),
        lambda o: o.latent_dist.mode()[:, :, 0],
        lambda v, z: (z - _channels(MEAN, z)) / _channels(STD, z),
    ),
    "qwenimage21": (
        _qwen21,
        lambda o: o.latent_dist.mode()[:, :, 0],
        lambda v, z: (z - _channels(MEAN, z)) / _channels(STD, z),
    ),
    "wan": (
        lambda: _video(diffusers.AutoencoderKLWan),
        lambda o: o.latent_dist.mode()[:, :, 0],
        lambda v, z: (z - _channels(MEAN, z)) * (1.0 / _channels(STD, z)),
    ),
    "dc": (_dc, lambda o: o.latent, lambda v, z: z * 0.41407),
    "tiny": (lambda: _tiny(scaling_factor=1.5, shift_factor=0.1), lambda o: o.latents, lambda v, z: (z - 0.1) * 1.5),
}
VIDEO = ("qwenimage", "qwenimage21", "wan")


def _images():
    torch.manual_seed(2)
    return [torch.rand(3, 16, 24) * 2 - 1, torch.rand(3, 24, 16) * 2 - 1]


@pytest.mark.parametrize("name", list(CASES))
def test_adapter_matches_the_pipeline_formula_on_the_vaes_own_output(name):
    build, raw_of, by_hand = CASES[name]
    vae = build()
    images = _images()
    expected = []
    with torch.no_grad():
        for img in images:
            x = img[None, :, None] if name in VIDEO else img[None]
            expected.append(by_hand(vae, raw_of(vae.encode(x)))[0])

    latents = encode_latents(vae, images)
    assert len(latents) == 2
    for got, want in zip(latents, expected):
        assert got.shape == want.shape and torch.equal(got, want), name

    # The anchors of those latents, unpooled and unprojected, are their per-position vectors.
    anchors, grids = anchors_from_vae(vae, images, projection=identity, pool=1)
    assert grids == [tuple(z.shape[1:]) for z in expected]
    assert torch.equal(anchors, torch.cat([z.permute(1, 2, 0).reshape(-1, z.shape[0]) for z in expected]))

    # Precomputed raw latents normalise to the same thing, from a list or the encoder's own batch.
    raw = encode_latents(vae, images, scale=False)
    for got, want in zip(normalize_latents(vae, raw), expected):
        assert torch.equal(got, want)
    with torch.no_grad():
        x = torch.stack([images[0], images[0]])
        out = vae.encode(x[:, :, None] if name in VIDEO else x)  # batched convs may round differently
    batch_raw = out.latent_dist.mode() if hasattr(out, "latent_dist") else raw_of(out)  # 5-D for video VAEs
    assert torch.equal(torch.stack(normalize_latents(vae, batch_raw)), by_hand(vae, raw_of(out)))


def test_flux2_latent_is_patchified_to_four_times_the_channels_and_odd_edges_are_cropped():
    vae = _flux2()
    img = torch.rand(3, 22, 18) * 2 - 1  # latent 11 x 9: the last row and column do not fill a patch
    (z,) = encode_latents(vae, [img])
    assert z.shape == (4 * C, 5, 4)
    with torch.no_grad():
        want = _flux2_by_hand(vae, vae.encode(img[None]).latent_dist.mode())[0]
    assert torch.equal(z, want)


def test_kl_config_with_both_mean_std_and_shift_is_refused():
    vae = _kl(scaling_factor=0.5, shift_factor=0.1, latents_mean=MEAN, latents_std=STD)
    with pytest.raises(NotImplementedError, match="shift_factor.*vae_latents"):
        encode_latents(vae, _images())


def test_latents_mean_of_the_wrong_length_names_the_config_field():
    vae = _video(diffusers.AutoencoderKLWan)
    vae.register_to_config(latents_mean=MEAN[:3])
    with pytest.raises(ValueError, match="latents_mean has 3 entries but the latent has 4 channels"):
        encode_latents(vae, _images())


def test_unknown_vae_class_lists_the_supported_ones_and_the_way_out():
    class MyVAE(torch.nn.Module):
        def encode(self, x):
            return x

    with pytest.raises(NotImplementedError) as err:
        encode_latents(MyVAE(), _images())
    message = str(err.value)
    assert "MyVAE" in message and "vae_latents=" in message and "anchors_from_latents" in message
    assert all(name in message for name in VAE_ADAPTERS)


def test_subclasses_and_compiled_vaes_use_their_base_class_adapter():
    class MyKL(diffusers.AutoencoderKL):
        pass

    assert vae_adapter(_kl(MyKL)) is VAE_ADAPTERS["AutoencoderKL"]

    class Compiled(torch.nn.Module):  # what torch.compile returns: the module under _orig_mod
        def __init__(self, mod):
            super().__init__()
            self._orig_mod = mod

    assert vae_adapter(Compiled(_tiny())) is VAE_ADAPTERS["AutoencoderTiny"]


def test_video_latents_with_more_than_one_frame_are_refused():
    with pytest.raises(ValueError, match="image 1 has 3 frames"):
        anchors_from_latents([torch.randn(4, 1, 6, 6), torch.randn(4, 3, 6, 6)], identity)
    # one frame, batched or not, is the same as the 3-D latent
    z = torch.randn(2, 4, 1, 6, 6)
    assert torch.equal(anchors_from_latents(z, identity)[0], anchors_from_latents(z[:, :, 0], identity)[0])


def test_readme_renders_the_adapter_table():
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert vae_support_table() in readme


# -- pool="auto" ------------------------------------------------------------------------------


def test_auto_pool_on_a_448_internvl_tile_gives_one_pooled_cell_per_token_footprint():
    # 448 px tile: 56 x 56 latent cells (f = 8), 16 x 16 ViT tokens. pool 1 would give each token
    # one of its ~12 cells; auto pools 4 x 4 -> 14 x 14, every cell some token's anchor.
    z = torch.randn(16, 56, 56)
    vit = [(16, 16)]
    anchors, grids = anchors_from_latents(z, "interpolate", pool="auto", dim=32, vit_grids=vit)
    assert grids == [(14, 14)]
    assert torch.equal(anchors, anchors_from_latents(z, "interpolate", pool=4, dim=32)[0])


def test_auto_pool_is_per_image_and_per_axis():
    a, b, c = torch.randn(4, 30, 45), torch.randn(4, 8, 8), torch.randn(4, 64, 64)
    vit = [(16, 16), (16, 16), (70, 70)]
    anchors, grids = anchors_from_latents([a, b, c], identity, pool="auto", vit_grids=vit)
    # q = (2, 3) -> 15 x 15; a latent coarser than the ViT grid is not pooled (q = 1, never upsampled);
    # BAGEL's 64 x 64 patchified FLUX latent of a 1024 image next to its 70 x 70 ViT grid: q = 1.
    assert grids == [(15, 15), (8, 8), (64, 64)]
    want = torch.cat([
        anchors_from_latents(a, identity, pool=(2, 3))[0],
        anchors_from_latents(b, identity, pool=1)[0],
        anchors_from_latents(c, identity, pool=1)[0],
    ])
    assert torch.equal(anchors, want)


def test_auto_pool_is_the_smallest_q_whose_grid_is_no_finer_than_the_vit_grid():
    for h in range(1, 90):
        for h_v in range(1, 40):
            q, _ = auto_pool((h, 1), (h_v, 1))
            h_a = math.ceil(h / q)
            assert h_a <= h_v
            assert q == 1 or math.ceil(h / (q - 1)) > h_v  # one less would be finer than the ViT grid
            # reduce's cell map r * h_a // h_v then reaches every anchor row: no cell goes unseen.
            assert {r * h_a // h_v for r in range(h_v)} == set(range(h_a))


def test_auto_pool_needs_vit_grids_one_per_image():
    z = [torch.randn(4, 8, 8)] * 2
    with pytest.raises(ValueError, match="vit_grids"):
        anchors_from_latents(z, identity, pool="auto")
    with pytest.raises(ValueError, match="vit_grids describe 1 images but there are 2 latents"):
        anchors_from_latents(z, identity, pool="auto", vit_grids=[(4, 4)])
    with pytest.raises(ValueError, match="pool"):
        anchors_from_latents(z, identity, pool="max")
    with pytest.raises(ValueError, match="pool"):
        anchors_from_latents(z, identity, pool=(2, 0))
    # anchors_from_vae defaults to auto, so it asks for the grids rather than guessing
    with pytest.raises(ValueError, match="vit_grids"):
        anchors_from_vae(_tiny(), _images(), dim=8)


def _pool_as_before(grid, q):
    """pool_grid as it was before pool="auto" (pinned): explicit pools must not change by a bit."""
    h, w, f = grid.shape
    x = grid.float()
    h_a, w_a = math.ceil(h / q), math.ceil(w / q)
    padded = x.new_zeros(h_a * q, w_a * q, f)
    padded[:h, :w] = x
    count = x.new_zeros(h_a * q, w_a * q)
    count[:h, :w] = 1.0
    total = padded.reshape(h_a, q, w_a, q, f).sum(dim=(1, 3))
    return total / count.reshape(h_a, q, w_a, q).sum(dim=(1, 3))[..., None]


def test_bagel_patch2_pool2_is_bit_identical_to_before():
    torch.manual_seed(3)
    z = torch.randn(16, 37, 29, dtype=torch.bfloat16)  # odd sizes: cropped patch, partial pool blocks
    vae2llm = torch.nn.Linear(64, 48).to(torch.bfloat16)
    with torch.no_grad():
        grid = torch.einsum("chpwq->hwpqc", z[:, :36, :28].reshape(16, 18, 2, 14, 2)).reshape(18, 14, 64)
        want = vae2llm(_pool_as_before(grid, 2).reshape(-1, 64).to(torch.bfloat16))
        anchors, grids = anchors_from_latents(z, vae2llm, patch=2, pool=2)
        assert grids == [(9, 7)] and torch.equal(anchors, want)
        # vit_grids do not change an explicit pool
        again, _ = anchors_from_latents(z, vae2llm, patch=2, pool=2, vit_grids=[(70, 70)])
        assert torch.equal(again, want)


# -- dtype / device and precomputed inputs ------------------------------------------------------


def test_like_gives_the_tokens_dtype_with_one_rounding():
    z = torch.randn(4, 9, 9, dtype=torch.bfloat16)
    tokens = torch.randn(9 * 9, 24, dtype=torch.float16)
    anchors, grids = anchors_from_latents(z, "interpolate", dim=24, like=tokens)
    assert anchors.dtype == torch.float16 and anchors.device == tokens.device
    # fp32 interpolation cast once to fp16, never through the latent's bf16
    want = torch.nn.functional.interpolate(z.float().permute(1, 2, 0).reshape(-1, 1, 4), size=24, mode="linear")
    assert torch.equal(anchors, want[:, 0].to(torch.float16))
    out = g2tr.reduce(tokens, anchors, [(9, 9)], grids, min_keep=1, backend="reference")
    assert out.merged.dtype == torch.float16
    assert anchors_from_latents(z, "interpolate", dim=24, like=tokens, dtype=torch.float32)[0].dtype == torch.float32
    with pytest.raises(TypeError, match="like"):
        anchors_from_latents(z, "interpolate", dim=24, like=torch.float16)


def test_prepare_anchors_gives_the_same_anchors_from_images_latents_or_anchors():
    vae = CASES["qwenimage"][0]()
    images = _images()  # latents 8 x 12 and 12 x 8
    vit = [(4, 4), (3, 2)]
    tokens = torch.randn(16 + 6, 32, dtype=torch.bfloat16)
    from_images = prepare_anchors(vit, vae, images=images, dim=32, like=tokens)
    assert from_images[1] == [(4, 4), (3, 2)]  # auto: q = (2, 3) and (4, 4)
    assert from_images[0].dtype == torch.bfloat16
    latents = encode_latents(vae, images)
    from_latents = prepare_anchors(vit, vae_latents=latents, dim=32, like=tokens)
    # a pipeline's 5-D one-frame latents work too, without the VAE
    five_d = [z[:, None] for z in latents]
    from_5d = prepare_anchors(vit, vae_latents=five_d, dim=32, like=tokens)
    given = prepare_anchors(vit, anchors=from_images, dim=32, like=tokens)
    for a, g in (from_latents, from_5d, given):
        assert torch.equal(a, from_images[0]) and g == from_images[1]
    out = g2tr.reduce(tokens, from_images[0], vit, from_images[1], min_keep=1, backend="reference")
    assert out.cu_seqlens.tolist() == [0, 8, 11]


def test_prepare_anchors_checks_its_inputs():
    vae, vit = _tiny(), [(4, 4), (3, 2)]
    images = _images()
    anchors = torch.randn(16 + 6, 8)
    with pytest.raises(ValueError, match="exactly one of images.*got images and anchors"):
        prepare_anchors(vit, vae, images=images, anchors=(anchors, [(4, 4), (3, 2)]))
    with pytest.raises(ValueError, match="got none"):
        prepare_anchors(vit, vae)
    with pytest.raises(ValueError, match="need a vae"):
        prepare_anchors(vit, images=images, dim=8)
    with pytest.raises(ValueError, match="1 VAE images for 2 ViT images"):
        prepare_anchors(vit, vae, images=images[:1], dim=8)
    with pytest.raises(ValueError, match="vit_grids describe 2 images but there are 1 latents"):
        prepare_anchors(vit, vae_latents=[torch.randn(4, 8, 8)], dim=8)
    with pytest.raises(TypeError, match="pair"):
        prepare_anchors(vit, anchors=anchors)
    with pytest.raises(ValueError, match="anchor_grids describe 1 images"):
        prepare_anchors(vit, anchors=(anchors, [(4, 4)]))
    with pytest.raises(ValueError, match="M = 22 rows but anchor_grids describe 21"):
        prepare_anchors(vit, anchors=(anchors, [(4, 4), (5, 1)]))
    with pytest.raises(ValueError, match="D = 8, expected dim = 16"):
        prepare_anchors(vit, anchors=(anchors, [(4, 4), (3, 2)]), dim=16)
    with pytest.raises(ValueError, match="vit_grids of image 1 must be positive"):
        prepare_anchors([(4, 4), (0, 2)], anchors=(anchors, [(4, 4), (3, 2)]))


def test_images_with_the_wrong_channel_count_name_the_image():
    with pytest.raises(ValueError, match="image 1 has 4 channels but AutoencoderKLWan takes 3"):
        encode_latents(_video(diffusers.AutoencoderKLWan), [torch.rand(3, 16, 16), torch.rand(4, 16, 16)])
    # AutoencoderKLQwenImage21's default in_channels = 4: its pipeline converts images to RGBA
    rgba = type(_qwen21())(base_dim=8, z_dim=C, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False],
                           decoder_base_dim=8)
    with pytest.raises(ValueError, match="image 0 has 3 channels but AutoencoderKLQwenImage21 takes 4"):
        encode_latents(rgba, torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="image 0 must be a"):
        encode_latents(_tiny(), [torch.rand(16, 16)])
