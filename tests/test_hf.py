"""apply_g2tr on tiny random-weight transformers VLMs (InternVL, LLaVA) with a tiny AutoencoderKL.

Everything is built from configs: nothing is downloaded.
"""
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from transformers import (  # noqa: E402
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlavaConfig,
    LlavaForConditionalGeneration,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling  # noqa: E402

import g2tr_kernels as g2tr  # noqa: E402
from g2tr_kernels.anchors import anchors_from_vae  # noqa: E402
from g2tr_kernels.integrations.hf import apply_g2tr  # noqa: E402

from helpers import tiny_vae  # noqa: E402

IMG = 100  # image-context token id
PAD = 0


def tiny_internvl():
    # 64 px tiles, 8 px patches -> 8 x 8 ViT grid -> pixel shuffle 0.5 -> 4 x 4 = 16 tokens per tile
    torch.manual_seed(0)
    config = InternVLConfig(
        vision_config=dict(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            image_size=(64, 64), patch_size=(8, 8),
        ),
        text_config=dict(
            model_type="qwen2", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=64, vocab_size=128, max_position_embeddings=256, pad_token_id=PAD,
        ),
        image_token_id=IMG, image_seq_length=16,
    )
    return InternVLForConditionalGeneration(config).eval()


def tiny_llava():
    # CLIP tower on 32 px images, 8 px patches -> 16 patch tokens (+ CLS, dropped) per image
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, image_size=32, patch_size=8, projection_dim=32,
        ),
        text_config=dict(
            model_type="llama", hidden_size=48, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=64, vocab_size=128, max_position_embeddings=256, pad_token_id=PAD,
        ),
        image_token_index=IMG, image_seq_length=16, vision_feature_layer=-2,
    )
    return LlavaForConditionalGeneration(config).eval()


def internvl_inputs():
    # row 0: one tile, left padded; row 1: two tiles. 16 image tokens per tile.
    torch.manual_seed(2)
    ids = torch.tensor([
        [PAD] * 16 + [1, 2] + [IMG] * 16 + [3, 4],
        [5] + [IMG] * 16 + [6] + [IMG] * 16 + [7, 8],
    ])
    return ids, (ids != PAD).long(), torch.randn(3, 3, 64, 64)


def language_model_lengths(model):
    seen = []
    hook = model.model.language_model.register_forward_hook(
        lambda module, args, kwargs, out: seen.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    return seen, hook


def drop_image_tokens(ids, keep_idx, left):
    """The reduced prompt, written independently of g2tr_kernels.layout: walk the tokens."""
    keep, occurrence, rows = set(keep_idx.tolist()), 0, []
    for row in ids.tolist():
        new = []
        for token in row:
            if token == IMG:
                if occurrence in keep:
                    new.append(token)
                occurrence += 1
            else:
                new.append(token)
        rows.append(new)
    width = max(len(r) for r in rows)
    pad = [[PAD] * (width - len(r)) for r in rows]
    rows = [p + r if left else r + p for p, r in zip(pad, rows)]
    out = torch.tensor(rows)
    real = [width - len(p) for p in pad]
    mask = torch.tensor([[0] * len(p) + [1] * r if left else [1] * r + [0] * len(p) for p, r in zip(pad, real)])
    if left:
        # the original left padding stays padding
        mask = mask * (out != PAD).long()
    return out, mask


def reduced_by_hand(model, vae, pixel_values, keep_ratio, pool):
    """Features and reduce output computed outside the wrapper, from the model's own pieces."""
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
        feats = feats if isinstance(feats, torch.Tensor) else torch.stack(list(feats))
        b, n, d = feats.shape
        side = int(n ** 0.5)
        anchors, anchor_grids = anchors_from_vae(vae, pixel_values, projection="interpolate", pool=pool, dim=d)
        return g2tr.reduce(feats.reshape(b * n, d), anchors, [(side, side)] * b, anchor_grids, keep_ratio, min_keep=1)


def internvl_half():
    """Tiny InternVL, its VAE and inputs, and what keep_ratio 0.5 (pool 4) must hand the language
    model, computed by hand: the reduced prompt, its mask and the merged image features."""
    model, vae = tiny_internvl(), tiny_vae()
    ids, mask, px = internvl_inputs()
    expected = reduced_by_hand(model, vae, px, 0.5, pool=4)
    exp_ids, exp_mask = drop_image_tokens(ids, expected.keep_idx, left=True)
    features = {"image": BaseModelOutputWithPooling(pooler_output=expected.merged.reshape(3, 8, -1))}
    return model, vae, (ids, mask, px), (exp_ids, exp_mask, features)


def test_internvl_keep_all_equals_the_plain_model():
    model, vae = tiny_internvl(), tiny_vae()
    ids, mask, px = internvl_inputs()
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=px, attention_mask=mask).logits
        ref_gen = model.generate(input_ids=ids, pixel_values=px, attention_mask=mask, max_new_tokens=3, do_sample=False)
        handle = apply_g2tr(model, vae, keep_ratio=1.0, min_keep=1, pool=4)
        out = model(input_ids=ids, pixel_values=px, attention_mask=mask, vae_pixel_values=px).logits
        gen = model.generate(
            input_ids=ids, pixel_values=px, attention_mask=mask, vae_pixel_values=px, max_new_tokens=3, do_sample=False
        )
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.equal(gen, ref_gen)
    assert handle.last.kept == [16, 16, 16]


