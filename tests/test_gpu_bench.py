"""The GPU benchmark script at tiny sizes on the CPU: every stage runs and the JSON it writes
has what the plan reads (the benchmark itself needs a CUDA machine: `make gpu-check`)."""

import importlib.util
import json

from cpfcte.machinery.paths import project_root


def _bench():
    spec = importlib.util.spec_from_file_location(
        "gpu_bench", project_root() / "benchmarks" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_bench_runs_every_stage_at_tiny_sizes_and_writes_the_plans_keys(tmp_path):
    from cpfcte.batch.plan import REFERENCE

    out = tmp_path / "throughput.json"
    result = _bench().main(["--tiny", "--device", "cpu", "--no-compile", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))
    assert set(REFERENCE) <= set(data)                    # what cpfcte.batch.plan reads
    for key in ("train_img_s", "infer_img_s", "deeplab_img_s", "crf_s_per_image_core"):
        assert data[key] > 0
    assert set(data["stage1"]) == {"bare_b2_eager", "full_b2_eager", "regime_b2_eager"}
    assert "head_cost" in data["stage1"]["full_b2_eager"]
    assert data["provenance"]["weights"] == "random init" and data["provenance"]["commit"]
    assert data["crf"]["cores"] >= 1


def test_gpu_bench_refuses_cuda_without_a_gpu(tmp_path):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit, match="no CUDA device"):
        _bench().main(["--device", "cuda", "--out", str(tmp_path / "t.json")])


def test_a_failed_crf_is_an_error_not_a_speed(monkeypatch):
    """Without pydensecrf every CRF image fails fast: the benchmark must refuse to turn that
    into a seconds-per-image figure for the plan."""
    import pytest

    import cpfcte.stages.crf_pool as crf

    def failing(jobs, params, **kw):              # what crf_stage reports without pydensecrf
        return {"written": 0, "skipped": 0, "seconds": 0.01, "workers": 2,
                "failed": {str(i): "ImportError: No module named 'pydensecrf'"
                           for i, _ in enumerate(jobs)}}

    monkeypatch.setattr(crf, "crf_stage", failing)
    bench = _bench()
    with pytest.raises(SystemExit, match="dense CRF failed on 2 of 2 images.*pydensecrf"):
        bench.bench_crf({**bench.TINY, "crf_images": 2})


def test_the_device_check_runs_every_step_at_tiny_sizes(tmp_path):
    """benchmarks/device_check.sh --tiny on the CPU: versions, the micro-checks, the benchmark
    and the plan run and write their files; every step exits 0."""
    import os
    import subprocess

    root = project_root()
    env = {**os.environ, "OUT": str(tmp_path / "device"), "PY": str(__import__("sys").executable)}
    done = subprocess.run(["bash", str(root / "benchmarks" / "device_check.sh"), "--tiny"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "device"
    steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()[1:]]
    assert [s[0] for s in steps] == ["versions", "micro", "bench", "plan"]
    assert all(s[1] == "0" for s in steps), steps
    micro = json.loads((out / "micro.json").read_text())
    assert set(micro) == {"bilstm_dtype", "stage1_step", "msc_ranges"}
    assert all(v["ok"] for v in micro.values())
    versions = json.loads((out / "versions.json").read_text())
    assert versions["torch"] and "numpy" in versions
    assert "plan for profile voc" in (out / "plan.log").read_text()
    assert json.loads((out / "throughput.json").read_text())["train_img_s"] > 0
