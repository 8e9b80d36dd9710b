#!/usr/bin/env bash
# The test command: sets up .venv, builds everything from scratch, runs every check.
#   bash tools/test.sh            # from a fresh clone, on Linux with python3 (venv) + g++
# Steps: build (tools/setup.sh) -> lint (tools/lint.sh) -> ptxas report when CUDA kernels
# were built -> pytest (tests/, Triton kernels under TRITON_INTERPRET=1; tests/test_readme.py
# runs the README) -> benchmark smoke run -> the bf16 micro-kernel check -> Triton ptxas
# report, gpu_check.sh --dry-run, the torch matrix (G2TR_TORCH_MATRIX=1) -> libtorch CMake
# build and its ctests (the dispatcher test, the merge splits, the README's C++ block) -> the wheel check
# -> vLLM serving (.venv-vllm, tests/vllm) -> (G2TR_SANITIZE=1) the ASan+UBSan run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${G2TR_VENV:-.venv}"
# Disk: what the tree holds and what the file system has left, after each heavy step, so a
# run that fills the disk says where (a whole run peaks at about 10 GB in the tree with
# G2TR_PRUNE=1, which .ci/run sets: each venv of the torch matrix, the wheel check's venv
# and .venv-vllm go as soon as their tests passed).
disk() {
  echo "test.sh: disk after $1: tree $(du -sh . 2>/dev/null | cut -f1), $(df -Ph . | awk 'NR == 2 {print $4}') free"
}
disk "nothing (start)"
bash tools/setup.sh
disk "the build"
PY="$VENV/bin/python"
# Lint first (seconds): ruff and clang-format as configured in pyproject.toml / .clang-format.
bash tools/lint.sh

if "$PY" -c "import g2tr_kernels, sys; sys.exit('cuda' not in g2tr_kernels.build_info()['backends'])"; then
  "$PY" tools/ptxas_report.py build/pip-build.log --out build/ptxas_report.md --so "g2tr_kernels/_C*.so"
fi

run_pytest() {
  local rc=0
  "$PY" -m pytest "$@" || rc=$?
  if [ "$rc" -eq 5 ]; then
    echo "test.sh: pytest collected no tests in $*: that is a failure here" >&2
    exit 1
  fi
  return "$rc"
}
run_pytest -q tests
# The other CPU merge paths (csrc/cpu/merge_path.h) through the whole merge and reduce suites;
# the run above took the automatic one. bf16_dot only where the CPU has avx512_bf16.
# About 1-2 min per path on 2 cores.
for path in $("$PY" -c "
import g2tr_kernels as g
info = g.build_info()
auto = info['cpu_merge']['bfloat16']['path']
print(' '.join(p for p in ('bf16_dot', 'fp32_gemm', 'bf16_gemm')
               if p != auto and (p != 'bf16_dot' or info['cpu_features']['avx512_bf16'])))"); do
  G2TR_CPU_MERGE="$path" run_pytest -q tests/test_merge.py tests/test_reduce.py -k "not cuda and not triton"
done
run_pytest -q benchmarks --benchmark-disable
# The bf16 merge micro-kernel against a float64 reference on ~550 shapes, ties and NaNs
# (a no-op on CPUs without AVX512-BF16).
"$PY" tests/cpp/dot_argmax_check.py --no-bench

# GPU readiness without a GPU (issue 11): the Triton kernels compiled offline for sm_80 and
# sm_90 as their launchers launch them (D = 3584, 3583, 17; three dtypes), zero spills; then
# tools/gpu_check.sh --dry-run: the build it makes on a GPU machine (CPU part, outside the
# tree), CPU runs of its Python steps on tiny shapes, the report skeleton.
env -u TRITON_INTERPRET "$PY" tools/ptxas_report.py --triton --out build/triton_ptxas_report.md
G2TR_PYTHON="$PY" bash tools/gpu_check.sh --dry-run
# Other torch releases (2.11.0: the lent GPU machine's; 2.15.0: the newest): own venvs,
# a few wheels each from PyPI, the version-sensitive tests. Behind G2TR_TORCH_MATRIX=1.
if [ "${G2TR_TORCH_MATRIX:-0}" = 1 ]; then
  G2TR_VENV="$VENV" bash tools/torch_matrix.sh
fi
disk "the GPU-readiness checks and the torch matrix"

TORCH_PREFIX="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
CMAKE_ARGS=(-S . -B build/cmake -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DTORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}")
if [ -n "${CUDA_HOME:-}" ] || [ -x /usr/local/cuda/bin/nvcc ]; then
  CMAKE_ARGS+=(-DCUDA_TOOLKIT_ROOT_DIR="${CUDA_HOME:-/usr/local/cuda}")
fi
NVRTC="$(ls "$SITE"/nvidia/cu*/lib/libnvrtc.so* 2>/dev/null | head -n 1 || true)"
[ -n "$NVRTC" ] && CMAKE_ARGS+=(-DCUDA_nvrtc_LIBRARY="$NVRTC")
# cmake and ctest come from requirements.txt (the PyPI cmake package), so a fresh machine needs none.
"$VENV/bin/cmake" "${CMAKE_ARGS[@]}" > build/cmake-configure.log 2>&1 || { tail -n 40 build/cmake-configure.log; exit 1; }
"$VENV/bin/cmake" --build build/cmake -j2 > build/cmake-build.log 2>&1 || { tail -n 40 build/cmake-build.log; exit 1; }
"$VENV/bin/ctest" --test-dir build/cmake --output-on-failure

# Packaging: sdist + wheel (`python -m build --no-isolation`), the wheel installed with its
# [bench] extra into a fresh venv beside torch, `g2tr info` and a small `g2tr bench` from
# outside the clone; reuses the extension built above, no second compile (224 s measured on
# 2 cores at load average ~16).
bash tools/wheel_check.sh
disk "the wheel check"

# vLLM serving (issue 13): vLLM for the CPU and this package in .venv-vllm (tools/vllm_env.sh,
# idempotent), then tests/vllm there. -P: the copy installed in that venv (with the
# vllm.general_plugins entry point vLLM loads), not the working tree's.
bash tools/vllm_env.sh
rc=0
"${G2TR_VLLM_VENV:-.venv-vllm}/bin/python" -P -m pytest -q tests/vllm || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests in tests/vllm: that is a failure here" >&2
  exit 1
fi
[ "$rc" -eq 0 ] || exit "$rc"
disk "the vLLM tests"
if [ "${G2TR_PRUNE:-0}" = 1 ]; then rm -rf "${G2TR_VLLM_VENV:-.venv-vllm}"; fi

# The C++ CPU kernels under AddressSanitizer + UndefinedBehaviorSanitizer: their ctest and
# the Python tests that attack the raw ops, fuzz cases included (tools/sanitize.sh). Two
# more builds of the kernels: behind a flag that .ci/run turns on (README "Reliability").
if [ "${G2TR_SANITIZE:-0}" = "1" ]; then
  bash tools/sanitize.sh
fi
disk "everything"
