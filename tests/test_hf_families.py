"""apply_g2tr across transformers VLM families (tiny random configs, built offline).

Each supported family: keep_ratio 1.0 gives the plain model's logits and generations, and 0.5
gives the plain model's output on the same prompt reduced by hand (features from the model's
own get_image_features, g2tr.reduce, and the prompt rebuilt here by walking its tokens, not
with g2tr_kernels.layout). Families that cannot be reduced exactly are refused at apply time.
"""
import copy
import pickle
from dataclasses import dataclass, field
from typing import Any, Dict, List

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from transformers.modeling_outputs import BaseModelOutputWithPooling  # noqa: E402

import g2tr_kernels as g2tr  # noqa: E402
from g2tr_kernels.anchors import anchors_from_vae  # noqa: E402
from g2tr_kernels.integrations.hf import apply_g2tr  # noqa: E402
from g2tr_kernels.integrations.hf_support import FAMILIES, render_markdown  # noqa: E402

from helpers import tiny_vae  # noqa: E402

IMG, BOI, EOI, VID, BREAK, END = 100, 101, 102, 103, 104, 105
PAD = 0
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
            vocab_size=128, max_position_embeddings=256, pad_token_id=PAD)
VISION = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)


@dataclass
class Case:
    model: Any
    inputs: Dict[str, torch.Tensor]  # forward / generate keyword arguments (left-padded prompts)
    vae_images: Any  # one VAE image per vision-tower image
    grids: List[tuple]  # the ViT grid of each image, worked out here from the config
    vision_kwargs: Dict[str, Any] = field(default_factory=dict)
    per_token: tuple = ()  # inputs with one entry per prompt token, besides input_ids / attention_mask
    mrope: bool = False
    pool: int = 4
    anyres: bool = False  # parts per image: base tile + unpadded grid, newline tokens kept


def left_pad(rows, fill=PAD):
    width = max(len(r) for r in rows)
    return torch.tensor([[fill] * (width - len(r)) + r for r in rows])


# -- the families -------------------------------------------------------------------------
def gemma3_case():
    # SigLIP on 64 px, 8 px patches -> 8 x 8, pooled to 4 x 4 = 16 tokens per image
    torch.manual_seed(0)
    config = transformers.Gemma3Config(
        text_config=dict(model_type="gemma3_text", head_dim=16, sliding_window=8, **TEXT),
        vision_config=dict(model_type="siglip_vision_model", image_size=64, patch_size=8, **VISION),
        mm_tokens_per_image=16, image_token_index=IMG, boi_token_index=BOI, eoi_token_index=EOI,
    )
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    block = [BOI] + [IMG] * 16 + [EOI]
    ids = left_pad([[1, 2] + block + [3, 4, 5], [6] + block + [7] + block + [8, 9]])
    torch.manual_seed(1)
    px = torch.randn(3, 3, 64, 64)
    inputs = dict(input_ids=ids, attention_mask=(ids != PAD).long(), pixel_values=px,
                  token_type_ids=(ids == IMG).long())
    return Case(model, inputs, px, [(4, 4)] * 3, per_token=("token_type_ids",), pool=8)


def paligemma_case():
    # SigLIP on 32 px, 8 px patches -> 4 x 4 = 16 tokens; image tokens lead each prompt (prefix-LM)
    torch.manual_seed(0)
    config = transformers.PaliGemmaConfig(
        text_config=dict(model_type="gemma", head_dim=16, **TEXT),
        vision_config=dict(model_type="siglip_vision_model", image_size=32, patch_size=8, projection_dim=32, **VISION),
        image_token_index=IMG, projection_dim=32, hidden_size=32, vocab_size=128,
    )
    model = transformers.PaliGemmaForConditionalGeneration(config).eval()
    rows = [[IMG] * 16 + [2, 3, 4], [IMG] * 16 + [2, 5, 6, 7, 8]]
    ids = left_pad(rows)
    torch.manual_seed(1)
    px = torch.randn(2, 3, 32, 32)
    # prefix (image + prompt) 0, the suffix 1: the last two tokens of row 1
    types = torch.zeros_like(ids)
    types[1, -2:] = 1
    inputs = dict(input_ids=ids, attention_mask=(ids != PAD).long(), pixel_values=px, token_type_ids=types)
    return Case(model, inputs, px, [(4, 4)] * 2, per_token=("token_type_ids",), pool=4)


