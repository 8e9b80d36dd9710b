#!/usr/bin/env bash
# Lint, as CI runs it (tools/test.sh): `ruff check` with the rules in pyproject.toml over
# the Python, and `clang-format --dry-run -Werror` (.clang-format) over the tracked C++ and
# CUDA sources. `bash tools/lint.sh --fix` rewrites instead of checking. Both tools are
# pinned in requirements.txt and .pre-commit-config.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${G2TR_VENV:-.venv}/bin"
mapfile -t CXX < <(git ls-files '*.cpp' '*.h' '*.cu' '*.cuh')
if [ "${1:-}" = "--fix" ]; then
  "$BIN/ruff" check --fix .
  "$BIN/clang-format" -i "${CXX[@]}"
else
  "$BIN/ruff" check .
  "$BIN/clang-format" --dry-run -Werror "${CXX[@]}"
  echo "lint.sh: ruff and clang-format clean (${#CXX[@]} C++/CUDA files)"
fi