def test_internvl_half_forward_sees_k_tokens_and_matches_hand_reduction():
    model, vae, (ids, mask, px), (exp_ids, exp_mask, features) = internvl_half()
    with torch.no_grad():
        ref = model(input_ids=exp_ids, attention_mask=exp_mask, mm_encoder_outputs=features).logits
        handle = apply_g2tr(model, vae, keep_ratio=0.5, min_keep=1, pool=4)
        seen, hook = language_model_lengths(model)
        out = model(input_ids=ids, pixel_values=px, attention_mask=mask, vae_pixel_values=px).logits
        hook.remove()
    # row 0: 16 pad + 2 + 16 + 2 = 36 -> 28; row 1: 1 + 16 + 1 + 16 + 2 = 36 -> 20, left padded to 28
    assert seen == [28]
    assert handle.last.layout.lengths == [28, 20]
    assert handle.last.kept == [8, 8, 8]
    assert torch.equal(handle.last.layout.input_ids, exp_ids)
    assert int((handle.last.layout.input_ids == IMG).sum()) == 3 * 8
    assert torch.allclose(out, ref, atol=1e-6)


def test_internvl_half_generate_runs_on_the_short_prompt():
    model, vae, (ids, mask, px), (exp_ids, exp_mask, features) = internvl_half()
    with torch.no_grad():
        ref = model.generate(
            input_ids=exp_ids, attention_mask=exp_mask, max_new_tokens=4, do_sample=False, mm_encoder_outputs=features
        )
        apply_g2tr(model, vae, keep_ratio=0.5, min_keep=1, pool=4)
        seen, hook = language_model_lengths(model)
        gen = model.generate(
            input_ids=ids, pixel_values=px, attention_mask=mask, vae_pixel_values=px, max_new_tokens=4, do_sample=False
        )
        hook.remove()
    assert seen == [exp_ids.shape[1], 1, 1, 1]  # prefill on the reduced prompt, then one token a step
    assert gen.shape == (2, ids.shape[1] + 4)
    assert torch.equal(gen[:, : ids.shape[1]], ids)  # the original prompt comes back in front
    assert torch.equal(gen[:, ids.shape[1] :], ref[:, exp_ids.shape[1] :])


def test_vae_images_from_argument_context_or_pixel_values_agree():
    model, vae = tiny_internvl(), tiny_vae()
    ids, mask, px = internvl_inputs()
    with torch.no_grad():
        handle = apply_g2tr(model, vae, keep_ratio=0.5, min_keep=1, pool=4)
        model(input_ids=ids, pixel_values=px, attention_mask=mask, vae_pixel_values=px)
        by_argument = handle.last.output
        with handle.images(px):
            model(input_ids=ids, pixel_values=px, attention_mask=mask)
        by_context = handle.last.output
        handle.remove()
        # mean = std = 0.5 maps processor space back to [0, 1], then to [-1, 1]: px itself
        handle = apply_g2tr(model, vae, keep_ratio=0.5, min_keep=1, pool=4, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        model(input_ids=ids, pixel_values=px, attention_mask=mask)
        by_default = handle.last.output
        # other VAE images give other anchors, hence other scores
        model(input_ids=ids, pixel_values=px, attention_mask=mask, vae_pixel_values=-px)
        other = handle.last.output
    assert torch.equal(by_argument.keep_idx, by_context.keep_idx) and torch.equal(by_argument.scores, by_context.scores)
    assert torch.allclose(by_argument.scores, by_default.scores, atol=1e-6)
    assert not torch.allclose(by_argument.scores, other.scores)


def test_llava_keep_all_equal_and_half_with_labels_and_generate():
    model, vae = tiny_llava(), tiny_vae()
    torch.manual_seed(3)
    px = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[1, 2] + [IMG] * 16 + [3, 4], [5] + [IMG] * 16 + [6, 7, 8]])
    labels = torch.where(ids == IMG, -100, ids)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=px, labels=labels)
        handle = apply_g2tr(model, vae, keep_ratio=1.0, min_keep=1, pool=2)
        same = model(input_ids=ids, pixel_values=px, labels=labels, vae_pixel_values=px)
        handle.remove()
        assert torch.allclose(same.logits, ref.logits, atol=1e-6) and torch.allclose(same.loss, ref.loss, atol=1e-6)

        handle = apply_g2tr(model, vae, keep_ratio=0.5, min_keep=1, pool=2)
        seen, hook = language_model_lengths(model)
        half = model(input_ids=ids, pixel_values=px, labels=labels, vae_pixel_values=px)
        half_labels = handle.last.layout.labels
        gen = model.generate(input_ids=ids, pixel_values=px, vae_pixel_values=px, max_new_tokens=3, do_sample=False)
        hook.remove()
        # positional ids and a dict result go through the same path
        as_dict = model.generate(
            ids, pixel_values=px, vae_pixel_values=px, max_new_tokens=3, do_sample=False, return_dict_in_generate=True
        )
    assert torch.equal(as_dict.sequences, gen)
    assert handle.last.grids == [(4, 4), (4, 4)] and handle.last.kept == [8, 8]
    assert seen[0] == 20 - 8 and seen[1] == 20 - 8  # forward, then generate's prefill
    assert half.logits.shape == (2, 12, 128) and torch.isfinite(half.loss)
    # the text labels survive; every image position was -100 already
    assert half_labels[0].tolist() == [1, 2] + [-100] * 8 + [3, 4]
    assert gen.shape == (2, 23) and torch.equal(gen[:, :20], ids)


