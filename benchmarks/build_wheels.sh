#!/usr/bin/env bash
# Wheels for the GPU machine's own Python 3.12, which has PyTorch and timm but no network: built
# here (this machine reaches PyPI) into wheels/cp312/ (gitignored), carried to the device with
# the working tree, and installed there by benchmarks/device_check.sh with --no-deps, each only
# when its module does not import already.
#
#   benchmarks/build_wheels.sh [PYTHON3.12]     # default: pyenv's 3.12, else python3.12
#
# pycocotools and pydensecrf2 (from its sdist) are compiled; the rest the smoke, the benchmark
# and the report need are taken as binary wheels (scipy for SBD's .mat files and the paired
# intervals, matplotlib and its dependencies, tqdm, pyyaml). Versions: requirements.txt's.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-}"
if [ -z "$PY" ]; then
  PY="$(ls -d "$HOME"/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | head -n1 || true)"
  PY="${PY:-$(command -v python3.12 || true)}"
fi
[ -n "$PY" ] && "$PY" -c 'import sys; assert sys.version_info[:2] == (3, 12)' || {
  echo "build_wheels: needs a Python 3.12 (pass its path)" >&2; exit 1; }
OUT=wheels/cp312
mkdir -p "$OUT"
pin() { grep -E "^$1==" requirements.txt | head -n1; }
# compiled here (pydensecrf2 has only an sdist)
"$PY" -m pip wheel --quiet --no-deps -w "$OUT" "$(pin pycocotools)" "$(pin pydensecrf2)"
# binary wheels for CPython 3.12 on x86-64 Linux
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 -d "$OUT" \
  "$(pin scipy)" "$(pin matplotlib)" "$(pin tqdm)" "$(pin pyyaml)" \
  contourpy cycler fonttools kiwisolver pyparsing python-dateutil six packaging
ls -la "$OUT"
du -sh "$OUT"