def mistral3_case():
    # Pixtral, 8 px patches, 2 x 2 patch merge: a 64 x 48 image -> 4 x 3 tokens, 48 x 64 -> 3 x 4,
    # 32 x 32 -> 2 x 2; each row of tokens ends in [IMG_BREAK], the last in [IMG_END]
    torch.manual_seed(0)
    config = transformers.Mistral3Config(
        text_config=dict(model_type="mistral", head_dim=16, **TEXT),
        vision_config=dict(model_type="pixtral", image_size=64, patch_size=8, head_dim=16, **VISION),
        image_token_index=IMG, spatial_merge_size=2,
    )
    model = transformers.Mistral3ForConditionalGeneration(config).eval()
    sizes = [(64, 48), (48, 64), (32, 32)]
    grids = [(h // 16, w // 16) for h, w in sizes]

    def image(h, w):
        return sum(([IMG] * w + [BREAK] for _ in range(h - 1)), []) + [IMG] * w + [END]

    ids = left_pad([[1] + image(*grids[0]) + [2, 3], [4] + image(*grids[1]) + [5] + image(*grids[2]) + [6]])
    torch.manual_seed(1)
    px = torch.zeros(3, 3, 64, 64)
    vae = []
    for b, (h, w) in enumerate(sizes):
        px[b, :, :h, :w] = torch.randn(3, h, w)
        vae.append(px[b, :, :h, :w])
    inputs = dict(input_ids=ids, attention_mask=(ids != PAD).long(), pixel_values=px,
                  image_sizes=torch.tensor(sizes))
    return Case(model, inputs, vae, grids, vision_kwargs=dict(image_sizes=inputs["image_sizes"]), pool=2)


QWEN_VISION = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=4, spatial_merge_size=2,
                   temporal_patch_size=2, out_hidden_size=32, intermediate_size=64, fullatt_block_indexes=[0],
                   window_size=16)


QWEN_TOKENS = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=BOI, vision_end_token_id=EOI)


def _qwen_case(config_cls, model_cls, vision=QWEN_VISION, text=(), tokens=QWEN_TOKENS, mrope_section=(2, 3, 3)):
    # 4 px patches, 2 x 2 merge: a 32 x 32 image -> 8 x 8 patches -> 4 x 4 tokens, 32 x 48 -> 4 x 6
    # (text entries override TEXT; tokens: the config's special-token arguments, GLM names them differently)
    torch.manual_seed(0)
    rope = dict(rope_type="default", rope_theta=10000.0, mrope_section=list(mrope_section))
    config = config_cls(
        text_config=dict(rope_parameters=rope, bos_token_id=1, eos_token_id=2, **{**TEXT, **dict(text)}),
        vision_config=vision, **tokens,
    )
    model = model_cls(config).eval()
    thw = [(1, 8, 8), (1, 8, 12), (1, 8, 8)]
    grids = [(h // 2, w // 2) for _, h, w in thw]

    def image(h, w):
        return [BOI] + [IMG] * (h * w) + [EOI]

    ids = left_pad([[1, 3] + image(*grids[0]) + [4, 5], [6] + image(*grids[1]) + [7] + image(*grids[2]) + [8]])
    torch.manual_seed(1)
    patches = torch.randn(sum(t * h * w for t, h, w in thw), 3 * 2 * 4 * 4)
    vae = [torch.randn(3, 4 * h, 4 * w) for _, h, w in thw]
    image_grid_thw = torch.tensor(thw)
    inputs = dict(input_ids=ids, attention_mask=(ids != PAD).long(), pixel_values=patches,
                  image_grid_thw=image_grid_thw, mm_token_type_ids=(ids == IMG).long())
    return Case(model, inputs, vae, grids, vision_kwargs=dict(image_grid_thw=image_grid_thw),
                per_token=("mm_token_type_ids",), mrope=True, pool=4)


def qwen2_vl_case():
    return _qwen_case(transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration)


def qwen2_5_vl_case():
    return _qwen_case(transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration)


def qwen3_vl_case():
    # deepstack: the vision tower's layer-0 features are added at the image positions in the LM
    vision = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=32, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16, deepstack_visual_indexes=[0])
    return _qwen_case(transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration, vision,
                      text=dict(head_dim=16))


def _anyres_case(cls_name, config_name, batch_num_images=None, **extra):
    # CLIP on 32 px tiles, 8 px patches: a 4 x 4 base tile per image, plus for a multi-tile
    # image its unpadded grid (30 x 60 px -> 4 x 8, 20 x 32 -> 2 x 4, 64 x 64 -> 8 x 8) with an
    # image_newline token after each row
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(
        text_config=dict(model_type="llama", **TEXT),
        vision_config=dict(model_type="clip_vision_model", image_size=32, patch_size=8, projection_dim=32, **VISION),
        image_token_index=IMG, image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]],
        vision_feature_layer=-1, vision_feature_select_strategy="default", **extra,
    )
    model = getattr(transformers, cls_name)(config).eval()
    sizes = torch.tensor([[30, 60], [20, 32], [64, 64]])
    torch.manual_seed(1)
    px = torch.randn(3, 5, 3, 32, 32)
    vision_kwargs = dict(image_sizes=sizes)
    if batch_num_images is not None:
        vision_kwargs["batch_num_images"] = torch.tensor(batch_num_images)
    with torch.no_grad():
        lengths = [len(f) for f in model.get_image_features(pixel_values=px, return_dict=True,
                                                            **vision_kwargs).pooler_output]
    ids = left_pad([[1, 2] + [IMG] * lengths[0] + [3], [4] + [IMG] * lengths[1] + [5] + [IMG] * lengths[2] + [6]])
    vae = [torch.randn(3, int(h), int(w)) for h, w in sizes]
    inputs = dict(input_ids=ids, attention_mask=(ids != PAD).long(), pixel_values=px, **vision_kwargs)
    return Case(model, inputs, vae, None, vision_kwargs=vision_kwargs, pool=2, anyres=True)


