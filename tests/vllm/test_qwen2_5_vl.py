"""Qwen2.5-VL served by vLLM with the G2TR plugin: M-RoPE positions of the kept tokens.

The reference runs transformers on the reduced prompt with explicit position ids: each kept
token at its unreduced (t, h, w) position, every text token at its unreduced position
(the runs and references fixtures of conftest.py).
"""
import g2tr_kernels

import tiny_models as tm

MODEL, KEEP, MIN_KEEP, STEPS, POOL = "qwen", 0.5, 8, 8, 2
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
# Two images after more text than the first one's K: each lands in its own placeholder run.
LONG = " ".join(f"w{i}" for i in range(30))
PROMPTS_TEXT = [f"USER: {IMAGE} w3 w17 w42 ASSISTANT:", f"USER: w5 w6 {IMAGE} w9 ASSISTANT: w1",
                f"USER: {LONG} {IMAGE} w8 {IMAGE} w2 ASSISTANT:"]
# Non-square grids both ways (h > w and w > h): text after the image starts max(h, w) past it.
IMAGES = [[(200, 150, 0)], [(120, 210, 1)], [(150, 200, 2), (210, 120, 3)]]


def prompts():
    return [{"prompt": p, "multi_modal_data": {"image": [tm.make_image(w, h, s) for w, h, s in spec]}}
            for p, spec in zip(PROMPTS_TEXT, IMAGES)]


def reference(models, p, ratio):
    return tm.qwen_reference(models["qwen"], models["vae"], p["prompt"], p["multi_modal_data"]["image"], ratio,
                             MIN_KEEP, STEPS, pool=POOL)


def test_greedy_tokens_equal_transformers_on_the_reduced_prompt(runs, references):
    # Every step's log-probability is sensitive to each prompt position's M-RoPE ids.
    tm.check_greedy_equals_reference(runs, references, KEEP)


def test_prompt_holds_k_placeholders(runs, references):
    grids = set()
    for (prompt_ids, _, _), ref in zip(runs["g2tr"], references[KEEP]):
        grids.add(ref["grid"][0] > ref["grid"][1])
        k = sum(g2tr_kernels.budgets([h * w for h, w in ref["grids"]], KEEP, MIN_KEEP))
        assert k == ref["k"] < ref["n"]
        assert len(prompt_ids) == k + ref["text_len"] == ref["prompt_len"]
    assert grids == {True, False}  # both orientations were exercised


def test_keep_one_equals_stock_vllm(runs):
    # Prompt ids, tokens and log-probabilities, bit for bit.
    assert runs["keep1"] == runs["stock"]


def test_stock_is_the_unreduced_model(runs, references):
    tm.check_stock_is_the_unreduced_model(runs, references)
