"""The plugin without an engine: registration, config checks, refusals, the row-count check."""
import importlib.metadata

import pytest
import torch

from g2tr_kernels.integrations import vllm as plugin


def test_entry_point_names_register():
    eps = [e for e in importlib.metadata.entry_points(group="vllm.general_plugins") if e.name == "g2tr"]
    assert [e.value for e in eps] == ["g2tr_kernels.integrations.vllm:register"]


def test_register_is_idempotent():
    from vllm import ModelRegistry

    plugin.register()
    first = {arch: ModelRegistry.models[arch] for arch in plugin.MODELS}
    guard = ModelRegistry.inspect_model_cls
    plugin.register()
    assert {arch: ModelRegistry.models[arch] for arch in plugin.MODELS} == first
    assert ModelRegistry.inspect_model_cls is guard and guard._g2tr_guard
    for arch, target in plugin.MODELS.items():
        assert f"{first[arch].module_name}:{first[arch].class_name}" == target


def _model_config(folder, g2tr):
    from vllm.config import ModelConfig

    plugin.register()
    return ModelConfig(model=folder, hf_overrides={"g2tr": g2tr} if g2tr is not None else {})


def test_unsupported_architecture_with_the_key_is_refused(tmp_path, models):
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = str(tmp_path / "llama")
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
                                 vocab_size=64)).save_pretrained(folder)
    PreTrainedTokenizerFast.from_pretrained(models["llava"]).save_pretrained(folder)
    with pytest.raises(ValueError, match="LlamaForCausalLM is not served with G2TR"):
        _model_config(folder, {"vae": models["vae"]})
    assert _model_config(folder, None).architecture == "LlamaForCausalLM"  # no key: stock


@pytest.mark.parametrize(
    "g2tr, message",
    [
        ({"keep_ratio": 0.5}, "needs 'vae'"),
        ({"vae": "/nonexistent/vae"}, "is not a folder"),
        ({"keep_ratio": 0.5, "vae": None, "keepratio": 1}, "unknown keys \\['keepratio'\\]"),
        ({"keep_ratio": 1.5, "vae": "VAE"}, "keep_ratio"),
        ({"min_keep": 0, "vae": "VAE"}, "min_keep"),
        ({"backend": "gpu", "vae": "VAE"}, "backend"),
    ],
)
def test_bad_settings_are_refused_when_the_config_is_read(models, g2tr, message):
    g2tr = {k: (models["vae"] if v == "VAE" else v) for k, v in g2tr.items()}
    with pytest.raises((ValueError, TypeError), match=message):
        _model_config(models["llava"], g2tr)


def test_placeholder_count_and_rows_come_from_budgets(models):
    cfg = plugin.serving_config(type("C", (), {"g2tr": {"keep_ratio": 0.5, "min_keep": 8, "vae": models["vae"]}})())
    import g2tr_kernels

    assert cfg.budgets([64, 1369, 5]) == g2tr_kernels.budgets([64, 1369, 5], 0.5, 8) == [32, 684, 5]


def test_wrong_row_count_raises():
    plugin.check_rows([32, 20], [32, 20], "LLaVA")
    with pytest.raises(RuntimeError, match="image 1: the encoder returned 21 rows but the prompt holds 20"):
        plugin.check_rows([32, 21], [32, 20], "LLaVA")
    with pytest.raises(RuntimeError, match="returned 1 image embeddings for 2 images"):
        plugin.check_rows([32], [32, 20], "LLaVA")


def test_reducer_refuses_tokens_off_the_grid(models):
    cfg = plugin.serving_config(type("C", (), {"g2tr": {"min_keep": 4, "vae": models["vae"], "pool": 1}})())
    reducer = plugin.Reducer(cfg, hidden_size=16)
    feats = [torch.randn(63, 16)]
    with pytest.raises(RuntimeError, match="image 0: 63 tokens from the encoder, grid 8 x 8"):
        reducer(feats, [(8, 8)], [torch.zeros(3, 32, 32)], "LLaVA")


def test_reducer_matches_g2tr_kernels(models):
    from diffusers import AutoencoderKL

    import g2tr_kernels
    from g2tr_kernels.anchors import anchors_from_vae

    cfg = plugin.serving_config(type("C", (), {"g2tr": {"min_keep": 4, "vae": models["vae"], "pool": 2}})())
    reducer = plugin.Reducer(cfg, hidden_size=16)
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(64, 16, generator=g), torch.randn(48, 16, generator=g)]
    images = [torch.rand(3, 32, 32, generator=g) * 2 - 1, torch.rand(3, 32, 24, generator=g) * 2 - 1]
    pieces, _ = reducer(feats, [(8, 8), (8, 6)], images, "test")
    vae = AutoencoderKL.from_pretrained(models["vae"]).eval()
    anchors, agrids = anchors_from_vae(vae, images, projection="interpolate", pool=2, dim=16)
    want = g2tr_kernels.reduce(torch.cat(feats), anchors, [(8, 8), (8, 6)], agrids, keep_ratio=0.5, min_keep=4)
    assert [p.shape[0] for p in pieces] == [32, 24]
    assert torch.equal(torch.cat(pieces), want.merged)
