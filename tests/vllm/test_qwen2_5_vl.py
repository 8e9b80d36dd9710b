"""Qwen2.5-VL served by vLLM with the G2TR plugin: M-RoPE positions of the kept tokens.

The reference runs transformers on the reduced prompt with explicit position ids: each kept
token at its unreduced (t, h, w) position, every text token at its unreduced position.
"""
import pytest

import g2tr_kernels

import tiny_models as tm

KEEP, MIN_KEEP, STEPS, POOL = 0.5, 8, 8, 2
LOGPROB_TOL = 1e-4  # fp32, vLLM's CPU kernels against transformers
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
# Two images after more text than the first one's K: each lands in its own placeholder run.
LONG = " ".join(f"w{i}" for i in range(30))
PROMPTS_TEXT = [f"USER: {IMAGE} w3 w17 w42 ASSISTANT:", f"USER: w5 w6 {IMAGE} w9 ASSISTANT: w1",
                f"USER: {LONG} {IMAGE} w8 {IMAGE} w2 ASSISTANT:"]
# Non-square grids both ways (h > w and w > h): text after the image starts max(h, w) past it.
IMAGES = [[(200, 150, 0)], [(120, 210, 1)], [(150, 200, 2), (210, 120, 3)]]


def _images(spec):
    return [tm.make_image(w, h, s) for w, h, s in spec]


def _prompts():
    return [{"prompt": p, "multi_modal_data": {"image": _images(spec)}} for p, spec in zip(PROMPTS_TEXT, IMAGES)]


@pytest.fixture(scope="module")
def runs(models):
    g2tr = {"keep_ratio": KEEP, "min_keep": MIN_KEEP, "pool": POOL, "vae": models["vae"]}
    return tm.engine_runs(models["qwen"], _prompts, g2tr, STEPS)


@pytest.fixture(scope="module")
def references(models):
    return {
        ratio: [
            tm.qwen_reference(models["qwen"], models["vae"], p["prompt"], p["multi_modal_data"]["image"], ratio,
                              MIN_KEEP, STEPS, pool=POOL)
            for p in _prompts()
        ]
        for ratio in (KEEP, 1.0)
    }


def test_greedy_tokens_equal_transformers_on_the_reduced_prompt(runs, references):
    for b, ((_, tokens, logprobs), ref) in enumerate(zip(runs["g2tr"], references[KEEP])):
        assert tokens == ref["tokens"], f"prompt {b} (grid {ref['grid']})"
        # Every step's log-probability: sensitive to each prompt position's M-RoPE ids.
        assert logprobs == pytest.approx(ref["logprobs"], abs=LOGPROB_TOL), f"prompt {b} (grid {ref['grid']})"


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
    for (prompt_ids, tokens, logprobs), ref in zip(runs["stock"], references[1.0]):
        assert len(prompt_ids) == ref["n"] + ref["text_len"]
        assert tokens == ref["tokens"]
        assert logprobs == pytest.approx(ref["logprobs"], abs=LOGPROB_TOL)
