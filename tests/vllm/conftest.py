"""vLLM tests: run in .venv-vllm (bash tools/vllm_env.sh), from tools/test.sh.

Where vLLM is not installed (the main .venv) nothing here is collected: the modules are
ignored, so they count neither as passed nor as skipped.
"""
import importlib.util
import os
import sys

import pytest

# tests/ on sys.path makes this folder a namespace package called vllm: only a real
# (regular) vllm package counts.
_spec = importlib.util.find_spec("vllm")
HAVE_VLLM = _spec is not None and _spec.origin is not None
collect_ignore_glob = [] if HAVE_VLLM else ["test_*.py"]

if HAVE_VLLM:
    # Offline, small, quiet and in one process (the engine core runs in the test process, so
    # the plugin, the model and the reference share it; vLLM still loads the plugin through
    # its entry point).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """The tiny checkpoints (built once per session, offline)."""
    import tiny_models

    root = tmp_path_factory.mktemp("vllm_models")
    return {
        "llava": tiny_models.build_llava(str(root / "llava")),
        "qwen": tiny_models.build_qwen2_5_vl(str(root / "qwen")),
        "vae": tiny_models.build_vae(str(root / "vae")),
    }



# The engine fixtures test_llava.py and test_qwen2_5_vl.py share. Each module names its
# checkpoint (MODEL), KEEP, MIN_KEEP, POOL, STEPS, its prompts (prompts()) and its
# transformers reference of one prompt (reference(models, prompt, keep_ratio)).


@pytest.fixture(scope="module")
def runs(models, request):
    """One engine per configuration (G2TR at KEEP, G2TR at 1.0, no "g2tr" key), all prompts in it."""
    import tiny_models

    mod = request.module
    g2tr = {"keep_ratio": mod.KEEP, "min_keep": mod.MIN_KEEP, "pool": mod.POOL, "vae": models["vae"]}
    return tiny_models.engine_runs(models[mod.MODEL], mod.prompts, g2tr, mod.STEPS)


@pytest.fixture(scope="module")
def references(models, request):
    """{keep_ratio: [transformers + g2tr_kernels on each prompt]} for KEEP and 1.0."""
    mod = request.module
    return {ratio: [mod.reference(models, p, ratio) for p in mod.prompts()] for ratio in (mod.KEEP, 1.0)}
