#!/usr/bin/env bash
# The C++ CPU kernels under AddressSanitizer + UndefinedBehaviorSanitizer (issue 8):
#   1. the libtorch CMake build with -DG2TR_SANITIZE=ON and its ctest;
#   2. the Python extension built with the same flags into build/asan/pkg (a copy of the
#      package, the normal in-place build untouched), and the Python tests that attack the
#      raw ops (fuzz cases included) run against it with libasan preloaded.
# Any report (heap overflow, use after free, signed overflow, misaligned or out-of-range
# access) aborts the run. CPU only: G2TR_BUILD_CUDA=0.
#   bash tools/sanitize.sh            # from the repository root, after tools/setup.sh
# Called by tools/test.sh when G2TR_SANITIZE=1.
set -euo pipefail
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

export ASAN_OPTIONS="detect_leaks=0:protect_shadow_gap=0:abort_on_error=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"

TORCH_PREFIX="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
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
"$CMAKE" --build "$OUT/cmake" -j2 > "$OUT/cmake-build.log" 2>&1 || { tail -n 40 "$OUT/cmake-build.log"; exit 1; }
"$CTEST" --test-dir "$OUT/cmake" --output-on-failure
echo "sanitize.sh: ctest under ASan+UBSan passed ($(( $(date +%s) - start )) s so far)"

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
echo "sanitize.sh: ctest and Python tests under ASan+UBSan passed in $(( $(date +%s) - start )) s"
