"""Pinned CPU numerics: the same training gives the same weights whatever code paths the
machine would pick by itself (cpfcte.machinery.numerics)."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import TINY_MODEL

TRAIN = """
import hashlib, json, sys
from pathlib import Path
from cpfcte.machinery.config import load_config     # cpfcte first: it pins the paths numpy and torch load
import torch
from cpfcte.machinery.numerics import active_paths
from cpfcte.stages.train import train
root, out = sys.argv[1], Path(sys.argv[2])
cfg = load_config("toy", {"data_root": root, **json.loads(sys.argv[3]), "epochs": 2})
train(cfg, out, progress=False)
state = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
h = hashlib.sha256()
for k, v in sorted(state.items()):
    h.update(k.encode() + v.numpy().tobytes())
print(json.dumps({"digest": h.hexdigest(), **active_paths()}))
"""

OTHER_MACHINE = {   # what another processor, or a user's shell, would choose by itself
    "ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "OMP_NUM_THREADS": "2",
    "MKL_NUM_THREADS": "2", "ONEDNN_MAX_CPU_ISA": "AVX2", "NPY_DISABLE_CPU_FEATURES": ""}


def _train(toy_root, tmp_path, name, env):
    base = {k: v for k, v in os.environ.items() if k not in OTHER_MACHINE and k != "MKL_CBWR"}
    done = subprocess.run([sys.executable, "-c", TRAIN, str(toy_root), str(tmp_path / name),
                           json.dumps({k: v for k, v in TINY_MODEL.items() if k != "epochs"})],
                          capture_output=True, text=True, env={**base, **env}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_training_gives_the_same_weights_under_other_cpu_code_paths(toy_root, tmp_path):
    here = _train(toy_root, tmp_path, "here", {})
    other = _train(toy_root, tmp_path, "other", OTHER_MACHINE)
    assert (here["aten"], here["numpy"], here["threads"]) == ("AVX2", "X86_V3", "1")
    assert other["aten"] == "AVX2" and other["threads"] == "1"
    assert other["digest"] == here["digest"]
    # the control: the machine's own paths (no pinning, ATen without vectorisation) give
    # other bits, so the equality above is the pinning's doing
    native = _train(toy_root, tmp_path, "native",
                    {"CPFCTE_NUMERICS": "native", "ATEN_CPU_CAPABILITY": "default"})
    assert native["aten"] == "DEFAULT" and native["digest"] != here["digest"]


def test_a_pinned_stage_refuses_a_process_with_other_code_paths(tiny_cfg, tmp_path):
    code = ("import numpy, torch, json, sys\n"           # loaded before cpfcte: not pinned
            "from cpfcte.machinery.errors import CpfcteError\n"
            "from cpfcte.machinery.config import load_config\n"
            "from cpfcte.machinery.numerics import apply\n"
            "try:\n    apply(load_config('toy'))\nexcept CpfcteError as e:\n    print(e)\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("ATEN_CPU_CAPABILITY", "NPY_DISABLE_CPU_FEATURES", "MKL_CBWR")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if "AVX512" not in out.stdout and "numpy dispatches" not in out.stdout:
        pytest.skip("this processor has no code path above AVX2 to catch")
    assert "import cpfcte before numpy and torch" in out.stdout


def test_the_provenance_line_names_cpu_paths_threads_and_versions():
    from cpfcte.machinery.numerics import describe

    line = describe()
    from cpfcte.machinery.numerics import cpu_vendor

    for part in ("numerics pinned", "ATen AVX2", "MKL CBWR COMPATIBLE", "numpy ≤ X86_V3",
                 "oneDNN", "torch 2.", "MKL 20", f"({cpu_vendor()})"):
        assert part in line, (part, line)


def _numerics_cli(*args, env=None):
    base = {k: v for k, v in os.environ.items() if k not in OTHER_MACHINE and k != "MKL_CBWR"}
    return subprocess.run([sys.executable, "-m", "cpfcte", "numerics", *args],
                          capture_output=True, text=True, env={**base, **(env or {})},
                          timeout=300)


def test_this_machine_gives_the_committed_numerics_fingerprint():
    """Every operation the toy runs, at its shapes, and one training step of the toy network
    give the committed bits (cpfcte.stages.fingerprint). A processor whose code paths differ
    fails here, naming the operations: its toy tables would differ from the committed ones."""
    done = _numerics_cli("--check")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "all 39 operations give the committed reference's bits" in done.stdout


def test_the_fingerprint_sees_another_mkl_branch():
    """The control: MKL's AVX2 branch (Intel's; on AMD, MKL's own dispatch) gives other bits
    for the GEMM-backed operations, and the check names them and fails."""
    done = _numerics_cli("--check", env={"CPFCTE_FINGERPRINT_MKL_CBWR": "AVX2,STRICT"})
    assert done.returncode == 1
    assert "DIFFERS vit qkv linear 2080x96->288" in done.stdout
    assert "DIFFERS toy stage 1: state digest after two training steps" in done.stdout
    assert "same    torch generators" in done.stdout


def test_a_fingerprint_file_round_trips_through_diff(tmp_path):
    mine = _numerics_cli()
    assert mine.returncode == 0, mine.stderr[-2000:]
    (tmp_path / "mine.json").write_text(mine.stdout)
    assert _numerics_cli("--diff", str(tmp_path / "mine.json")).returncode == 0
    changed = json.loads(mine.stdout)                  # the model changed, not the machine
    changed["ops"]["toy stage 1: state digest after two training steps"] = "0" * 12
    (tmp_path / "model.json").write_text(json.dumps(changed))
    model = _numerics_cli("--diff", str(tmp_path / "model.json"))
    assert model.returncode == 1 and "cpfcte numerics --write" in model.stderr
    changed["ops"]["vit qkv linear 2080x96->288"] = "0" * 12
    (tmp_path / "machine.json").write_text(json.dumps(changed))
    machine = _numerics_cli("--diff", str(tmp_path / "machine.json"))
    assert machine.returncode == 1 and "Tell us the processor" in machine.stderr
    (tmp_path / "bad.json").write_text("{}")
    bad = _numerics_cli("--diff", str(tmp_path / "bad.json"))
    assert bad.returncode == 2 and "not a fingerprint file" in bad.stderr


def test_a_pinned_stage_refuses_mkl_on_another_branch():
    """MKL read MKL_CBWR before cpfcte pinned it (torch used first): the stage refuses."""
    code = ("import torch\ntorch.mm(torch.ones(8, 8), torch.ones(8, 8))\n"
            "import cpfcte\nfrom cpfcte.machinery.errors import CpfcteError\n"
            "from cpfcte.machinery.config import load_config\n"
            "from cpfcte.machinery.numerics import apply\n"
            "try:\n    apply(load_config('toy'))\nexcept CpfcteError as e:\n    print(e)\n")
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    env.update({"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR"})
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "MKL runs its" in out.stdout and "branch" in out.stdout, out.stdout + out.stderr


def test_a_misspelt_numerics_mode_is_refused_by_name(tiny_cfg, monkeypatch):
    from cpfcte.machinery.errors import CpfcteError
    from cpfcte.machinery.numerics import apply

    monkeypatch.setenv("CPFCTE_NUMERICS", "bogus")
    with pytest.raises(CpfcteError, match="CPFCTE_NUMERICS='bogus': must be one of pinned, native"):
        apply(tiny_cfg())


def test_deterministic_algorithms_follow_the_runs_device_not_the_machine(monkeypatch):
    """A CPU run on a machine with a GPU (the toy on a GPU node) still gets deterministic
    algorithms; a CUDA run does not (several CUDA kernels have no deterministic version)."""
    import torch

    from cpfcte.machinery import numerics
    from cpfcte.machinery.config import load_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)      # a GPU machine
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        numerics.apply(load_config("toy", {"device": "cpu"}))
        assert torch.are_deterministic_algorithms_enabled()
        numerics.apply(load_config("toy", {"device": "cuda"}))
        assert not torch.are_deterministic_algorithms_enabled()
        from cpfcte.machinery.distributed import resolve_device

        assert resolve_device(load_config("toy", {"device": "auto"}).device).type == "cuda"
    finally:
        torch.use_deterministic_algorithms(before)
