"""apply_g2tr on the transformers families whose model computes multimodal RoPE ids (M-RoPE).

Beyond the Qwen2-VL / Qwen3-VL rows of test_hf_families.py: GLM-4.1V / 4.5V / 4.6V / GLM-OCR and
Qwen3.5 (dense and MoE), tiny random configs built offline. Each: keep_ratio 1.0 gives the plain
model's logits, rope_deltas and generations; 0.5 gives the plain model's output on the prompt
reduced by hand (the model's own get_rope_index on the unreduced prompt, taken at the kept
columns; rope_deltas + dropped tokens). Every other installed family that computes M-RoPE ids
has a row that refuses it at apply time, with its reason.
"""
import functools
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("diffusers")

import test_hf_families as families  # noqa: E402
from test_hf_families import (  # noqa: E402
    BOI,
    EOI,
    GENERATE_MODES,
    IMG,
    VID,
    _qwen_case,
    kept_columns,
    lm_lengths,
    merge_like,
    take,
)

import g2tr_kernels as g2tr  # noqa: E402
from g2tr_kernels.anchors import anchors_from_vae  # noqa: E402
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


def _served_case(name):
    config, model, vision, text, extra = SERVED[name]
    case = _qwen_case(getattr(transformers, config), getattr(transformers, model), vision, text, **extra)
    assert case.model.config.model_type == name
    return case


# test_hf_families' own checks (keep 1.0 == the plain model; 0.5 == the prompt reduced by hand,
# forward and generate) run here on these families: its tests look their case up by name.
for _name in SERVED:
    families.CASES[_name] = functools.partial(_served_case, _name)
build = families.build


@pytest.mark.parametrize("name", sorted(SERVED))
def test_keep_all_is_the_plain_model(name):
    families.test_keep_all_is_the_plain_model(name)


@pytest.mark.parametrize("name", sorted(SERVED))
def test_half_matches_the_prompt_reduced_by_hand(name):
    families.test_half_matches_the_prompt_reduced_by_hand(name)


# every mode on one GLM and one Qwen3.5 model, greedy on the rest (they share the code path)
GENERATE_CASES = [(n, "greedy") for n in sorted(SERVED)] + [
    (n, m) for n in ("glm4v", "qwen3_5") for m in sorted(GENERATE_MODES) if m != "greedy"]


@pytest.mark.parametrize("name,mode", GENERATE_CASES)
def test_half_generate_matches_the_prompt_reduced_by_hand(name, mode):
    families.test_half_generate_matches_the_prompt_reduced_by_hand(name, mode)


def test_glm_images_and_videos_in_one_call_are_refused():
    # GLM-4V's video frames are image-token placeholders: the image-token runs are not the images'
    case = build("glm4v")
    apply_g2tr(case.model, case.model_vae, keep_ratio=0.5, min_keep=1, pool=case.pool)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="glm4v: images and videos in one call"):
        case.model(**case.inputs, vae_pixel_values=case.vae_images, pixel_values_videos=torch.zeros(1, 96),
                   video_grid_thw=torch.tensor([[1, 2, 2]]))


# -- a second turn with a new image on the KV cache ------------------------------------------
def _image(h, w):
    return [BOI] + [IMG] * (h * w) + [EOI]


TURN2 = [6] + _image(4, 6) + [7]  # the case's second image (w > h)


def _turns(case):
    """The case's first two images as a conversation: turn 1 asks about image 0, turn 2 (after
    the answer) about image 1. Patch rows 0:64 are image 0's, 64:160 image 1's."""
    thw = case.inputs["image_grid_thw"][:2]
    ids1 = torch.tensor([[1, 3] + _image(4, 4) + [4, 5]])
    return ids1, thw, case.inputs["pixel_values"][:160]


def _generate(model, ids, options=(), **kwargs):
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == IMG).long(),
                         max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True,
                         **kwargs)
    return out, torch.stack(out.logits, 1)


def _with_text_row(positions):
    """generate's own [4, 1, L] layout for one unpadded prompt: text positions first."""
    return torch.cat([torch.arange(positions.shape[-1])[None, None], positions])


def _reduced(case, image, pixels, thw):
    """g2tr.reduce of one image's features at keep 0.5, against its own VAE image's anchors."""
    encoded = case.model.get_image_features(pixel_values=pixels, image_grid_thw=thw, return_dict=True)
    feats = torch.cat(list(encoded.pooler_output))
    anchors, grids = anchors_from_vae(case.model_vae, case.vae_images[image:image + 1], projection="interpolate",
                                      pool=case.pool, dim=32)
    h, w = int(thw[0, 1]) // 2, int(thw[0, 2]) // 2
    out = g2tr.reduce(feats, anchors, [(h, w)], grids, 0.5, min_keep=1)
    encoded.pooler_output = [out.merged]
    if getattr(encoded, "deepstack_features", None) is not None:  # Qwen3-VL
        encoded.deepstack_features = [merge_like(torch.cat(layer), out) for layer in encoded.deepstack_features]
    return encoded, out.keep_idx, h * w


