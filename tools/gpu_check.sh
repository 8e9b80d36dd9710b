#!/usr/bin/env bash
# One command on a machine with a GPU: builds the extension against the torch already
# installed there and proves or disproves the GPU kernels, in under 8 minutes.
#
#   bash tools/gpu_check.sh            # on the GPU machine (no network, nothing installed)
#   bash tools/gpu_check.sh --dry-run  # anywhere: the build, the CPU smoke runs of the
#                                      # Python steps, the report skeleton; every other
#                                      # step's command line printed, not run (CI runs this)
#
# Steps, each with its own timeout inside one overall budget (G2TR_CHECK_BUDGET_S, 470 s),
# so a hang costs one step, never the lease:
#   build     setup.py build into build/gpu-check/site (no pip, no venv, no network):
#             CUDA kernels for TORCH_CUDA_ARCH_LIST (default 9.0), ninja with MAX_JOBS = nproc;
#             its time is printed first. In a dry run CPU only (G2TR_DRY_BUILD_CUDA=1 adds CUDA).
#   ptxas     tools/ptxas_report.py on the build log (zero spills, SASS for every arch)
#   import    the built package loads and has the cuda backend
#   env       GPU, driver, torch / triton / nvcc versions, whether pytest and hypothesis exist
#   then, side by side (the GPU is large): pytest on CUDA (tests/test_cuda.py: opcheck,
#             compile, graphs, streams, a second device if any), pytest -k cuda over
#             tests/test_triton.py and the op test files, tests/gpu_checks.py (cuda and triton against the reference at
#             D = 3584 and odd D, graph capture of both paths, streams, compile, Triton
#             registers), compute-sanitizer memcheck / racecheck / synccheck of reduce at M1
#             and M2 for both GPU backends
#   then, alone on the GPU: tools/gpu_check.py profile (reduce per backend against the
#             bf16 cuBLAS floor, per-kernel times), g2tr bench --device cuda (reference,
#             published structure, floor) on S1, M1, M2 and, separately, L2
#   report    report.md + report.json + logs.tar.gz + bench.md + bench.json + bench-L2.md
#             (6 files: the device returns at most 8) into $OUT if set, else
#             build/gpu-check/out. Without pytest or hypothesis the pytest steps are skipped
#             and the report says so; tests/gpu_checks.py runs without them.
set -uo pipefail
CALLER_PWD="$PWD"  # G2TR_PYTHON may be relative to the caller (test.sh passes .venv/bin/python)
cd "$(dirname "$0")/.."
REPO="$(pwd)"
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash tools/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
START=$(date +%s)
BUDGET="${G2TR_CHECK_BUDGET_S:-470}"
W="${G2TR_CHECK_WORK:-$REPO/build/gpu-check}"
OUTDIR="${OUT:-$W/out}"
rm -rf "$W/logs" "$W/site" "$W/bench" "$W/bench-L2" "$W"/*.json "$W/steps.tsv"
mkdir -p "$W/logs" "$OUTDIR"

PY="${G2TR_PYTHON:-}"
if [ -z "$PY" ]; then
  PY=python3
  if ! python3 -c "import torch" 2>/dev/null && [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; fi
fi
# The steps run from other folders: a relative interpreter path must not depend on them.
case "$PY" in
  /*) ;;
  */*) PY="$CALLER_PWD/$PY" ;;
esac
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "gpu_check: $PY cannot import torch; set G2TR_PYTHON to a python that can" >&2
  exit 2
fi
have() { "$PY" -c "import $1" 2>/dev/null; }
HAVE_PYTEST=0
have pytest && have hypothesis && HAVE_PYTEST=1
# The toolkit root: CUDA_HOME, else the one holding the nvcc on PATH, else /usr/local/cuda.
if [ -z "${CUDA_HOME:-}" ]; then
  CUDA_HOME=/usr/local/cuda
  NVCC="$(command -v nvcc || true)"
  [ -n "$NVCC" ] && CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$NVCC")")")"
fi
export CUDA_HOME
export PATH="$PATH:$CUDA_HOME/bin"
export PYTHONUNBUFFERED=1
SITE="$W/site"
printf 'name\trc\tseconds\ttimeout_s\tlog\tcommand\n' > "$W/steps.tsv"

