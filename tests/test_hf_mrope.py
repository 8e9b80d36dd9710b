"""apply_g2tr on the transformers families whose model computes multimodal RoPE ids (M-RoPE).

Beyond the Qwen2-VL / Qwen3-VL rows of test_hf_families.py: GLM-4.1V / 4.5V / 4.6V / GLM-OCR and
Qwen3.5 (dense and MoE), tiny random configs built offline. Each: keep_ratio 1.0 gives the plain
model's logits, rope_deltas and generations; 0.5 gives the plain model's output on the prompt
reduced by hand (the model's own get_rope_index on the unreduced prompt, taken at the kept
columns; rope_deltas + dropped tokens). Every other installed family that computes M-RoPE ids
has a row that refuses it at apply time, with its reason.
"""
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from test_hf_families import (  # noqa: E402
    BOI,
    EOI,
    GENERATE_MODES,
    IMG,
    VID,
    _qwen_case,
    hand_reduced,
    lm_lengths,
)

from g2tr_kernels.integrations.hf import apply_g2tr  # noqa: E402
from g2tr_kernels.integrations.hf_support import FAMILIES, resolve  # noqa: E402

from helpers import tiny_vae  # noqa: E402

VISION = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=32, patch_size=4,
              spatial_merge_size=2, temporal_patch_size=2)
GLM_VISION = dict(VISION, image_size=32)
QWEN3_5_VISION = dict(VISION, num_position_embeddings=16)
GLM_TOKENS = dict(image_token_id=IMG, video_token_id=VID, image_start_token_id=BOI, image_end_token_id=EOI)

# model_type -> (config, model, vision config, text config overrides, extra _qwen_case arguments)
SERVED = {
    "glm4v": ("Glm4vConfig", "Glm4vForConditionalGeneration", GLM_VISION, {}, dict(tokens=GLM_TOKENS)),
    # GLM-4.5V: partial rotary (half of head_dim 16 rotates), so the sections sum to 4
    "glm4v_moe": ("Glm4vMoeConfig", "Glm4vMoeForConditionalGeneration", GLM_VISION,
                  dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=0),
                  dict(tokens=GLM_TOKENS, mrope_section=(1, 1, 2))),
    "glm46v": ("Glm46VConfig", "Glm46VForConditionalGeneration", GLM_VISION, {}, dict(tokens=GLM_TOKENS)),
    "glm_ocr": ("GlmOcrConfig", "GlmOcrForConditionalGeneration", GLM_VISION, {}, dict(tokens=GLM_TOKENS)),
    # a gated-delta (linear attention) layer before the full-attention one, as Qwen3.5 stacks them
    "qwen3_5": ("Qwen3_5Config", "Qwen3_5ForConditionalGeneration", QWEN3_5_VISION,
                dict(head_dim=16, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
                     linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                     linear_num_value_heads=2), {}),
    "qwen3_5_moe": ("Qwen3_5MoeConfig", "Qwen3_5MoeForConditionalGeneration", QWEN3_5_VISION,
                    dict(head_dim=16, layer_types=["full_attention"], num_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=16, shared_expert_intermediate_size=16), {}),
}


def build(name):
    config, model, vision, text, extra = SERVED[name]
    case = _qwen_case(getattr(transformers, config), getattr(transformers, model), vision, text, **extra)
    case.model_vae = tiny_vae()
    assert case.model.config.model_type == name
    return case


@pytest.mark.parametrize("name", sorted(SERVED))
def test_keep_all_is_the_plain_model(name):
    case = build(name)
    model, inputs = case.model, case.inputs
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_deltas = model.model.rope_deltas.clone()
        ref_gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        handle = apply_g2tr(model, case.model_vae, keep_ratio=1.0, min_keep=1, pool=case.pool)
        out = model(**inputs, vae_pixel_values=case.vae_images).logits
        deltas = model.model.rope_deltas.clone()
        gen = model.generate(**inputs, vae_pixel_values=case.vae_images, max_new_tokens=3, do_sample=False)
    assert handle.family.model_type == name and handle.last.grids == case.grids
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(deltas, ref_deltas)
    assert torch.equal(gen, ref_gen)


@pytest.mark.parametrize("name", sorted(SERVED))
def test_half_matches_the_prompt_reduced_by_hand(name):
    case = build(name)
    model, inputs = case.model, case.inputs
    reduced, expected, kept = hand_reduced(case, 0.5)
    deltas = reduced.pop("_rope_deltas")
    with torch.no_grad():
        ref = model(**reduced).logits
        handle = apply_g2tr(model, case.model_vae, keep_ratio=0.5, min_keep=1, pool=case.pool)
        seen, hook = lm_lengths(model)
        out = model(**inputs, vae_pixel_values=case.vae_images).logits
        hook.remove()
    assert handle.last.kept == kept and torch.equal(handle.last.output.keep_idx, expected.keep_idx)
    assert seen == [reduced["input_ids"].shape[1]] and seen[0] < inputs["input_ids"].shape[1]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.model.rope_deltas, deltas)  # decoding continues after the reduced prompt


