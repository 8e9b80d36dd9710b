"""g2tr bench --e2e: the anchors' cost (VAE encode in understanding mode, pooling and projection
in both modes), the reduction on those anchors, and the BAGEL-depth estimate from per-layer
prefill times. Timings are not asserted here; the accounting is."""
import math

import pytest

from g2tr_kernels.bench import e2e


def test_estimate_formula():
    # t_N = 2 s, t_K = 1 s per layer; editing adds 0.5 s, understanding 10.5 s.
    est = e2e.estimate(2.0, 1.0, 28, {"editing": 0.5, "understanding": 10.5})
    assert est["vanilla_s"] == 56.0
    assert est["editing"]["total_s"] == 28.5 and est["editing"]["speedup"] == pytest.approx(56 / 28.5)
    assert est["understanding"]["break_even_layers"] == pytest.approx(10.5)
    assert est["editing"]["break_even_layers"] == pytest.approx(0.5)
    never = e2e.estimate(1.0, 1.0, 28, {"editing": 0.1})
    assert math.isinf(never["editing"]["break_even_layers"])


def test_flux_vae_config_is_the_flux_ae():
    c = e2e.FLUX_VAE
    assert c["latent_channels"] == 16 and c["block_out_channels"] == (128, 256, 512, 512)
    assert c["layers_per_block"] == 2 and len(c["down_block_types"]) == 4  # downsampling 8


def test_quick_run_counts_the_vae_and_reduces_on_its_anchors():
    result = e2e.run_e2e({"quick": True, "e2e_repeats": 1, "warmup": 1, "e2e_text": 10})
    c = result["config"]
    assert c["anchors_from_vae"] and c["vae"].startswith("FLUX AE encoder")
    # M1-tiny: 18x18 ViT tokens, 8x8 anchors -> 8 * 32 = 256 pixels a side at the VAE.
    assert c["anchor_grids"] == [(8, 8)] and c["vae_inputs"] == [[256, 256]]
    assert len(result["vae_all_s"]) == 1 and result["vae_s"] > 0 and result["pool_project_s"] > 0
    est = result["estimate"]
    t_n, t_k = result["per_layer_s"]["full"], result["per_layer_s"]["reduced"]
    added = result["reduce_s"] + result["pool_project_s"] + result["vae_s"]
    assert est["understanding"]["added_s"] == pytest.approx(added)
    assert est["understanding"]["speedup"] == pytest.approx(28 * t_n / (28 * t_k + added))
    assert est["editing"]["added_s"] == pytest.approx(result["reduce_s"] + result["pool_project_s"])
    md = result["markdown"]
    assert "ESTIMATE for a 28-layer model" in md and "understanding (VAE encode" in md


def test_cli_takes_the_e2e_flags():
    from g2tr_kernels.cli import _parser

    args = _parser().parse_args(["bench", "--e2e", "--e2e-vae", "none", "--e2e-vae-resolution", "256",
                                 "--e2e-depth", "28", "--e2e-layers", "1"])
    assert (args.e2e_vae, args.e2e_vae_resolution, args.e2e_depth, args.e2e_layers) == ("none", 256, 28, 1)
