#!/usr/bin/env bash
# The package as a user gets it (tools/test.sh runs this after the test suite):
#  1. `python -m build --no-isolation --sdist --wheel`: the sdist must hold every tracked
#     build input (csrc/, python/, CMakeLists.txt, setup.py, ...); the wheel packages the
#     extension test.sh has just built (G2TR_PREBUILT_EXTENSION, see setup.py) instead of
#     compiling it again. G2TR_WHEEL_FROM_SDIST=1 builds the wheel from the sdist instead,
#     a full compile of the CPU kernels (16.7 min measured here, 2 cores at load average ~16).
#  2. a fresh venv that sees torch (and only what torch itself requires) from .venv;
#     the versions pip picks are held to requirements.txt (the tested ones, likely cached);
#     `pip install "<wheel>[bench]"` must bring everything else `g2tr bench` imports.
#  3. from a folder outside the clone: `g2tr info` and a small `g2tr bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
VENV="${G2TR_VENV:-.venv}"
PY="${G2TR_PYTHON:-$ROOT/$VENV/bin/python}"  # G2TR_PYTHON: another interpreter with the build tools
OUT="$ROOT/build/wheel-check"
rm -rf "$OUT"
mkdir -p "$OUT/dist"
started=$SECONDS

SO="$(ls g2tr_kernels/_C*.so | head -n 1)"
if [ "${G2TR_WHEEL_FROM_SDIST:-0}" = 1 ]; then
  G2TR_BUILD_CUDA=0 "$PY" -m build --no-isolation --outdir "$OUT/dist" > "$OUT/build.log" 2>&1 \
    || { tail -n 40 "$OUT/build.log"; exit 1; }
else
  G2TR_BUILD_CUDA=0 G2TR_PREBUILT_EXTENSION="$ROOT/$SO" "$PY" -m build --no-isolation --sdist --wheel \
    --outdir "$OUT/dist" > "$OUT/build.log" 2>&1 || { tail -n 40 "$OUT/build.log"; exit 1; }
fi
SDIST="$(ls "$OUT"/dist/*.tar.gz)"
WHEEL="$(ls "$OUT"/dist/*.whl)"

# Every tracked file the build reads is in the sdist; the wheel holds the extension and py.typed.
"$PY" - "$SDIST" "$WHEEL" <<'EOF'
import subprocess, sys, tarfile, zipfile
sdist, wheel = sys.argv[1:]
with tarfile.open(sdist) as tar:
    names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
tracked = subprocess.run(["git", "ls-files", "csrc", "python", "g2tr_kernels", "CMakeLists.txt", "setup.py",
                          "pyproject.toml", "MANIFEST.in", "LICENSE", "README.md", "requirements.txt"],
                         check=True, capture_output=True, text=True).stdout.split()
missing = sorted(set(tracked) - names)
if missing:
    sys.exit(f"wheel_check: the sdist lacks {len(missing)} tracked build inputs: {missing[:10]}")
with zipfile.ZipFile(wheel) as whl:
    files = whl.namelist()
need = ["g2tr_kernels/py.typed", "g2tr_kernels/ops.py"]
absent = [n for n in need if n not in files] + ([] if any(n.startswith("g2tr_kernels/_C") for n in files) else ["_C*.so"])
if absent or not any(n.endswith("entry_points.txt") for n in files):
    sys.exit(f"wheel_check: the wheel lacks {absent or 'its entry_points.txt'}")
print(f"wheel_check: sdist holds all {len(tracked)} tracked build inputs; wheel has the extension, py.typed, g2tr")
EOF

# A fresh venv; torch and the distributions torch requires are linked in from .venv
# (a second copy of the CUDA build of torch is 5 GB and minutes of unpacking), nothing else.
python3 -m venv "$OUT/venv"
SITE="$("$OUT/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$PY" tools/link_torch.py "$OUT/torch-only" --label wheel_check
echo "$OUT/torch-only" > "$SITE/g2tr-wheel-check-torch.pth"
"$OUT/venv/bin/python" -m pip install --quiet --upgrade pip > /dev/null
"$OUT/venv/bin/python" -m pip install --quiet -c requirements.txt "$WHEEL[bench]" > "$OUT/pip.log" 2>&1 || { tail -n 40 "$OUT/pip.log"; exit 1; }

cd "$(mktemp -d)"  # outside the clone: the installed wheel, not the source tree, must answer
"$OUT/venv/bin/g2tr" info
"$OUT/venv/bin/g2tr" bench --quick --workloads S1 --repeats 1 --no-compile --no-memory --out "$OUT/bench"
test -s "$OUT/bench/bench.md"
# G2TR_PRUNE=1 (.ci/run): the venv and the dists go once checked, the bench report stays.
if [ "${G2TR_PRUNE:-0}" = 1 ]; then rm -rf "$OUT/venv" "$OUT/torch-only" "$OUT/dist"; fi
echo "wheel_check: passed in $((SECONDS - started)) s"
