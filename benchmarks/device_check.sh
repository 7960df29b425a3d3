#!/usr/bin/env bash
# The one script a GPU session runs, from the repository root, inside one device call:
#
#   benchmarks/device_check.sh                 # on the GPU machine (its own Python 3.12)
#   benchmarks/device_check.sh --tiny          # the CPU test: tiny sizes, no smoke
#
# The device call: `run` with carry ["wheels"] (benchmarks/build_wheels.sh builds them here) and
# timeout_s 560. All steps share an envelope of ENVELOPE seconds (540); each step runs under the
# smaller of its own cap and what is left, in the order of their value:
#
#   1. versions.json: torch, CUDA, cuDNN, numpy and its CPU features, timm, make, gcc, the GPU;
#   2. wheels: the carried cp312 wheels (wheels/cp312/: pycocotools, pydensecrf2), each only
#      where its module does not import; a loud warning when pydensecrf still does not import;
#   3. micro.json: the micro-checks (benchmarks/device_micro.py: the CF-BiLSTM in float32 and
#      cuDNN's RNN precision under autocast, one stage-1 step at 384 × 16 under the CUDA sync
#      debug mode, the value range each DeepLabv2 MSC branch sees);
#   4. throughput.json: benchmarks/gpu_bench.py --no-compile, saved after every section
#      (throughput.partial.json while a section is missing);
#   5. plan.log: the voc plan from those figures (cpfcte paper --profile voc --dry-run);
#   6. smoke.json: the voc paper-scale smoke on the GPU, in what is left of the envelope
#      (skipped under 60 s).
#
# $OUT keeps at most 7 small files: steps.tsv, log.txt (the last lines of every step's output),
# versions.json, micro.json, throughput.json or throughput.partial.json, plan.log, smoke.json.
# The full logs and the smoke's working tree (checkpoints of hundreds of MB) go to $WORK, a
# temporary folder. The script ends by printing a compact JSON summary of every figure.
set -uo pipefail
cd "$(dirname "$0")/.."
TINY=0
[ "${1:-}" = "--tiny" ] && TINY=1
OUT="${OUT:-runs/_device}"
OWN_WORK=0
if [ -z "${WORK:-}" ]; then WORK="$(mktemp -d "${TMPDIR:-/tmp}/cpfcte-device.XXXXXX")"; OWN_WORK=1; fi
ENVELOPE="${ENVELOPE:-540}"
mkdir -p "$OUT" "$WORK"
PY="${PY:-$(command -v python3)}"
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then
  PY=.venv/bin/python
fi
START=$EPOCHSECONDS
printf "step\texit\tseconds\tlimit\n" > "$OUT/steps.tsv"
: > "$OUT/log.txt"

say() { echo "$*" | tee -a "$OUT/log.txt"; }

step() {   # step NAME CAP COMMAND...: under min(CAP, the envelope's rest); its log in $WORK
  local name="$1" cap="$2"; shift 2
  local rest=$(( ENVELOPE - (EPOCHSECONDS - START) ))
  local limit=$(( cap < rest ? cap : rest ))
  if (( limit < 5 )); then
    say "== $name: skipped (${rest} s left of the ${ENVELOPE} s envelope)"
    printf "%s\tskipped\t0\t%s\n" "$name" "$limit" >> "$OUT/steps.tsv"
    return
  fi
  local t0=$EPOCHREALTIME
  say "== $name (limit ${limit} s)"
  timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  tail -n 200 "$WORK/$name.log" >> "$OUT/log.txt"
  local secs
  secs=$(awk "BEGIN {printf \"%.1f\", $EPOCHREALTIME - $t0}")
  printf "%s\t%s\t%s\t%s\n" "$name" "$rc" "$secs" "$limit" >> "$OUT/steps.tsv"
  say "   exit $rc in $secs s"
}

skip() { say "== $1: skipped ($2)"; printf "%s\tskipped\t0\t0\n" "$1" >> "$OUT/steps.tsv"; }

step versions 30 "$PY" - "$OUT/versions.json" <<'EOF'
import json, platform, subprocess, sys
out = {"python": sys.version.split()[0], "machine": platform.machine()}
try:
    import cpfcte  # noqa: F401  (first: the CPU pins)
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

