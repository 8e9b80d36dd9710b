"""tests/gpu_checks.py (reduce at D = 3584 and odd D against the reference for the cuda and
triton backends, graph capture, streams, compile, Triton registers) under pytest, on a GPU.

The checks run in a child process without TRITON_INTERPRET (conftest.py sets it for the
in-process Triton tests, and interpreted kernels at D = 3584 would take hours).
tools/gpu_check.sh runs the same file directly, so a machine without pytest still runs it.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import g2tr_kernels as g2tr

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: tools/gpu_check.sh runs these on a GPU")
def test_gpu_checks(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    package_root = str(Path(g2tr.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in [package_root, env.get("PYTHONPATH", "")] if p)
    out = tmp_path / "gpu_checks.json"
    result = subprocess.run([sys.executable, str(HERE / "gpu_checks.py"), "--json", str(out)], env=env, cwd=str(HERE),
                            capture_output=True, text=True, timeout=900)
    failed = [r for r in json.loads(out.read_text())["results"] if r["status"] == "failed"] if out.exists() else []
    assert result.returncode == 0, "\n\n".join(f"{r['name']}:\n{r['message']}" for r in failed) or result.stderr[-4000:]
