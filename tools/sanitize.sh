#!/usr/bin/env bash
# The C++ CPU kernels under AddressSanitizer + UndefinedBehaviorSanitizer (issue 8):
#   1. the Python extension built with the same flags into build/asan/pkg (a copy of the
#      package, the normal in-place build untouched), and the Python tests that attack the
#      raw ops (fuzz cases included) run against it with libasan preloaded;
#   2. the libtorch CMake build with -DG2TR_SANITIZE=ON and its ctest.
# Any report (heap overflow, use after free, signed overflow, misaligned or out-of-range
# access) aborts the run. CPU only: G2TR_BUILD_CUDA=0.
#   bash tools/sanitize.sh                # from the repository root, after tools/setup.sh
#   bash tools/sanitize.sh --python-only  # step 1 alone (rebuilds only what changed)
# Called by tools/test.sh when G2TR_SANITIZE=1.
set -euo pipefail
PYTHON_ONLY=0
[ "${1:-}" = "--python-only" ] && PYTHON_ONLY=1
cd "$(dirname "$0")/.."
ROOT="$PWD"
VENV="${G2TR_VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
PY="$VENV/bin/python"
[ -x "$PY" ] || PY="$(command -v python3)"
OUT="$ROOT/build/asan"
SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
mkdir -p "$OUT"
start=$(date +%s)

# detect_leaks=0: the Python interpreter and torch keep allocations alive to exit (not
# ours, and reported as leaks at every exit). handle_segv=0: the fuzz harness tells a crash
# by the worker's signal (tests/test_fuzz.py sends itself SIGSEGV to prove it); ASan's own
# handler would turn SIGSEGV into SIGABRT. Out-of-bounds accesses are still caught by the
# instrumentation, before any signal.
export ASAN_OPTIONS="detect_leaks=0:protect_shadow_gap=0:abort_on_error=1:handle_segv=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"

TORCH_PREFIX="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# The package copy: Python sources from the tree, _C built with the sanitizer flags.
rm -rf "$OUT/pkg/g2tr_kernels"
mkdir -p "$OUT/pkg"
"$PY" -c "import shutil, sys; shutil.copytree('g2tr_kernels', sys.argv[1], ignore=shutil.ignore_patterns('*.so', '__pycache__'))" \
  "$OUT/pkg/g2tr_kernels"
CFLAGS="$SAN" LDFLAGS="$SAN" G2TR_BUILD_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" \
  "$PY" setup.py build_ext --build-temp "$OUT/tmp" --build-lib "$OUT/pkg" > "$OUT/ext-build.log" 2>&1 \
  || { tail -n 40 "$OUT/ext-build.log"; exit 1; }
LIBASAN="$(${CXX:-c++} -print-file-name=libasan.so)"
LIBUBSAN="$(${CXX:-c++} -print-file-name=libubsan.so)"
# From inside the copy, so `import g2tr_kernels` finds it (and not the in-place build).
cd "$OUT/pkg"
LD_PRELOAD="$LIBASAN:$LIBUBSAN" G2TR_FUZZ_EXAMPLES="${G2TR_FUZZ_EXAMPLES:-3}" "$PY" -m pytest -q -p no:cacheprovider \
  "$ROOT/tests/test_fuzz.py" "$ROOT/tests/test_errors.py" "$ROOT/tests/test_extreme_values.py" \
  "$ROOT/tests/test_merge.py" "$ROOT/tests/test_reduce.py" -k "not triton"
echo "sanitize.sh: Python tests under ASan+UBSan passed ($(( $(date +%s) - start )) s so far)"
cd "$ROOT"
[ "$PYTHON_ONLY" = 1 ] && exit 0
CMAKE="$(dirname "$PY")/cmake"; [ -x "$CMAKE" ] || CMAKE=cmake
CTEST="$(dirname "$PY")/ctest"; [ -x "$CTEST" ] || CTEST=ctest
ARGS=(-S . -B "$OUT/cmake" -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DG2TR_SANITIZE=ON
      -DTORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}")
if [ -n "${CUDA_HOME:-}" ] || [ -x /usr/local/cuda/bin/nvcc ]; then
  ARGS+=(-DCUDA_TOOLKIT_ROOT_DIR="${CUDA_HOME:-/usr/local/cuda}")
fi
NVRTC="$(ls "$SITE"/nvidia/cu*/lib/libnvrtc.so* 2>/dev/null | head -n 1 || true)"
[ -n "$NVRTC" ] && ARGS+=(-DCUDA_nvrtc_LIBRARY="$NVRTC")
"$CMAKE" "${ARGS[@]}" > "$OUT/cmake-configure.log" 2>&1 || { tail -n 40 "$OUT/cmake-configure.log"; exit 1; }
"$CMAKE" --build "$OUT/cmake" -j"${MAX_JOBS:-2}" > "$OUT/cmake-build.log" 2>&1 || { tail -n 40 "$OUT/cmake-build.log"; exit 1; }
"$CTEST" --test-dir "$OUT/cmake" --output-on-failure
echo "sanitize.sh: ctest under ASan+UBSan passed"

echo "sanitize.sh: Python tests and ctest under ASan+UBSan passed in $(( $(date +%s) - start )) s"

