"""LLaVA served by vLLM with the G2TR plugin: exact against transformers + g2tr_kernels.

One engine per configuration (G2TR at 0.5, G2TR at 1.0, no "g2tr" key), all prompts in it.
"""
import pytest

import g2tr_kernels

import tiny_models as tm

KEEP, MIN_KEEP, STEPS, POOL = 0.5, 8, 8, "auto"
LOGPROB_TOL = 1e-4  # fp32, vLLM's CPU kernels against transformers
PROMPTS_TEXT = ["USER: <image> w3 w17 w42 ASSISTANT:", "USER: w5 <image> w9 ASSISTANT: w1 w2"]
IMAGES = [(64, 64, 0), (90, 70, 1)]  # resized / cropped to the tower's 64 x 64 by the processor


def _prompts():
    return [{"prompt": p, "multi_modal_data": {"image": tm.make_image(w, h, s)}}
            for p, (w, h, s) in zip(PROMPTS_TEXT, IMAGES)]


@pytest.fixture(scope="module")
def runs(models):
    g2tr = {"keep_ratio": KEEP, "min_keep": MIN_KEEP, "pool": POOL, "vae": models["vae"]}
    return tm.engine_runs(models["llava"], _prompts, g2tr, STEPS)


@pytest.fixture(scope="module")
def references(models):
    out = {}
    for ratio in (KEEP, 1.0):
        out[ratio] = [
            tm.llava_reference(models["llava"], models["vae"], p["prompt"], p["multi_modal_data"]["image"], ratio,
                               MIN_KEEP, STEPS, pool=POOL)
            for p in _prompts()
        ]
    return out


def test_greedy_tokens_equal_transformers_on_the_reduced_prompt(runs, references):
    for b, ((_, tokens, logprobs), ref) in enumerate(zip(runs["g2tr"], references[KEEP])):
        assert tokens == ref["tokens"], f"prompt {b}"
        assert logprobs == pytest.approx(ref["logprobs"], abs=LOGPROB_TOL), f"prompt {b}"


def test_prompt_holds_k_placeholders(runs, references, models):
    from transformers import AutoConfig

    image_id = AutoConfig.from_pretrained(models["llava"]).image_token_index
    for (prompt_ids, _, _), ref in zip(runs["g2tr"], references[KEEP]):
        k = g2tr_kernels.budgets([ref["n"]], KEEP, MIN_KEEP)[0]
        assert k < ref["n"]
        assert len(prompt_ids) == k + ref["text_len"] == ref["prompt_len"]
        assert prompt_ids.count(image_id) == k


def test_keep_one_equals_stock_vllm(runs):
    # Prompt ids, tokens and log-probabilities, bit for bit.
    assert runs["keep1"] == runs["stock"]


def test_stock_is_the_unreduced_model(runs, references):
    # No "g2tr" key: N placeholders per image and the tokens of the unreduced model.
    for (prompt_ids, tokens, logprobs), ref in zip(runs["stock"], references[1.0]):
        assert len(prompt_ids) == ref["n"] + ref["text_len"]
        assert tokens == ref["tokens"]
        assert logprobs == pytest.approx(ref["logprobs"], abs=LOGPROB_TOL)


def test_the_reduction_changes_the_answer_somewhere(runs):
    # Guards the comparison above against a plugin that is never switched on.
    assert any(a != b for (_, a, _), (_, b, _) in zip(runs["g2tr"], runs["stock"]))