def llava_next_case():
    return _anyres_case("LlavaNextForConditionalGeneration", "LlavaNextConfig")


def llava_onevision_case():
    # the second prompt has two images: OneVision gives those the base tile only (+ one newline)
    return _anyres_case("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionConfig", batch_num_images=[1, 2])


def _per_prompt_case(cls_name, config_name):
    # 64 px images, 8 px patches -> 8 x 8, pixel shuffle 2 -> 4 x 4 = 16 tokens per image;
    # features come per prompt; prompt 0 has one image (its second slot is an all-zero padding
    # image), prompt 1 two, the second padded on the right (pixel_attention_mask)
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(
        text_config=dict(model_type="llama", **TEXT),
        vision_config=dict(image_size=64, patch_size=8, **VISION), image_token_id=IMG, scale_factor=2,
    )
    model = getattr(transformers, cls_name)(config).eval()
    torch.manual_seed(1)
    px = torch.zeros(2, 2, 3, 64, 64)
    px[0, 0] = torch.randn(3, 64, 64)
    px[1, 0] = torch.randn(3, 64, 64)
    px[1, 1, :, :, :40] = torch.randn(3, 64, 40)
    pixel_mask = torch.zeros(2, 2, 64, 64, dtype=torch.long)
    pixel_mask[0, 0] = pixel_mask[1, 0] = 1
    pixel_mask[1, 1, :, :40] = 1
    image = [BOI] + [IMG] * 16 + [EOI]
    ids = left_pad([[1, 2] + image + [3], [4] + image + [5] + image + [6]])
    vae = [px[0, 0], px[1, 0], px[1, 1, :, :, :40]]
    inputs = dict(input_ids=ids, attention_mask=(ids != PAD).long(), pixel_values=px, pixel_attention_mask=pixel_mask)
    return Case(model, inputs, vae, [(4, 4)] * 3, vision_kwargs=dict(pixel_attention_mask=pixel_mask), pool=4)


def idefics3_case():
    return _per_prompt_case("Idefics3ForConditionalGeneration", "Idefics3Config")


def smolvlm_case():
    return _per_prompt_case("SmolVLMForConditionalGeneration", "SmolVLMConfig")


CASES = {
    "gemma3": gemma3_case,
    "paligemma": paligemma_case,
    "mistral3": mistral3_case,
    "qwen2_vl": qwen2_vl_case,
    "qwen2_5_vl": qwen2_5_vl_case,
    "qwen3_vl": qwen3_vl_case,
    "llava_next": llava_next_case,
    "llava_onevision": llava_onevision_case,
    "idefics3": idefics3_case,
    "smolvlm": smolvlm_case,
}


# -- the reduction by hand ----------------------------------------------------------------
def kept_columns(ids, keep_idx):
    """Per row, the original columns that survive: every non-image token, and the image
    tokens whose running index (row-major, as masked_scatter fills them) was kept."""
    keep, occurrence, rows = set(keep_idx.tolist()), 0, []
    for row in ids.tolist():
        cols = []
        for c, token in enumerate(row):
            if token == IMG:
                if occurrence in keep:
                    cols.append(c)
                occurrence += 1
            else:
                cols.append(c)
        rows.append(cols)
    return rows


def take(values, columns, fill=0):
    """values [..., B, L] at each row's kept columns, left-padded with `fill`."""
    width = max(len(c) for c in columns)
    out = values.new_full((*values.shape[:-2], len(columns), width), fill)
    for b, cols in enumerate(columns):
        if cols:
            out[..., b, width - len(cols):] = values[..., b, cols]
    return out