def _first_turn_with_g2tr(case, ids1, thw, pixels, keep_ratio):
    """Turn 1 through apply_g2tr and generate, image 0 with its VAE image: (handle, output)."""
    handle = apply_g2tr(case.model, case.model_vae, keep_ratio=keep_ratio, min_keep=1, pool=case.pool)
    first, _ = _generate(case.model, ids1, pixel_values=pixels[:64], image_grid_thw=thw[:1],
                         vae_pixel_values=case.vae_images[:1])
    return handle, first


TWO_TURNS = ["glm4v", "qwen3_5", "qwen3_vl"]  # qwen3_vl: deepstack features of the new image only


@pytest.mark.parametrize("name", TWO_TURNS)
def test_second_turn_image_on_the_cache_keep_all_is_the_plain_model(name):
    case = build(name)
    model = case.model
    ids1, thw, pixels = _turns(case)
    with torch.no_grad():
        # plain transformers runs this case from the new image's encoder output and every grid
        first, _ = _generate(model, ids1, pixel_values=pixels[:64], image_grid_thw=thw[:1])
        ids2 = torch.cat([first.sequences, torch.tensor([TURN2])], 1)
        new = model.get_image_features(pixel_values=pixels[64:], image_grid_thw=thw[1:], return_dict=True)
        ref, ref_logits = _generate(model, ids2, mm_encoder_outputs={"image": new}, image_grid_thw=thw,
                                    past_key_values=first.past_key_values)
        _, first = _first_turn_with_g2tr(case, ids1, thw, pixels, 1.0)
        assert torch.equal(first.sequences, ids2[:, : first.sequences.shape[1]])
        # the processor's pixel_values of the whole conversation; VAE images of the new image
        out, logits = _generate(model, ids2, pixel_values=pixels, image_grid_thw=thw,
                                past_key_values=first.past_key_values, vae_pixel_values=case.vae_images[1:2])
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)


def _first_turn_by_hand(case, ids1, thw, pixels):
    """Turn 1 reduced by hand and generated: (reduced prompt, generate output with its cache,
    keep_idx, image tokens). Sets rope_deltas as the wrapper does (generate does not when given
    position_ids), for a later turn without images."""
    model = case.model
    enc1, keep1, n1 = _reduced(case, 0, pixels[:64], thw[:1])
    cols1 = kept_columns(ids1, keep1)
    pos1, deltas = model.model.get_rope_index(ids1, mm_token_type_ids=(ids1 == IMG).long(), image_grid_thw=thw[:1])
    r1 = take(ids1, cols1)
    first, _ = _generate(model, r1, mm_encoder_outputs={"image": enc1}, image_grid_thw=thw[:1],
                         position_ids=_with_text_row(take(pos1, cols1)))
    model.model.rope_deltas = deltas + (ids1.shape[1] - r1.shape[1])
    return r1, first, keep1, n1


