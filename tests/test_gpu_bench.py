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
    for key in ("train_img_s", "infer_img_s", "deeplab_img_s", "crf_s_per_image_core",
                "loader_img_s"):
        assert data[key] > 0
    assert data["errors"] == {} and not (tmp_path / "throughput.partial.json").exists()
    assert list(data["seconds"]) == ["stage1", "inference", "deeplab", "loader", "bare_vit",
                                     "crf", "deeplab_channels_last"]   # by value to the plan
    assert data["deeplab_channels_last"]["channels_last"] is True
    assert data["deeplab"]["channels_last"] is False
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


def test_a_failed_section_keeps_every_figure_measured_before_it(tmp_path, monkeypatch):
    """The CRF, the last section, fails: the benchmark exits 1, but the partial file holds
    every GPU figure, the plan's keys of the sections that ran, and the error."""
    import pytest

    bench = _bench()

    def broken(sizes):
        raise RuntimeError("the CRF broke")

    monkeypatch.setattr(bench, "bench_crf", broken)
    out = tmp_path / "throughput.json"
    with pytest.raises(SystemExit) as e:
        bench.main(["--tiny", "--device", "cpu", "--no-compile", "--out", str(out)])
    assert e.value.code == 1 and not out.exists()
    partial = json.loads((tmp_path / "throughput.partial.json").read_text())
    assert partial["partial"] and partial["errors"] == {"crf": "RuntimeError: the CRF broke"}
    assert partial["train_img_s"] > 0 and partial["deeplab_img_s"] > 0
    assert "crf_s_per_image_core" not in partial and "(partial" in partial["source"]


def test_the_deeplab_figure_is_measured_with_cudnn_benchmark_as_training_runs(monkeypatch):
    import torch

    bench = _bench()
    seen = []
    monkeypatch.setattr(bench, "timed", lambda step, b, d, w, s: (
        seen.append(torch.backends.cudnn.benchmark), {"img_s": 1.0})[1])
    monkeypatch.setattr(bench, "_sync", lambda d: None)
    # a CUDA device faked on the CPU: the flag is what the section sets before it times
    fake = type("D", (), {"type": "cuda"})()
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: self)
    monkeypatch.setattr(torch, "randint", lambda lo, hi, size, device=None, dtype=None:
                        torch.zeros(size, dtype=dtype or torch.int64))
    before = torch.backends.cudnn.benchmark
    try:
        r = bench.bench_deeplab(fake, False, bench.TINY, True, 0, 1)
    finally:
        torch.backends.cudnn.benchmark = before
    assert seen == [True] and r["cudnn_benchmark"] is True


def test_the_loader_is_measured_as_stage_one_builds_it():
    bench = _bench()
    cfg = bench.stage1_config(True)
    cfg.workers = 0
    r = bench.bench_loader(cfg, bench.TINY, batches=2)
    assert r["img_s"] > 0 and r["batch"] == cfg.batch_size and r["batches"] == 2
    # voc's loader leaves the colour to the GPU; the loader's own colour is measured beside it
    assert cfg.augment_on == "device" and r["augment_on"] == "device"
    assert r["loader_colour"]["augment_on"] == "loader" and r["loader_colour"]["img_s"] > 0


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
    and the plan run and write their files; the wheels step installs only what does not import
    (skipped without wheels/cp312); the smoke is skipped and says so; $OUT holds
    at most 8 small files and no folder (what a device call returns), the logs and working
    trees go to $WORK; the last line of output before the table is the JSON summary."""
    import os
    import subprocess

    root = project_root()
    out = tmp_path / "device"
    env = {**os.environ, "OUT": str(out), "WORK": str(tmp_path / "work"),
           "PY": str(__import__("sys").executable)}
    done = subprocess.run(["bash", str(root / "benchmarks" / "device_check.sh"), "--tiny"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()[1:]]
    assert [s[0] for s in steps] == ["versions", "wheels", "micro", "bench", "plan", "smoke"]
    assert [s[1] for i, s in enumerate(steps) if i != 1] == ["0", "0", "0", "0", "skipped"], steps
    assert steps[1][1] in ("skipped", "0"), steps
    files = sorted(p.name for p in out.iterdir())
    assert files == ["log.txt", "micro.json", "plan.log", "steps.tsv", "throughput.json",
                     "versions.json"]
    assert all(p.is_file() and p.stat().st_size < 2**20 for p in out.iterdir())
    micro = json.loads((out / "micro.json").read_text())
    assert set(micro) == {"bilstm_dtype", "stage1_step", "msc_ranges"}
    assert all(v["ok"] for v in micro.values())
    versions = json.loads((out / "versions.json").read_text())
    assert versions["torch"] and "numpy" in versions
    assert "plan for profile voc" in (out / "plan.log").read_text()
    assert json.loads((out / "throughput.json").read_text())["train_img_s"] > 0
    summary = next(line for line in done.stdout.splitlines() if line.startswith("SUMMARY "))
    summary = json.loads(summary[len("SUMMARY "):])
    assert summary["throughput"]["train_img_s"] > 0 and summary["steps"]["bench"]["exit"] == "0"
    assert summary["files"] == files and (tmp_path / "work" / "bench.log").is_file()


def test_the_device_check_fits_one_device_call():
    """The caps of the steps before the smoke leave it at least 60 s of the 540 s envelope,
    and the envelope leaves 20 s of a 560 s call for the summary."""
    import re

    text = (project_root() / "benchmarks" / "device_check.sh").read_text()
    assert 'ENVELOPE="${ENVELOPE:-540}"' in text and "timeout_s 560" in text
    device_caps = [int(c) for name, c in re.findall(r"^\s*step (\w+) (\d+) ", text, re.M)
                   if name in ("versions", "wheels", "plan")]
    device_caps += [int(c) for c in re.findall(r"step (?:micro|bench) (\d+) \"\$PY\" "
                                               r"benchmarks/\S+\.py --(?!tiny)", text)]
    assert len(device_caps) == 5 and 540 - sum(device_caps) >= 60


def test_the_loader_benchmark_measures_both_places_of_the_colour(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "loader_bench", project_root() / "benchmarks" / "loader_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--images", "2", "--batches", "1", "--size", "32"])
    assert set(out) == {"loader", "device", "colour_on_this_cpu"}
    assert all(v > 0 for v in out.values())
    assert "augment_on: device" in capsys.readouterr().out
