"""The GPU benchmark script at tiny sizes on the CPU: every stage runs and the JSON it writes
has what the plan reads (the benchmark itself needs a CUDA machine: `make gpu-check`)."""

import importlib.util
import json

from cpfcte.paths import project_root


def _bench():
    spec = importlib.util.spec_from_file_location(
        "gpu_bench", project_root() / "benchmarks" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_bench_runs_every_stage_at_tiny_sizes_and_writes_the_plans_keys(tmp_path):
    from cpfcte.plan import REFERENCE

    out = tmp_path / "throughput.json"
    result = _bench().main(["--tiny", "--device", "cpu", "--no-compile", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))
    assert set(REFERENCE) <= set(data)                    # what cpfcte.plan reads
    for key in ("train_img_s", "infer_img_s", "deeplab_img_s", "crf_s_per_image_core"):
        assert data[key] > 0
    assert set(data["stage1"]) == {"bare_b2_eager", "full_b2_eager"}
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
