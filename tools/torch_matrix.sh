#!/usr/bin/env bash
# Builds g2tr_kernels against other torch releases and runs the CPU test subset in each:
#
#   bash tools/torch_matrix.sh                  # 2.11.0 (the lent GPU machine's) and 2.15.0
#   bash tools/torch_matrix.sh 2.12.0 2.13.0    # any releases on PyPI
#
# tools/test.sh runs it when G2TR_TORCH_MATRIX=1 (.ci/run sets it). Each release gets
# build/torch-<v>/: a venv holding only torch <v>, the triton that wheel pins and the
# nvidia libraries it pins newer than the project venv's (read from its metadata: none
# for 2.11.0, nvshmem for 2.15.0 against this project's venv), all installed with
# --no-deps from PyPI; everything else (pytest, hypothesis, numpy, the other nvidia CUDA
# libraries that PyPI's torch wheels load at import, a CPU run included) comes from the
# project venv through a .pth line, which Python appends after the venv's own
# site-packages, so the venv's packages win. So a few wheels (~0.5 GB torch, ~0.2 GB
# triton, ~0.1 GB nvshmem) are downloaded per release, and a release already installed
# is reused (unless G2TR_PRUNE=1 removed it). PIP_CONFIG_FILE=/dev/null: this machine's pip
# config caps torch at the pinned 2.14.1 through a constraint file (and points at local
# mirrors); the matrix venvs ask PyPI itself. Then the extension is built into
# build/torch-<v>/site (CPU kernels; setup.py build, the same command tools/gpu_check.sh
# uses) and the tests run from outside the tree against that build.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"
BASE="${G2TR_VENV:-.venv}"
VERSIONS=("$@")
[ "${#VERSIONS[@]}" -eq 0 ] && VERSIONS=(2.11.0 2.15.0)
BASE_SITE="$("$BASE/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# What depends on torch's version: the op registrations, opcheck and fake tensors
# (test_library), reduce on every backend (test_reduce), autograd, and the Triton ops
# (torch.library.triton_op, wrap_triton, the interpreter): 220 tests.
TESTS=(test_library.py test_reduce.py test_autograd.py test_triton.py test_triton_common.py)

for v in "${VERSIONS[@]}"; do
  D="$REPO/build/torch-$v"
  PY="$D/venv/bin/python"
  t0=$(date +%s)
  if ! [ -x "$PY" ] || ! "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$v')" 2>/dev/null; then
    rm -rf "$D/venv" "$D/wheels"
    "$BASE/bin/python" -m venv "$D/venv"
    PIP_CONFIG_FILE=/dev/null "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$D/wheels" "torch==$v"
    WHEEL="$(ls "$D"/wheels/torch-*.whl)"
    # What the wheel pins that the project venv cannot stand in for: triton (the version
    # torch's Inductor and triton_op were built against) and every nvidia library pinned
    # newer than the one in the project venv (an older one may lack symbols torch links).
    EXTRA="$("$BASE/bin/python" - "$WHEEL" <<'EOF'
import re, sys, zipfile
from importlib import metadata
from packaging.version import Version

with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    lines = z.read(meta).decode().splitlines()
for line in lines:
    m = re.match(r"Requires-Dist: ([A-Za-z0-9_.-]+)\s*(==|~=)\s*([^;\s]+)\s*(;.*)?$", line)
    if not m or "extra ==" in (m.group(4) or ""):
        continue
    name, op, version = m.group(1), m.group(2), m.group(3)
    if name == "triton":
        print(f"triton{op}{version}")
    elif name.startswith("nvidia-") and op == "==":
        try:
            have = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            have = None
        if have is None or have < Version(version):
            print(f"{name}=={version}")
EOF
)"
    echo "torch_matrix: torch $v with --no-deps, plus:" $EXTRA
    # shellcheck disable=SC2086  (one requirement per word)
    PIP_CONFIG_FILE=/dev/null "$PY" -m pip install -q --no-deps "$WHEEL" $EXTRA
    rm -rf "$D/wheels"
    # The setuptools that venv seeds (65 on Python 3.11) predates the SPDX `license`
    # string of pyproject.toml and fails the build: use the project venv's one instead.
    # (Before the .pth line below exists, so pip only sees this venv's copy.)
    "$PY" -m pip uninstall -q -y setuptools
    echo "$BASE_SITE" > "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_project_venv.pth"
  fi
  t1=$(date +%s)
  echo "torch_matrix: $("$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)') ready in $((t1 - t0)) s"
  mkdir -p "$D"
  G2TR_BUILD_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" "$PY" setup.py build --build-base "$D/build" --build-lib "$D/site" \
    > "$D/build.log" 2>&1 || { tail -n 40 "$D/build.log"; echo "torch_matrix: build against torch $v failed" >&2; exit 1; }
  t2=$(date +%s)
  echo "torch_matrix: built against torch $v in $((t2 - t1)) s"
  (cd "$D" && PYTHONPATH="$D/site" "$PY" -m pytest -q -p no:cacheprovider --rootdir "$REPO" -o addopts=-ra \
    "${TESTS[@]/#/$REPO/tests/}") || { echo "torch_matrix: tests failed against torch $v" >&2; exit 1; }
  echo "torch_matrix: torch $v: install $((t1 - t0)) s, build $((t2 - t1)) s, tests $(($(date +%s) - t2)) s"
  # G2TR_PRUNE=1 (.ci/run): a release's venv (~2 GB) and build go once its tests passed.
  if [ "${G2TR_PRUNE:-0}" = 1 ]; then rm -rf "$D"; fi
done
