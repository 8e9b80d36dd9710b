"""LLaVA served by vLLM with the G2TR plugin: exact against transformers + g2tr_kernels.

One engine per configuration (G2TR at 0.5, G2TR at 1.0, no "g2tr" key), all prompts in it
(the runs and references fixtures of conftest.py).
"""
import g2tr_kernels

import tiny_models as tm

MODEL, KEEP, MIN_KEEP, STEPS, POOL = "llava", 0.5, 8, 8, "auto"
PROMPTS_TEXT = ["USER: <image> w3 w17 w42 ASSISTANT:", "USER: w5 <image> w9 ASSISTANT: w1 w2"]
IMAGES = [(64, 64, 0), (90, 70, 1)]  # resized / cropped to the tower's 64 x 64 by the processor


def prompts():
    return [{"prompt": p, "multi_modal_data": {"image": tm.make_image(w, h, s)}}
            for p, (w, h, s) in zip(PROMPTS_TEXT, IMAGES)]


def reference(models, p, ratio):
    return tm.llava_reference(models["llava"], models["vae"], p["prompt"], p["multi_modal_data"]["image"], ratio,
                              MIN_KEEP, STEPS, pool=POOL)


def test_greedy_tokens_equal_transformers_on_the_reduced_prompt(runs, references):
    tm.check_greedy_equals_reference(runs, references, KEEP)


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
    tm.check_stock_is_the_unreduced_model(runs, references)


def test_the_reduction_changes_the_answer_somewhere(runs):
    # Guards the comparison above against a plugin that is never switched on.
    assert any(a != b for (_, a, _), (_, b, _) in zip(runs["g2tr"], runs["stock"]))
