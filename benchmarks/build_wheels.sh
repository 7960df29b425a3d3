#!/usr/bin/env bash
# Wheels for the GPU machine's own Python 3.12, which has PyTorch, timm, numpy, scipy,
# matplotlib, tqdm and pyyaml but no network, and lacks two packages: pycocotools and
# pydensecrf2 (the dense CRF; it has only an sdist). Built here (this machine reaches PyPI) into
# wheels/cp312/ (gitignored, about 4 MB), carried to the device with the working tree
# (the call names them: carry: ["wheels"]), installed there by benchmarks/device_check.sh with
# --no-deps, each only when its module does not import already.
#
#   benchmarks/build_wheels.sh [PYTHON3.12]     # default: pyenv's 3.12, else python3.12
#
# Versions: requirements.txt's.
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
# compiled here against numpy's headers (pydensecrf2 has only an sdist)
"$PY" -m pip wheel --quiet --no-deps -w "$OUT" "$(pin pycocotools)" "$(pin pydensecrf2)"
ls -la "$OUT"
du -sh "$OUT"