def hand_reduced(case, keep_ratio, generate=False):
    """The plain model's keyword arguments for the prompt reduced by hand."""
    model, inputs = case.model, case.inputs
    with torch.no_grad():
        encoded = model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True,
                                           **case.vision_kwargs)
        feats = encoded.pooler_output
        as_tensor = isinstance(feats, torch.Tensor)
        packed = feats.reshape(-1, feats.shape[-1]) if as_tensor else torch.cat(list(feats))
        d = packed.shape[-1]
        anchors, anchor_grids = anchors_from_vae(case.model_vae, case.vae_images, projection="interpolate",
                                                 pool=case.pool, dim=d)
        if case.anyres:
            return hand_reduced_anyres(case, feats, anchors, anchor_grids, keep_ratio)
        out = g2tr.reduce(packed, anchors, case.grids, anchor_grids, keep_ratio, min_keep=1)
    kept = g2tr.budgets([h * w for h, w in case.grids], keep_ratio, 1)
    merged = out.merged.reshape(len(kept), kept[0], d) if as_tensor else list(torch.split(out.merged, kept))
    encoded.pooler_output = merged
    if getattr(encoded, "deepstack_features", None) is not None:  # Qwen3-VL
        encoded.deepstack_features = [merge_like(torch.cat(layer), out) for layer in encoded.deepstack_features]
    columns = kept_columns(inputs["input_ids"], out.keep_idx)
    reduced = dict(
        input_ids=take(inputs["input_ids"], columns, PAD),
        attention_mask=take(inputs["attention_mask"], columns, 0),
        mm_encoder_outputs={"image": encoded},
    )
    for name in case.per_token:
        reduced[name] = take(inputs[name], columns, 0)
    if case.mrope:
        with torch.no_grad():
            positions, deltas = model.model.get_rope_index(
                inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"],
            )
        positions = take(positions, columns, 0)
        if generate:
            mask = reduced["attention_mask"]
            text = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
            positions = torch.cat([text[None], positions])
        reduced["position_ids"] = positions
        dropped = torch.tensor([inputs["input_ids"].shape[1] - len(c) for c in columns])[:, None]
        reduced["_rope_deltas"] = deltas + dropped
    return reduced, out, kept


def anyres_parts(case, feats):
    """Per image: the 4 x 4 base tile, then (if any) the rows between image_newline tokens."""
    newline = case.model.model.image_newline
    parts, fixed, offset = [], [], 0  # parts: (image, global rows, grid)
    for i, f in enumerate(feats):
        marks = [c for c in (f == newline).all(-1).nonzero().reshape(-1).tolist()]
        parts.append((i, list(range(offset, offset + 16)), (4, 4)))
        start = 16
        rows = []
        for m in marks:
            if m > start:
                rows.append(list(range(offset + start, offset + m)))
            start = m + 1
        if rows:
            parts.append((i, sum(rows, []), (len(rows), len(rows[0]))))
        fixed += [offset + m for m in marks]
        offset += len(f)
    return parts, fixed


def hand_reduced_anyres(case, feats, anchors, anchor_grids, keep_ratio):
    inputs = case.inputs
    packed = torch.cat(list(feats))
    parts, fixed = anyres_parts(case, feats)
    per_image = list(torch.split(anchors, [h * w for h, w in anchor_grids]))
    rows = torch.tensor(sum((p[1] for p in parts), []))
    out = g2tr.reduce(packed[rows], torch.cat([per_image[p[0]] for p in parts]), [p[2] for p in parts],
                      [anchor_grids[p[0]] for p in parts], keep_ratio, min_keep=1)
    kept_rows = rows[out.keep_idx]
    keep = sorted(kept_rows.tolist() + fixed)
    full = packed.clone()
    full[kept_rows] = out.merged
    counts = [0] * len(feats)
    offsets = [0]
    for f in feats:
        offsets.append(offsets[-1] + len(f))
    for r in keep:
        counts[max(i for i in range(len(feats)) if offsets[i] <= r)] += 1
    merged = list(torch.split(full[torch.tensor(keep)], counts))
    columns = kept_columns(inputs["input_ids"], torch.tensor(keep))
    reduced = dict(
        input_ids=take(inputs["input_ids"], columns, PAD),
        attention_mask=take(inputs["attention_mask"], columns, 0),
        mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=merged)},
    )
    kept = g2tr.budgets([h * w for _, _, (h, w) in parts], keep_ratio, 1)
    return reduced, out, kept


def merge_like(values, out):
    """Per-token features merged by the reduce output's assignment, token by token (weight 1)."""
    rows = [[] for _ in range(out.keep_idx.numel())]
    for j, k in enumerate(out.assign.tolist()):
        rows[k].append(values[j].double())
    merged = torch.stack([torch.stack(r).mean(0) for r in rows]).to(values.dtype)
    return list(torch.split(merged, torch.diff(out.cu_seqlens).tolist()))


def build(name):
    case = CASES[name]()
    case.model_vae = tiny_vae()
    return case