# step NAME LIMIT_S DIR RUN_IN_DRY CMD...: runs CMD in DIR with the built package first on
# the path, output to logs/NAME.log; records exit status and time in steps.tsv.
step() {
  local name=$1 limit=$2 dir=$3 in_dry=$4
  shift 4
  local left=$((BUDGET - ($(date +%s) - START)))
  [ "$limit" -gt "$left" ] && limit=$left
  local log="$W/logs/$name.log" rc t0=$(date +%s)
  echo "== $name (timeout ${limit}s): $*"
  if [ "$DRY" = 1 ] && [ "$in_dry" = 0 ]; then
    rc=dry-run
  elif [ "$limit" -lt 5 ]; then
    echo "out of time: the overall budget of ${BUDGET}s is spent" > "$log"
    rc=124
  else
    (cd "$dir" && PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" timeout -k 10 "$limit" "$@") > "$log" 2>&1
    rc=$?
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" "$limit" "$log" "$*" >> "$W/steps.tsv"
  [ "$rc" = dry-run ] || echo "   $name: exit $rc after $(($(date +%s) - t0)) s"
}
skip() {  # NAME WHY
  printf '%s\tskip\t0\t0\t-\t%s\n' "$1" "$2" >> "$W/steps.tsv"
  echo "== $1: skipped ($2)"
}

# --------------------------------------------------------------------------- build
BUILD_CUDA=1 BUILD_LIMIT=240
# torch builds with ninja (all cores) when it finds one on PATH, else one file at a time:
# minutes more, and every later step needs the build. The pip `ninja` package's binary
# counts too. Without either the build gets more of the budget, and the report says why.
if ! command -v ninja > /dev/null; then
  NINJA_BIN="$("$PY" -c 'import ninja, sys; sys.stdout.write(ninja.BIN_DIR)' 2>/dev/null || true)"
  [ -n "$NINJA_BIN" ] && [ -x "$NINJA_BIN/ninja" ] && export PATH="$NINJA_BIN:$PATH"
fi
if command -v ninja > /dev/null; then
  echo "gpu_check: ninja $(ninja --version) at $(command -v ninja)"
else
  echo "gpu_check: WARNING no ninja here: torch compiles the extension one file at a time (build limit 360 s)"
  BUILD_LIMIT=360
fi
if [ "$DRY" = 1 ]; then  # a 2-core CI machine: the CPU build alone takes minutes there
  BUILD_CUDA="${G2TR_DRY_BUILD_CUDA:-0}" BUILD_LIMIT=1200 BUDGET="${G2TR_CHECK_BUDGET_S:-1800}"
fi
step build "$BUILD_LIMIT" "$REPO" 1 env G2TR_BUILD_CUDA="$BUILD_CUDA" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
  MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" setup.py build --build-base "$W/build" --build-lib "$SITE"
echo "BUILD: exit $(tail -n 1 "$W/steps.tsv" | cut -f2) in $(tail -n 1 "$W/steps.tsv" | cut -f3) s (CUDA kernels: $BUILD_CUDA)"
if [ "$BUILD_CUDA" = 1 ]; then
  step ptxas 60 "$REPO" 1 "$PY" tools/ptxas_report.py "$W/logs/build.log" --allow-empty
fi
WANT=cpu
[ "$DRY" = 0 ] && WANT=cuda
# From the build above, not an installed copy (an editable install would answer as well).
# The package and its _C must come from the build above: with an editable install of the
# same tree (CI's .venv) a missing _C would otherwise be found there.
step import 60 "$W" 1 "$PY" -c "import g2tr_kernels as g, json, sys; i = g.build_info(); c = g._native._C.__file__; \
print(c, json.dumps(i)); sys.exit(not c.startswith('$SITE/g2tr_kernels/') or '$WANT' not in i['backends'])"
step env 60 "$W" 1 "$PY" "$REPO/tools/gpu_check.py" env --json "$W/env.json"

# ---------------------------------------------- correctness, side by side on one GPU
PYTEST=("$PY" -m pytest -q -p no:cacheprovider --rootdir "$REPO" -o addopts=-ra)
if [ "$HAVE_PYTEST" = 1 ]; then
  # test_cuda.py whole; elsewhere the CUDA cases only (CI runs the CPU and interpreter ones).
  step pytest-gpu 230 "$W" 0 "${PYTEST[@]}" "$REPO/tests/test_cuda.py" &
  step pytest-ops-cuda 230 "$W" 0 "${PYTEST[@]}" -k cuda "$REPO/tests/test_triton.py" "$REPO/tests/test_reduce.py" \
    "$REPO/tests/test_merge.py" "$REPO/tests/test_balanced_topk.py" "$REPO/tests/test_anchor_scores.py" \
    "$REPO/tests/test_autograd.py" &
else
  skip pytest-gpu "pytest or hypothesis is not installed here"
  skip pytest-ops-cuda "pytest or hypothesis is not installed here"
fi
step gpu-checks 230 "$W" 0 "$PY" "$REPO/tests/gpu_checks.py" --json "$W/gpu_checks.json" &
SANITIZER="$(command -v compute-sanitizer || true)"
# At most 4 sanitizer runs at once (the host side of each is CPU-heavy), queued in a
# subshell of their own so that `wait -n` there counts only them, not the pytest runs.
(
RUNNING=0
for tool in memcheck racecheck synccheck; do
  for backend in cuda triton; do
    for workload in M1 M2; do
      if [ -z "$SANITIZER" ] && [ "$DRY" = 0 ]; then
        skip "sanitize-$tool-$backend-$workload" "compute-sanitizer not found"
        continue
      fi
      # memcheck sees into the caching allocator's blocks only without it.
      step "sanitize-$tool-$backend-$workload" 230 "$W" 0 env PYTORCH_NO_CUDA_MEMORY_CACHING=$([ $tool = memcheck ] && echo 1 || echo 0) \
        "${SANITIZER:-compute-sanitizer}" --tool "$tool" --error-exitcode 3 --print-limit 20 \
        "$PY" "$REPO/tools/gpu_check.py" sanitize --backend "$backend" --workload "$workload" &
      RUNNING=$((RUNNING + 1))
      if [ "$RUNNING" -ge 4 ]; then wait -n; RUNNING=$((RUNNING - 1)); fi
    done
  done
done
wait
) &
wait
if [ "$DRY" = 1 ]; then  # the checks' own code, on tiny CPU shapes: a broken check shows here, not on a lease
  step gpu-checks-cpu-smoke 120 "$W" 1 env TRITON_INTERPRET=1 "$PY" "$REPO/tests/gpu_checks.py" --device cpu \
    --only "M1 D=3583" --json "$W/gpu_checks.json"
fi

# ------------------------------------------------------------- times, GPU to itself
if [ "$DRY" = 1 ]; then
  step profile-cpu-smoke 120 "$W" 1 "$PY" "$REPO/tools/gpu_check.py" profile --device cpu --workloads S1 M1 \
    --repeats 2 --json "$W/profile.json"
fi
step profile 90 "$W" 0 "$PY" "$REPO/tools/gpu_check.py" profile --workloads S1 M1 M2 L2 --repeats 20 \
  --json "$W/profile.json"
# L2 on its own: the published structure's Python loop over 32 x 1024 cells may run long,
# and a timeout there must not lose S1, M1 and M2.
step bench 80 "$W" 0 "$PY" -m g2tr_kernels bench --device cuda --workloads S1 M1 M2 --no-peers --no-compile \
  --no-memory --repeats 5 --warmup 2 --out "$W/bench"
step bench-L2 80 "$W" 0 "$PY" -m g2tr_kernels bench --device cuda --workloads L2 --no-peers --no-compile \
  --no-memory --repeats 3 --warmup 1 --out "$W/bench-L2"

# ---------------------------------------------------------------------------- report
"$PY" "$REPO/tools/gpu_check.py" report --work "$W" --out "$OUTDIR" $([ "$DRY" = 1 ] && echo --dry-run)
RC=$?
tar -czf "$OUTDIR/logs.tar.gz" -C "$W" logs steps.tsv $(cd "$W" && ls *.json 2>/dev/null) 2>/dev/null
[ -f "$W/bench/bench.md" ] && cp "$W/bench/bench.md" "$OUTDIR/bench.md"
[ -f "$W/bench/bench.json" ] && cp "$W/bench/bench.json" "$OUTDIR/bench.json"
[ -f "$W/bench-L2/bench.md" ] && cp "$W/bench-L2/bench.md" "$OUTDIR/bench-L2.md"
echo "gpu_check: $(($(date +%s) - START)) s; report in $OUTDIR/report.md (exit $RC)"
exit $RC
