#!/usr/bin/env bash
# The main job: sets up .venv (as tools/test.sh does) unless it already holds a working
# build, then runs `g2tr bench` with the given arguments, e.g.
# `bash tools/bench.sh --workloads M1 --out bench-out`. G2TR_REBUILD=1 forces the setup.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${G2TR_REBUILD:-0}" = 1 ] || ! "${G2TR_VENV:-.venv}/bin/python" -c "import g2tr_kernels; g2tr_kernels.build_info()" 2>/dev/null; then
  bash tools/setup.sh
fi
exec "${G2TR_VENV:-.venv}/bin/g2tr" bench "$@"