def test_training_step_gets_gradients_into_the_projector():
    model, vae = tiny_llava(), tiny_vae()
    torch.manual_seed(4)
    px = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[1, 2] + [IMG] * 16 + [3, 4], [5] + [IMG] * 16 + [6, 7, 8]])
    apply_g2tr(model, vae, keep_ratio=0.5, min_keep=1, pool=2)
    loss = model(input_ids=ids, pixel_values=px, labels=torch.where(ids == IMG, -100, ids), vae_pixel_values=px).loss
    loss.backward()
    grad = model.model.multi_modal_projector.linear_1.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0


def test_apply_remove_and_refusals():
    model, vae = tiny_internvl(), tiny_vae()
    plain_forward = model.forward
    handle = apply_g2tr(model, vae, keep_ratio=0.5, min_keep=1)
    assert model.forward is not plain_forward
    with pytest.raises(RuntimeError, match="already applied"):
        apply_g2tr(model, vae)
    handle.remove()
    assert model.forward == plain_forward and "forward" not in model.__dict__
    with pytest.raises(ValueError, match="keep_ratio"):
        apply_g2tr(model, vae, keep_ratio=0.0)

    class UnknownVLM(torch.nn.Module):
        config = type("Config", (), {"model_type": "my_unknown_vlm", "image_token_id": IMG})()

        def get_image_features(self, pixel_values):
            return pixel_values

        def forward(self, input_ids=None, pixel_values=None, mm_encoder_outputs=None):
            return input_ids

    with pytest.raises(NotImplementedError, match="my_unknown_vlm is not supported.*no row.*rebuild_padded"):
        apply_g2tr(UnknownVLM(), vae)


def test_wrong_number_of_vae_images_is_named():
    model, vae = tiny_internvl(), tiny_vae()
    ids, mask, px = internvl_inputs()
    apply_g2tr(model, vae, keep_ratio=0.5, min_keep=1, pool=4)
    with torch.no_grad(), pytest.raises(ValueError, match="2 VAE images for 3"):
        model(input_ids=ids, pixel_values=px, attention_mask=mask, vae_pixel_values=px[:2])


def test_e2e_quick_prefill_runs():
    # g2tr bench --e2e on its smoke-test size: a 1-layer Qwen2 prefill with N and with K visual tokens
    from g2tr_kernels.bench.e2e import run_e2e

    result = run_e2e({"quick": True, "e2e_repeats": 1, "warmup": 1, "e2e_text": 10})
    assert result["visual_tokens"] == {"full": 324, "reduced": 162, "ratio": 2.0}  # 18 x 18, keep 0.5
    assert result["sequence"]["full"] == 324 + 10 + 2 and result["sequence"]["reduced"] == 162 + 10 + 2
    assert result["prefill_flops"]["ratio"] > 1.5
    assert result["speedup"] > 0 and result["reduce_s"] > 0
    assert "| G2TR | 162 |" in result["markdown"]


def test_no_vae_images_and_no_normalisation_is_an_error():
    model, vae = tiny_internvl(), tiny_vae()
    ids, mask, px = internvl_inputs()
    apply_g2tr(model, vae, keep_ratio=0.5, min_keep=1, pool=4)
    with torch.no_grad(), pytest.raises(ValueError, match="no images for the VAE"):
        model(input_ids=ids, pixel_values=px, attention_mask=mask)
