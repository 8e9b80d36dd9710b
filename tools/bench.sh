#!/usr/bin/env bash
# The main job: sets up .venv (as tools/test.sh does) and runs `g2tr bench` with the
# given arguments, e.g. `bash tools/bench.sh --workloads M1 --out bench-out`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec "${G2TR_VENV:-.venv}/bin/g2tr" bench "$@"
