#!/usr/bin/env bash
# Creates .venv (unless G2TR_VENV names another) with requirements.txt, then builds and
# installs g2tr_kernels into it in editable mode. Idempotent; needs only python3 and a
# C++ compiler. Build options (see setup.py): G2TR_BUILD_CUDA=auto|0|1, CUDA_HOME,
# TORCH_CUDA_ARCH_LIST. The build log goes to build/pip-build.log.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${G2TR_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -r requirements.txt
# A toolkit beside a CUDA build of torch: point torch at its root (it otherwise guesses
# the parent of the nvcc on PATH, which may be a wrapper script's folder).
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
mkdir -p build
"$VENV/bin/python" -m pip install --no-build-isolation -v -e . > build/pip-build.log 2>&1 || {
  tail -n 60 build/pip-build.log
  echo "setup.sh: the build failed; full log in build/pip-build.log" >&2
  exit 1
}
"$VENV/bin/python" -c "import g2tr_kernels; print('g2tr_kernels', g2tr_kernels.__version__, g2tr_kernels.build_info()['backends'])"
