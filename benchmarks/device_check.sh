#!/usr/bin/env bash
# The one script the first GPU session runs (issues 25 and 27), from the repository root, in
# under 9 minutes; everything it measures goes under $OUT:
#
#   benchmarks/device_check.sh                 # on the GPU machine (its own Python 3.12)
#   benchmarks/device_check.sh --tiny          # the CPU test: tiny sizes, no smoke
#
#   0. installs the carried cp312 wheels (wheels/cp312/, built here by
#      benchmarks/build_wheels.sh: pycocotools, pydensecrf2) with --no-deps, when present;
#   1. versions.json (versions.log): torch, CUDA, cuDNN, numpy and its CPU features, timm, make, gcc, the GPU;
#   2. micro.json: a minute of micro-checks (benchmarks/device_micro.py: the BiLSTM's dtype under
#      autocast, one stage-1 step at 384 × 16 under the CUDA sync debug mode, the value range
#      each DeepLabv2 MSC branch sees);
#   3. smoke.log, smoke.json: the voc paper-scale smoke on the GPU, with a 300 s limit;
#   4. throughput.json: benchmarks/gpu_bench.py --no-compile with few steps;
#   5. plan.log: the voc plan from those figures (cpfcte paper --profile voc --dry-run).
#
# Each step's exit code and seconds go to steps.tsv; a failed step does not stop the others.
set -uo pipefail
cd "$(dirname "$0")/.."
TINY=0
[ "${1:-}" = "--tiny" ] && TINY=1
OUT="${OUT:-runs/_device}"
mkdir -p "$OUT"
PY="${PY:-$(command -v python3)}"
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then
  PY=.venv/bin/python
fi
printf "step\texit\tseconds\n" > "$OUT/steps.tsv"

step() {        # step NAME LIMIT_S COMMAND...: its output in NAME.log, exit and seconds recorded
  local name="$1" limit="$2"; shift 2
  local t0=$EPOCHREALTIME
  echo "== $name" | tee -a "$OUT/log.txt"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  cat "$OUT/$name.log" >> "$OUT/log.txt"
  printf "%s\t%s\t%s\n" "$name" "$rc" "$(awk "BEGIN {printf \"%.1f\", $EPOCHREALTIME - $t0}")" \
    >> "$OUT/steps.tsv"
  echo "   exit $rc" | tee -a "$OUT/log.txt"
}

if [ -d wheels/cp312 ] && ls wheels/cp312/*.whl >/dev/null 2>&1 && [ "$TINY" = 0 ]; then
  # each carried wheel only where its module does not import (the device's own versions stay)
  step wheels 180 "$PY" - <<'EOF'
import glob, importlib, subprocess, sys
modules = {"pydensecrf2": "pydensecrf", "pyyaml": "yaml", "python_dateutil": "dateutil",
           "fonttools": "fontTools"}
missing = []
for wheel in sorted(glob.glob("wheels/cp312/*.whl")):
    dist = wheel.split("/")[-1].split("-")[0].lower()
    try:
        importlib.import_module(modules.get(dist, dist))
        print(f"{dist}: already here")
    except ImportError:
        missing.append(wheel)
if missing:
    print("installing", missing, flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
                    *missing], check=True)
EOF
fi

step versions 60 "$PY" - "$OUT/versions.json" <<'EOF'
import json, platform, subprocess, sys
out = {"python": sys.version.split()[0], "machine": platform.machine()}
try:
    import torch
    out.update(torch=torch.__version__, cuda=torch.version.cuda,
               cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
               gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               gpus=torch.cuda.device_count(), cpu_capability=torch.backends.cpu.get_cpu_capability())
except Exception as e:  # noqa: BLE001
    out["torch_error"] = repr(e)
for mod in ("numpy", "timm", "pycocotools", "pydensecrf"):
    try:
        m = __import__(mod)
        out[mod] = getattr(m, "__version__", "installed")
    except Exception as e:  # noqa: BLE001
        out[mod] = f"missing ({type(e).__name__})"
try:
    from numpy._core._multiarray_umath import __cpu_features__ as f
    out["numpy_cpu_features"] = sorted(k for k, v in f.items() if v)
except Exception:  # noqa: BLE001
    pass
for tool in (["make", "--version"], ["gcc", "--version"], ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]):
    try:
        out[tool[0]] = subprocess.run(tool, capture_output=True, text=True, timeout=20).stdout.splitlines()[0]
    except Exception as e:  # noqa: BLE001
        out[tool[0]] = f"missing ({type(e).__name__})"
json.dump(out, open(sys.argv[1], "w"), indent=2)
print(json.dumps(out, indent=2))
EOF

if [ "$TINY" = 1 ]; then
  step micro 120 "$PY" benchmarks/device_micro.py --tiny --device cpu --out "$OUT/micro.json"
  echo "== smoke: skipped (--tiny)" | tee -a "$OUT/log.txt"
  step bench 300 "$PY" benchmarks/gpu_bench.py --tiny --device cpu --no-compile --warmup 1 \
    --steps 1 --out "$OUT/throughput.json"
else
  step micro 120 "$PY" benchmarks/device_micro.py --out "$OUT/micro.json"
  step smoke 300 "$PY" -m cpfcte.batch.smoke --out "$OUT/smoke" --profiles voc
  cp "$OUT/smoke/smoke.json" "$OUT/smoke.json" 2>/dev/null
  step bench 240 "$PY" benchmarks/gpu_bench.py --no-compile --warmup 2 --steps 5 \
    --out "$OUT/throughput.json"
fi
step plan 60 env CPFCTE_THROUGHPUT="$OUT/throughput.json" "$PY" -m cpfcte paper --profile voc \
  --dry-run
cat "$OUT/steps.tsv"