if [ -d wheels/cp312 ] && ls wheels/cp312/*.whl >/dev/null 2>&1; then
  step wheels 60 "$PY" - <<'EOF'
import glob, importlib, subprocess, sys
modules = {"pydensecrf2": "pydensecrf"}
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
else
  skip wheels "no wheels/cp312 here: the call did not carry them (carry: [\"wheels\"])"
fi
if ! "$PY" -c "import pydensecrf.densecrf" >/dev/null 2>&1; then
  say "!! WARNING: pydensecrf does not import. The CRF section of the benchmark and every CRF of"
  say "!! the smoke will fail. Build the wheels here (benchmarks/build_wheels.sh) and call the"
  say "!! device with carry: [\"wheels\"] (docs/scaling.md)."
fi

if [ "$TINY" = 1 ]; then
  step micro 120 "$PY" benchmarks/device_micro.py --tiny --device cpu --out "$OUT/micro.json"
  step bench 300 "$PY" benchmarks/gpu_bench.py --tiny --device cpu --no-compile --warmup 1 \
    --steps 1 --out "$OUT/throughput.json"
else
  step micro 90 "$PY" benchmarks/device_micro.py --out "$OUT/micro.json"
  step bench 240 "$PY" benchmarks/gpu_bench.py --no-compile --warmup 2 --steps 5 \
    --out "$OUT/throughput.json"
fi
FIGURES="$OUT/throughput.json"
[ -f "$FIGURES" ] || FIGURES="$OUT/throughput.partial.json"
step plan 45 env CPFCTE_THROUGHPUT="$FIGURES" "$PY" -m cpfcte paper --profile voc --dry-run
cp "$WORK/plan.log" "$OUT/plan.log" 2>/dev/null

if [ "$TINY" = 1 ]; then
  skip smoke "--tiny"
else
  REST=$(( ENVELOPE - (EPOCHSECONDS - START) ))
  if (( REST < 60 )); then
    skip smoke "${REST} s left of the ${ENVELOPE} s envelope, under 60"
  else
    step smoke "$REST" "$PY" -m cpfcte.batch.smoke --out "$WORK/smoke" --profiles voc
    cp "$WORK/smoke/smoke.json" "$OUT/smoke.json" 2>/dev/null
  fi
fi

# the compact summary: every figure, for the call's output tail
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None
rows = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()[1:]]
summary = {"steps": {r[0]: {"exit": r[1], "s": r[2]} for r in rows}}
v = load("versions.json") or {}
summary["versions"] = {k: v.get(k) for k in ("gpu", "torch", "cuda", "cudnn", "timm",
                                              "pydensecrf", "pycocotools")}
m = load("micro.json") or {}
summary["micro"] = {k: (d.get("ok"), d.get("error") or d.get("seconds") or d.get("rnn_precision"))
                    for k, d in m.items()}
t = load("throughput.json") or load("throughput.partial.json")
if t:
    summary["throughput"] = {k: t.get(k) for k in ("train_img_s", "infer_img_s", "deeplab_img_s",
                                                   "loader_img_s", "crf_s_per_image_core",
                                                   "cores")}
    summary["stage1"] = {k: [d.get("img_s"), d.get("peak_gb"), d.get("head_cost")]
                         for k, d in t.get("stage1", {}).items()}
    summary["bench_errors"] = t.get("errors")
    summary["bench_partial"] = bool(t.get("partial"))
try:
    plan = (out / "plan.log").read_text().splitlines()
    summary["plan"] = [line for line in plan if "main result" in line or line.startswith("total")]
except OSError:
    summary["plan"] = None
s = load("smoke.json")
summary["smoke"] = s if s is None or len(json.dumps(s)) < 3000 else "in smoke.json"
summary["files"] = sorted(p.name for p in out.iterdir())
print("SUMMARY " + json.dumps(summary, separators=(",", ":")))
EOF
cat "$OUT/steps.tsv"
[ "$OWN_WORK" = 1 ] && rm -rf "$WORK"
exit 0
