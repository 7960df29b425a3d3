# make paper   regenerate tables/ and figures/ (PROFILE=toy by default; voc and coco need a GPU)
# make test    the test suite and the notebook tests
# make test-scale  the voc and coco profiles through every stage at the paper's sizes, on CPU
# make gpu-check   on a CUDA machine: that smoke on the GPU and the throughput benchmark
# make release a release bundle of every complete run of the batch, in release/<PROFILE>/
# make lab     JupyterLab on notebooks/
# The first target run creates .venv and installs the pinned requirements (about 2 minutes).

PROFILE ?= toy
JOBS    ?=            # runs at once; empty: one per core as memory allows (the toy), 1 on a GPU
EXECUTOR ?= local
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.cpfcte-installed
TEST_RUNS := runs/_test

# notebooks run in the venv's python3 kernel, whatever kernels the user has elsewhere
export JUPYTER_PATH := $(abspath $(VENV))/share/jupyter
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: venv paper test test-scale gpu-check lab report release clean-runs

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

paper: $(STAMP)
	$(PY) -m cpfcte paper --profile $(PROFILE) $(if $(strip $(JOBS)),--jobs $(JOBS)) --executor $(EXECUTOR)

report: $(STAMP)
	$(PY) -m cpfcte report --profile $(PROFILE)

# weights, pseudo labels, config, labelled numbers, logs, MANIFEST.sha256 and a model card per
# run, and release/<PROFILE>/zoo.yaml (docs/releasing.md); URL: where they will be uploaded
release: $(STAMP)
	$(PY) -m cpfcte release --profile $(PROFILE) --out release/$(PROFILE) $(if $(strip $(URL)),--url $(URL))

test: $(STAMP)
	rm -rf $(TEST_RUNS)
	CPFCTE_RUNS=$(abspath $(TEST_RUNS)) CPFCTE_OUT=$(abspath $(TEST_RUNS))/out \
	  CPFCTE_BROWSER_OUT=$(abspath $(TEST_RUNS))/browser \
	  $(PY) -m pytest tests notebooks --nbval-lax -p no:cacheprovider

# the voc and coco profiles through every stage at the paper's sizes, on small real-format
# datasets, random init and 2 steps each (cpfcte.batch.smoke); about 13 min on 2 CPU cores
test-scale: $(STAMP)
	$(PY) -m cpfcte.batch.smoke --out runs/_scale

# On a CUDA machine: the same smoke on the GPU, the throughput benchmark (writes
# benchmarks/throughput.json, which the voc plan reads) and the voc plan. GPU_PY: the venv's
# python when it exists and imports torch (a dangling .venv link does not), else python3 (a GPU
# machine's own PyTorch and timm; benchmarks/build_wheels.sh builds the rest it needs, and
# benchmarks/device_check.sh installs them on the GPU machine).
GPU_PY ?= $(shell $(PY) -c "import torch" >/dev/null 2>&1 && echo $(PY) || echo python3)
gpu-check:
	$(GPU_PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: torch sees no CUDA device')"
	$(GPU_PY) -m cpfcte.batch.smoke --out runs/_gpu_scale
	$(GPU_PY) benchmarks/gpu_bench.py --out benchmarks/throughput.json
	$(GPU_PY) -m cpfcte paper --profile voc --dry-run

lab: $(STAMP)
	$(PY) -m jupyter lab --ip=127.0.0.1 --no-browser --notebook-dir=. --LabApp.default_url=/lab/tree/notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

clean-runs:
	rm -rf runs