@pytest.mark.parametrize("name", ["qwen3_5", "glm4v"])
def test_a_text_turn_on_a_reduced_cache_matches_the_conversation_reduced_by_hand(name):
    # the conversation as generate returned it (unreduced) continues a cache that holds it
    # reduced: generate must feed exactly the new tokens, at positions after the reduced prompt
    case = build(name)
    model = case.model
    ids1, thw, pixels = _turns(case)
    text = torch.tensor([[9, 10, 11]])
    with torch.no_grad():
        r1, first_ref, _, _ = _first_turn_by_hand(case, ids1, thw, pixels)
        r2 = torch.cat([first_ref.sequences, text], 1)
        ref, ref_logits = _generate(model, r2, image_grid_thw=thw[:1], past_key_values=first_ref.past_key_values)
        _, first = _first_turn_with_g2tr(case, ids1, thw, pixels, 0.5)
        ids2 = torch.cat([first.sequences, text], 1)
        out, logits = _generate(model, ids2, image_grid_thw=thw[:1], past_key_values=first.past_key_values)
    assert torch.equal(first.sequences[:, ids1.shape[1]:], first_ref.sequences[:, r1.shape[1]:])
    assert torch.equal(out.sequences[:, : ids2.shape[1]], ids2)  # the conversation comes back unreduced
    assert torch.equal(out.sequences[:, ids2.shape[1]:], ref.sequences[:, r2.shape[1]:])
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", TWO_TURNS)
def test_second_turn_image_on_the_cache_half_matches_the_conversation_reduced_by_hand(name):
    case = build(name)
    model = case.model
    ids1, thw, pixels = _turns(case)
    with torch.no_grad():
        # by hand: turn 1 reduced, generated, cached; turn 2 = the whole conversation at the kept
        # columns, M-RoPE ids from get_rope_index over the whole unreduced conversation
        r1, first_ref, keep1, n1 = _first_turn_by_hand(case, ids1, thw, pixels)
        answer = first_ref.sequences[:, r1.shape[1]:]
        ids2 = torch.cat([ids1, answer, torch.tensor([TURN2])], 1)
        enc2, keep2, _ = _reduced(case, 1, pixels[64:], thw[1:])
        cols2 = kept_columns(ids2, torch.cat([keep1, keep2 + n1]))
        pos2, _ = model.model.get_rope_index(ids2, mm_token_type_ids=(ids2 == IMG).long(), image_grid_thw=thw)
        r2 = take(ids2, cols2)
        ref, ref_logits = _generate(model, r2, mm_encoder_outputs={"image": enc2}, image_grid_thw=thw,
                                    position_ids=_with_text_row(take(pos2, cols2)),
                                    past_key_values=first_ref.past_key_values)
        handle, first = _first_turn_with_g2tr(case, ids1, thw, pixels, 0.5)
        assert torch.equal(first.sequences, ids2[:, : first.sequences.shape[1]])  # the prompt comes back
        seen, hook = lm_lengths(model)
        out, logits = _generate(model, ids2, pixel_values=pixels, image_grid_thw=thw,
                                past_key_values=first.past_key_values, vae_pixel_values=case.vae_images[1:2])
        hook.remove()
    assert torch.equal(handle.last.output.keep_idx, keep2)
    assert seen[0] == r2.shape[1] - (r1.shape[1] + 2)  # the uncached columns: last answer token + turn 2
    assert torch.equal(out.sequences[:, ids2.shape[1]:], ref.sequences[:, r2.shape[1]:])
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)


def test_a_cache_the_conversation_does_not_continue_is_an_error():
    # the wrapper finds the cache's end from how this handle reduced the earlier turns: a cache
    # filled otherwise would misplace every later id, so it is an error, never a silent shift
    case = build("qwen3_5")
    model, vae = case.model, case.model_vae
    ids1, thw, pixels = _turns(case)
    with torch.no_grad():
        plain, _ = _generate(model, ids1, pixel_values=pixels[:64], image_grid_thw=thw[:1])
        ids2 = torch.cat([plain.sequences, torch.tensor([TURN2])], 1)
        handle = apply_g2tr(model, vae, keep_ratio=1.0, min_keep=1, pool=case.pool)
        second = dict(pixel_values=pixels, image_grid_thw=thw, vae_pixel_values=case.vae_images[1:2])
        with pytest.raises(ValueError, match="not filled by this handle's generate"):
            _generate(model, ids2, past_key_values=plain.past_key_values, **second)
        unreduced, _ = _generate(model, ids1, pixel_values=pixels[:64], image_grid_thw=thw[:1],
                                 vae_pixel_values=case.vae_images[:1])
        handle.remove()
        apply_g2tr(model, vae, keep_ratio=0.5, min_keep=1, pool=case.pool)
        with pytest.raises(ValueError, match="reduced by 0 tokens, these input_ids reduce the part it would hold by"):
            _generate(model, ids2, past_key_values=unreduced.past_key_values, **second)
        with pytest.raises(NotImplementedError, match="one conversation at a time, got a batch of 2"):
            _generate(model, ids2.repeat(2, 1), past_key_values=unreduced.past_key_values,
                      **dict(second, pixel_values=torch.cat([pixels, pixels]), image_grid_thw=thw.repeat(2, 1)))


def test_a_forward_with_images_after_cached_turns_is_refused_with_the_reason():
    # forward gets only the new tokens, not the conversation its M-RoPE ids continue
    case = build("qwen3_5")
    model, inputs = case.model, case.inputs
    apply_g2tr(model, case.model_vae, keep_ratio=0.5, min_keep=1, pool=case.pool)
    with torch.no_grad():
        first = model(**inputs, vae_pixel_values=case.vae_images, use_cache=True)
        mask = torch.cat([model._g2tr_handle.last.layout.attention_mask, inputs["attention_mask"]], dim=-1)
        with pytest.raises(NotImplementedError, match="qwen3_5: a forward with images after cached turns"):
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
