#!/usr/bin/env bash
# The main job: sets up .venv (as tools/test.sh does) unless it already holds a working
# build, then runs `g2tr bench` with the given arguments, e.g.
# `bash tools/bench.sh --workloads M1 --out bench-out`. G2TR_REBUILD=1 forces the setup.
#
# `bash tools/bench.sh --results` regenerates every committed result file under
# benchmarks/results/ from the current code (all but gpu/, which comes from a GPU machine)
# and prints how long each part took. Run it on an idle machine: the files record the
# load average, and the ratios in them are what the README quotes.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${G2TR_VENV:-.venv}"
if [ "${G2TR_REBUILD:-0}" = 1 ] || ! "$VENV/bin/python" -c "import g2tr_kernels; g2tr_kernels.build_info()" 2>/dev/null; then
  bash tools/setup.sh
fi
if [ "${1:-}" != "--results" ]; then
  exec "$VENV/bin/g2tr" bench "$@"
fi

OUT=benchmarks/results
PY="$VENV/bin/python"
TIMES=()
part() {  # part NAME COMMAND...: runs it, records its wall time
  local name="$1" start=$SECONDS
  shift
  echo "== $name: $*" >&2
  "$@"
  TIMES+=("$name: $((SECONDS - start)) s")
}
pytest_benchmark() {  # only the result tables of the pytest-benchmark reduce suite
  "$PY" -m pytest benchmarks/bench_reduce.py --g2tr-workloads S1,M1,M2 -q -p no:cacheprovider \
    --benchmark-columns=min,median,max --benchmark-sort=name | tee build/pytest-benchmark.log
  {
    echo "# pytest benchmarks/bench_reduce.py --g2tr-workloads S1,M1,M2 --benchmark-columns=min,median,max"
    echo "# CPU: $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p') ($(grep -m1 '^cpu family' /proc/cpuinfo | sed 's/.*: //')/$(grep -m1 '^model[[:space:]]*:' /proc/cpuinfo | sed 's/.*: //') family/model), load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
    sed -n '/^-* benchmark /,/^Legend:/p' build/pytest-benchmark.log | grep -v '^Legend:'
  } > "$OUT/pytest-benchmark-reduce.txt"
}
mkdir -p build "$OUT/fp32"
# bf16: every CPU merge path beside both floors, and the scaling sweep (scaling.png and its
# table in bench.md).
part "bench bf16 S1 M1 M2 + scaling" "$VENV/bin/g2tr" bench --workloads S1 M1 M2 --no-peers --no-stages --repeats 5 \
  --scaling --out "$OUT"
part "bench fp32 S1 M1 M2" "$VENV/bin/g2tr" bench --dtype float32 --workloads S1 M1 M2 --no-peers --no-stages \
  --repeats 5 --out "$OUT/fp32"
part "pytest-benchmark reduce S1 M1 M2" pytest_benchmark
part "e2e" "$PY" -m g2tr_kernels.bench.e2e --out "$OUT"
echo "bench.sh --results: wrote $OUT (bench.*, scaling.png, fp32/, pytest-benchmark-reduce.txt, e2e.*)"
printf '  %s\n' "${TIMES[@]}"