def lm_lengths(model):
    seen = []
    inner = model.model
    lm = inner.language_model if hasattr(inner, "language_model") else inner.text_model  # Idefics3: text_model
    hook = lm.register_forward_hook(
        lambda module, args, kwargs, out: seen.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    return seen, hook


# -- supported families -------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CASES))
def test_keep_all_is_the_plain_model(name):
    case = build(name)
    model, inputs = case.model, case.inputs
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_deltas = getattr(model.model, "rope_deltas", None)
        ref_gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        handle = apply_g2tr(model, case.model_vae, keep_ratio=1.0, min_keep=1, pool=case.pool)
        out = model(**inputs, vae_pixel_values=case.vae_images).logits
        deltas = getattr(model.model, "rope_deltas", None)
        gen = model.generate(**inputs, vae_pixel_values=case.vae_images, max_new_tokens=3, do_sample=False)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(gen, ref_gen)
    if not case.anyres:
        assert handle.last.grids == case.grids
    else:
        assert handle.last.grids == [p[2] for p in anyres_parts(case, model.get_image_features(
            pixel_values=inputs["pixel_values"], return_dict=True, **case.vision_kwargs).pooler_output)[0]]
    if case.mrope:
        assert torch.equal(deltas, ref_deltas)


@pytest.mark.parametrize("name", sorted(CASES))
def test_half_matches_the_prompt_reduced_by_hand(name):
    case = build(name)
    model, inputs = case.model, case.inputs
    reduced, expected, kept = hand_reduced(case, 0.5)
    deltas = reduced.pop("_rope_deltas", None)
    with torch.no_grad():
        ref = model(**reduced).logits
        handle = apply_g2tr(model, case.model_vae, keep_ratio=0.5, min_keep=1, pool=case.pool)
        seen, hook = lm_lengths(model)
        out = model(**inputs, vae_pixel_values=case.vae_images).logits
        hook.remove()
    assert handle.last.kept == kept
    assert torch.equal(handle.last.output.keep_idx, expected.keep_idx)
    assert seen == [reduced["input_ids"].shape[1]]  # the language model sees K tokens per image
    newlines = 0
    if case.anyres:
        feats = model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True, **case.vision_kwargs)
        newlines = len(anyres_parts(case, feats.pooler_output)[1])
    assert int((handle.last.layout.input_ids == IMG).sum()) == sum(kept) + newlines  # newlines all kept
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if case.mrope:
        assert torch.equal(model.model.rope_deltas, deltas)


GENERATE_MODES = {
    "greedy": dict(do_sample=False),
    "beams": dict(do_sample=False, num_beams=2, num_return_sequences=2),
    "sampling": dict(do_sample=True, top_k=8),
}


@pytest.mark.parametrize("mode", sorted(GENERATE_MODES))
@pytest.mark.parametrize("name", sorted(CASES))
def test_half_generate_matches_the_prompt_reduced_by_hand(name, mode):
    case = build(name)
    model, inputs = case.model, case.inputs
    reduced, _, _ = hand_reduced(case, 0.5, generate=True)
    reduced.pop("_rope_deltas", None)
    options = dict(max_new_tokens=4, **GENERATE_MODES[mode])
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        torch.manual_seed(5)
        ref = model.generate(**reduced, **options)
        apply_g2tr(model, case.model_vae, keep_ratio=0.5, min_keep=1, pool=case.pool)
        seen, hook = lm_lengths(model)
        torch.manual_seed(5)
        gen = model.generate(**inputs, vae_pixel_values=case.vae_images, **options)
        hook.remove()
    repeat = options.get("num_return_sequences", 1)
    assert seen[0] == reduced["input_ids"].shape[1] and set(seen[1:]) == {1}
    assert torch.equal(gen[:, :length], inputs["input_ids"].repeat_interleave(repeat, 0))  # the prompt comes back
    assert torch.equal(gen[:, length:], ref[:, reduced["input_ids"].shape[1]:])


def test_paligemma_training_loss_uses_the_rebuilt_token_types():
    case = build("paligemma")
    model, inputs = case.model, dict(case.inputs)
    labels = torch.where(inputs["token_type_ids"] == 1, inputs["input_ids"], -100)
    reduced, _, _ = hand_reduced(case, 0.5)
    columns = kept_columns(inputs["input_ids"], hand_reduced(case, 0.5)[1].keep_idx)
    with torch.no_grad():
        ref = model(**reduced, labels=take(labels, columns, -100))
        handle = apply_g2tr(model, case.model_vae, keep_ratio=0.5, min_keep=1, pool=case.pool)
        out = model(**inputs, labels=labels, vae_pixel_values=case.vae_images)
    assert torch.equal(handle.last.layout.labels, take(labels, columns, -100))
    torch.testing.assert_close(out.loss, ref.loss)
    # without rebuilding token_type_ids the prefix-LM mask would be off: the loss would differ
    with torch.no_grad():
        stale = dict(reduced, token_type_ids=torch.zeros_like(reduced["token_type_ids"]))
        assert not torch.allclose(model.__class__.forward(model, **stale, labels=take(labels, columns, -100)).loss,
                                  ref.loss)