# every mode on one GLM and one Qwen3.5 model, greedy on the rest (they share the code path)
GENERATE_CASES = [(n, "greedy") for n in sorted(SERVED)] + [
    (n, m) for n in ("glm4v", "qwen3_5") for m in sorted(GENERATE_MODES) if m != "greedy"]


@pytest.mark.parametrize("name,mode", GENERATE_CASES)
def test_half_generate_matches_the_prompt_reduced_by_hand(name, mode):
    case = build(name)
    model, inputs = case.model, case.inputs
    reduced, _, _ = hand_reduced(case, 0.5, generate=True)
    reduced.pop("_rope_deltas")
    options = dict(max_new_tokens=4, **GENERATE_MODES[mode])
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        torch.manual_seed(5)
        ref = model.generate(**reduced, **options)
        apply_g2tr(model, case.model_vae, keep_ratio=0.5, min_keep=1, pool=case.pool)
        torch.manual_seed(5)
        gen = model.generate(**inputs, vae_pixel_values=case.vae_images, **options)
    repeat = options.get("num_return_sequences", 1)
    assert torch.equal(gen[:, :length], inputs["input_ids"].repeat_interleave(repeat, 0))  # the prompt comes back
    assert torch.equal(gen[:, length:], ref[:, reduced["input_ids"].shape[1]:])


def test_glm_images_and_videos_in_one_call_are_refused():
    # GLM-4V's video frames are image-token placeholders: the image-token runs are not the images'
    case = build("glm4v")
    apply_g2tr(case.model, case.model_vae, keep_ratio=0.5, min_keep=1, pool=case.pool)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="glm4v: images and videos in one call"):
        case.model(**case.inputs, vae_pixel_values=case.vae_images, pixel_values_videos=torch.zeros(1, 96),
                   video_grid_thw=torch.tensor([[1, 2, 2]]))


def test_images_after_cached_turns_are_refused_with_the_reason():
    # A second turn's image on a KV cache: its M-RoPE ids continue the cached, reduced turn, which
    # this call cannot see (see the README); refused, never run with ids of the wrong prompt.
    case = build("qwen3_5")
    model, inputs = case.model, case.inputs
    apply_g2tr(model, case.model_vae, keep_ratio=0.5, min_keep=1, pool=case.pool)
    with torch.no_grad():
        first = model(**inputs, vae_pixel_values=case.vae_images, use_cache=True)
        mask = torch.cat([model._g2tr_handle.last.layout.attention_mask, inputs["attention_mask"]], dim=-1)
        with pytest.raises(NotImplementedError, match="qwen3_5: a prefill with images after cached turns"):
            model(**dict(inputs, attention_mask=mask), past_key_values=first.past_key_values,
                  vae_pixel_values=case.vae_images)


# -- refused M-RoPE families ------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(n for n, f in FAMILIES.items() if f.refused))
def test_refused_rows_refuse_at_apply_time_with_their_reason(name):
    stand_in = SimpleNamespace(config=SimpleNamespace(model_type=name))
    with pytest.raises(NotImplementedError, match=rf"{name} is not supported.*{re.escape(FAMILIES[name].refused)}"):
        resolve(stand_in)


def test_a_real_refused_model_is_refused_before_anything_is_patched():
    torch.manual_seed(0)
    config = transformers.HunYuanVLConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=64, vocab_size=128, head_dim=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           out_hidden_size=32, text_hidden_size=32, patch_size=4),
        image_token_id=IMG,
    )
    model = transformers.HunYuanVLForConditionalGeneration(config)
    with pytest.raises(NotImplementedError, match="hunyuan_vl is not supported.*image_newline.*g2tr_kernels.reduce"):
        apply_g2tr(model, tiny_vae())
    assert "forward" not in model.__dict__


def test_a_model_type_without_a_row_is_refused():
    class RenamedConfig(transformers.Qwen2VLConfig):
        model_type = "my_mrope_vlm"

    case = _qwen_case(RenamedConfig, transformers.Qwen2VLForConditionalGeneration)
    with pytest.raises(NotImplementedError, match="my_mrope_vlm is not supported.*no row in the support table"):
        apply_g2tr(case.model, tiny_vae())


def test_every_installed_family_that_computes_mrope_ids_has_a_row():
    # Read from the installed transformers' sources: a new M-RoPE family must get a row (served
    # or refused with its reason) before the table can claim to cover them.
    models = Path(transformers.__file__).parent / "models"
    missing = []
    for modeling in sorted(models.glob("*/modeling_*.py")):
        source = modeling.read_text()
        if "def get_rope_index" not in source and "self.rope_deltas" not in source:
            continue
        configs = "".join(p.read_text() for p in modeling.parent.glob("configuration_*.py"))
        types = set(re.findall(r'model_type = "([a-z0-9_]+)"', configs))
        if not types & set(FAMILIES):
            missing.append(f"{modeling.parent.name} ({', '.join(sorted(types))})")
    assert missing == []