# -- the patch as an object ---------------------------------------------------------------
def test_deepcopy_and_pickle_carry_the_patch_with_their_own_weights():
    case = build("gemma3")
    model, inputs = case.model, case.inputs
    apply_g2tr(model, case.model_vae, keep_ratio=0.5, min_keep=1, pool=case.pool)
    with torch.no_grad():
        before = model(**inputs, vae_pixel_values=case.vae_images).logits
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert clone._g2tr_handle.model is clone and clone._g2tr_handle is not model._g2tr_handle
            torch.testing.assert_close(clone(**inputs, vae_pixel_values=case.vae_images).logits, before)
            clone.lm_head.weight.mul_(2.0)  # the clone's own weights are the ones used
            changed = clone(**inputs, vae_pixel_values=case.vae_images).logits
            assert not torch.allclose(changed, before)
            assert clone._g2tr_handle.last.kept == [8, 8, 8]
        torch.testing.assert_close(model(**inputs, vae_pixel_values=case.vae_images).logits, before)


def test_disabled_runs_the_plain_model_and_keeps_the_patch():
    case = build("gemma3")
    model, inputs = case.model, case.inputs
    with torch.no_grad():
        plain = model(**inputs).logits
        handle = apply_g2tr(model, case.model_vae, keep_ratio=0.5, min_keep=1, pool=case.pool)
        reduced = model(**inputs, vae_pixel_values=case.vae_images).logits
        with handle.disabled():
            off = model(**inputs).logits
            off_gen = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        again = model(**inputs, vae_pixel_values=case.vae_images).logits
    assert torch.equal(off, plain) and off_gen.shape[1] == inputs["input_ids"].shape[1] + 2
    assert torch.equal(again, reduced) and reduced.shape[1] < plain.shape[1]
    assert handle.enabled


def test_compiled_model_is_refused_with_the_order_to_follow():
    case = build("gemma3")
    compiled = torch.compile(case.model)
    with pytest.raises(TypeError, match="apply before torch.compile"):
        apply_g2tr(compiled, case.model_vae)
    case.model.compile()
    with pytest.raises(TypeError, match="apply before torch.compile"):
        apply_g2tr(case.model, case.model_vae)


def test_a_per_token_input_the_row_does_not_rebuild_is_an_error():
    case = build("mistral3")
    apply_g2tr(case.model, case.model_vae, keep_ratio=0.5, min_keep=1, pool=case.pool)
    stray = torch.zeros_like(case.inputs["input_ids"])
    with torch.no_grad(), pytest.raises(ValueError, match="stray_ids has one entry per prompt token"):
        case.model(**case.inputs, vae_pixel_values=case.vae_images, stray_ids=stray)


# -- refused families ---------------------------------------------------------------------
def _llava_pixtral():
    # a LLaVA row, but a Pixtral tower (non-square images) the row does not describe
    return transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        text_config=dict(model_type="mistral", head_dim=16, **TEXT), image_token_index=IMG,
        vision_config=dict(model_type="pixtral", image_size=64, patch_size=8, head_dim=16, **VISION),
        vision_feature_select_strategy="full",
    ))


REFUSED = {
    "llava": (_llava_pixtral, "vision tower 'pixtral'"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_families_without_a_row_are_refused_at_apply_time(name):
    build_model, why = REFUSED[name]
    torch.manual_seed(0)
    model = build_model()
    assert model.config.model_type == name
    with pytest.raises(NotImplementedError, match=rf"{name} is not supported.*{why}.*g2tr_kernels.reduce"):
        apply_g2tr(model, tiny_vae())
    assert "forward" not in model.__dict__  # nothing was patched


def test_a_capability_the_row_does_not_handle_is_refused():
    # a LLaVA whose forward takes a per-token input the table does not know
    torch.manual_seed(0)
    config = transformers.LlavaConfig(
        text_config=dict(model_type="llama", **TEXT),
        vision_config=dict(model_type="clip_vision_model", image_size=32, patch_size=8, projection_dim=32, **VISION),
        image_token_index=IMG,
    )

    class LlavaWithSegments(transformers.LlavaForConditionalGeneration):
        def forward(self, input_ids=None, pixel_values=None, segment_ids=None, mm_encoder_outputs=None, **kwargs):
            return super().forward(input_ids=input_ids, pixel_values=pixel_values,
                                   mm_encoder_outputs=mm_encoder_outputs, **kwargs)

    with pytest.raises(NotImplementedError, match="llava is not supported.*segment_ids"):
        apply_g2tr(LlavaWithSegments(config), tiny_vae())
    config.vision_feature_select_strategy = "full"
    with pytest.raises(NotImplementedError, match="CLS"):
        apply_g2tr(transformers.LlavaForConditionalGeneration(config), tiny_vae())
    from test_hf import tiny_internvl

    internvl = tiny_internvl()
    internvl.config.vision_feature_select_strategy = "full"
    with pytest.raises(NotImplementedError, match="CLS token of internvl_vision"):
        apply_g2tr(internvl, tiny_vae())


def test_support_table_is_in_the_readme():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert render_markdown() in readme
    for name in CASES:
        assert FAMILIES[name].refused is None


# -- torch.compile ------------------------------------------------------------------------
def test_compiled_prefill_has_no_graph_break_of_the_projects_making():
    # One prompt: every size comes from host-side grids, so the wrapper and g2tr_kernels read
    # nothing back from the device (a batch: tests/test_hf_sync.py).
    from pathlib import Path

    import g2tr_kernels

    case = build("gemma3")
    model, inputs = case.model, case.inputs
    real = inputs["input_ids"][0] != PAD
    one = {k: inputs[k][:1, real] for k in ("input_ids", "attention_mask", "token_type_ids")}
    one["pixel_values"] = inputs["pixel_values"][:1]
    apply_g2tr(model, case.model_vae, keep_ratio=0.5, min_keep=1, pool=case.pool)
    with torch.no_grad():
        eager = model(**one, vae_pixel_values=case.vae_images[:1]).logits
        torch._dynamo.reset()
        explained = torch._dynamo.explain(lambda **kw: model(**kw, vae_pixel_values=case.vae_images[:1]).logits)(**one)
    ours = str(Path(g2tr_kernels.__file__).parent)
    breaks = [b.reason for b in explained.break_reasons if b.user_stack and b.user_stack[-1].filename.startswith(ours)]
    assert breaks == []
    assert explained.graph_count >= 1 and eager.shape[1] == 2 + 8 + 2 + 3


# -- anchor sources -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["qwen2_vl", "llava_next"])
def test_precomputed_latents_and_anchors_reduce_as_the_images_do(name):
    from g2tr_kernels.anchors import encode_latents, prepare_anchors

    case = build(name)
    model, inputs, vae = case.model, case.inputs, case.model_vae
    handle = apply_g2tr(model, vae, keep_ratio=0.5, min_keep=1)  # pool="auto"
    with torch.no_grad():
        by_images = model(**inputs, vae_pixel_values=case.vae_images).logits
        last = handle.last
        latents = encode_latents(vae, case.vae_images)
        by_latents = model(**inputs, vae_latents=latents).logits
        assert torch.equal(handle.last.output.keep_idx, last.output.keep_idx)
        torch.testing.assert_close(by_latents, by_images, atol=0, rtol=0)
        if name == "qwen2_vl":  # one grid per image: anchors for those grids
            anchors = prepare_anchors(last.grids, vae_latents=latents, dim=32)
            by_anchors = model(**inputs, anchors=anchors).logits
            torch.testing.assert_close(by_anchors, by_images, atol=0, rtol=0)
        with pytest.raises(ValueError, match="one of vae_pixel_values, vae_latents or anchors"):
            model(**inputs, vae_pixel_values=case.vae_images, vae_latents=latents)
    # "auto": each part's anchor grid is as fine as its ViT grid and no finer
    assert all(ha <= h and wa <= w for (ha, wa), (h, w) in zip(last.anchor_grids, last.grids))
    assert any(ha == h or wa == w for (ha, wa), (h, w) in zip(last.anchor_grids, last.grids))


def test_qwen2_vl_video_next_to_images_passes_unreduced():
    case = build("qwen2_vl")
    model, inputs = case.model, dict(case.inputs)
    # a video after the second prompt's images: 2 temporal patches x 4 x 4 = 32 video tokens
    ids = inputs["input_ids"]
    video = torch.tensor([[BOI] + [VID] * 32 + [EOI]] * 2)
    video[0] = PAD  # only row 1 has the video
    ids = torch.cat([ids, video], dim=1)
    ids = left_pad([[t for t in row if t != PAD] for row in ids.tolist()])
    torch.manual_seed(7)
    inputs.update(input_ids=ids, attention_mask=(ids != PAD).long(),
                  mm_token_type_ids=(ids == IMG).long() + 2 * (ids == VID).long(),
                  pixel_values_videos=torch.randn(2 * 8 * 8, 3 * 2 * 4 * 4), video_grid_thw=torch.tensor([[2, 8, 8]]))
    with torch.no_grad():
        ref = model(**inputs).logits
        handle = apply_g2tr(model, case.model_vae, keep_ratio=1.0, min_keep=1, pool=case.pool)
        same = model(**inputs, vae_pixel_values=case.vae_images).logits
        handle.remove()
        apply_g2tr(model, case.model_vae, keep_ratio=0.5, min_keep=1, pool=case.pool)
        model(**inputs, vae_pixel_values=case.vae_images)
    torch.testing.assert_close(same, ref, atol=1e-5, rtol=1e-5)
    assert int((model._g2tr_handle.last.layout.input_ids == VID).sum()) == 32  # every video token kept


def llava_onevision_video_case():
    # the OneVision case with a video after prompt 0's image: 2 frames of 4 x 4 patches, pooled
    # 2 x 2 -> 4 tokens a frame, + one image_newline = 9 video tokens
    case = _anyres_case("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionConfig", batch_num_images=[1, 2],
                        video_token_index=VID)
    case.model_vae = tiny_vae()
    torch.manual_seed(5)
    videos = torch.randn(1, 2, 3, 32, 32)
    with torch.no_grad():
        n_video = case.model.get_video_features(videos, return_dict=True).pooler_output.shape[1]
    rows = [[t for t in row if t != PAD] for row in case.inputs["input_ids"].tolist()]
    rows[0] = rows[0][:-1] + [VID] * n_video + rows[0][-1:]
    ids = left_pad(rows)
    case.inputs.update(input_ids=ids, attention_mask=(ids != PAD).long(), pixel_values_videos=videos)
    return case, n_video


def test_llava_onevision_images_and_videos_in_one_call():
    # images reduced on their own grids, the video's features passed through unreduced in place
    case, n_video = llava_onevision_video_case()
    model, inputs = case.model, case.inputs
    images_only = {k: v for k, v in inputs.items() if k != "pixel_values_videos"}
    by_hand = copy.copy(case)
    by_hand.inputs = images_only
    reduced, _, kept = hand_reduced(by_hand, 0.5)
    with torch.no_grad():
        video = model.get_video_features(inputs["pixel_values_videos"], return_dict=True)
        reduced["mm_encoder_outputs"]["video"] = video
        ref_all, ref_half = model(**inputs).logits, model(**reduced).logits
        ref_gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        handle = apply_g2tr(model, case.model_vae, keep_ratio=1.0, min_keep=1, pool=case.pool)
        same = model(**inputs, vae_pixel_values=case.vae_images).logits
        gen = model.generate(**inputs, vae_pixel_values=case.vae_images, max_new_tokens=3, do_sample=False)
        handle.remove()
        handle = apply_g2tr(model, case.model_vae, keep_ratio=0.5, min_keep=1, pool=case.pool)
        half = model(**inputs, vae_pixel_values=case.vae_images).logits
    torch.testing.assert_close(same, ref_all, atol=1e-5, rtol=1e-5)
    assert torch.equal(gen, ref_gen)
    assert handle.last.kept == kept
    assert torch.equal(handle.last.layout.input_ids, reduced["input_ids"])
    assert int((handle.last.layout.input_ids == VID).sum()) == n_video  # every video token kept, in place
    torch.testing.assert_close(half, ref_half, atol=1e-5, rtol=1e-5)


def test_token_types_a_processor_adds_are_rebuilt_even_where_the_row_does_not_name_them():
    # processors can return mm_token_type_ids (return_mm_token_type_ids=True) to a forward that
    # only passes them on in **kwargs
    case = build("idefics3")
    model, inputs = case.model, dict(case.inputs)
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == IMG).long()
    with torch.no_grad():
        ref = model(**inputs).logits
        handle = apply_g2tr(model, case.model_vae, keep_ratio=1.0, min_keep=1, pool=case.pool)
        same = model(**inputs, vae_pixel_values=case.vae_images).logits
        handle.remove()
        handle = apply_g2tr(model, case.model_vae, keep_ratio=0.5, min_keep=1, pool=case.pool)
        model(**inputs, vae_pixel_values=case.vae_images)
    torch.testing.assert_close(same, ref, atol=1e-5, rtol=1e-5)
    assert handle.last.layout.input_ids.shape[1] < inputs["input_ids"].shape[1]


def test_qwen3_vl_moe_forward_keep_all_and_half():
    # the MoE text model under the Qwen3-VL row: forward only (generate goes the same path)
    vision = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=32, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16, deepstack_visual_indexes=[0])
    case = _qwen_case(transformers.Qwen3VLMoeConfig, transformers.Qwen3VLMoeForConditionalGeneration, vision,
                      text=dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16))
    case.model_vae = tiny_vae()
    model, inputs = case.model, case.inputs
    reduced, _, _ = hand_reduced(case, 0.5)
    reduced.pop("_rope_deltas")
    with torch.no_grad():
        ref_all, ref_half = model(**inputs).logits, model(**reduced).logits
        handle = apply_g2tr(model, case.model_vae, keep_ratio=1.0, min_keep=1, pool=case.pool)
        same = model(**inputs, vae_pixel_values=case.vae_images).logits
        handle.remove()
        apply_g2tr(model, case.model_vae, keep_ratio=0.5, min_keep=1, pool=case.pool)
        half = model(**inputs, vae_pixel_values=case.vae_images).logits
    torch.testing.assert_close(same, ref_all, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(half, ref_half, atol=1e-5, rtol=1e-5)
