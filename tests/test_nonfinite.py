"""A non-finite loss stops stage 1 and DeepLabv2 with an error naming run and step; the last
good checkpoint stays, the run is not complete, downstream stages refuse it; with
skip_nonfinite the steps are skipped and counted. NaN never reaches a JSON file."""

import json

import pytest
import torch

from cpfcte.machinery.errors import CpfcteError
from cpfcte.machinery.finite import FiniteGuard, NonFiniteError
from cpfcte.machinery.io import write_json


def test_the_guard_records_the_first_bad_step_without_reading_it_back():
    model = torch.nn.Linear(2, 2)
    guard = FiniteGuard(torch.device("cpu"), "runs/x", "step")
    for i, value in enumerate([1.0, float("nan"), float("inf"), 2.0]):
        assert guard.step(torch.tensor(value), i)
    with pytest.raises(NonFiniteError, match=r"runs/x: non-finite loss at step 2 \(epoch 3\)"):
        guard.check(model, "epoch 3")
    guard.check(model, "epoch 4")                              # reset after the check
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="non-finite weights"):
        guard.check(model, "epoch 5")
    skip = FiniteGuard(torch.device("cpu"), "runs/x", "step", skip=True)
    assert [skip.step(torch.tensor(v), i) for i, v in enumerate([1.0, float("nan"), 3.0])] == [
        True, False, True]
    assert skip.skipped == 1


def test_stage1_with_a_huge_learning_rate_stops_and_keeps_the_last_good_checkpoint(
        tiny_cfg, tmp_path, monkeypatch):
    import cpfcte.stages.train as T
    from cpfcte.stages.pseudo_labels import pseudo_stage

    cfg = tiny_cfg(epochs=3, warmup_epochs=0)
    T.train(cfg, tmp_path / "ok", progress=False, max_epochs=1)
    before = torch.load(tmp_path / "ok" / "checkpoint.pt", weights_only=True)
    assert before["epoch"] == 1
    real = T.mce_loss
    monkeypatch.setattr(T, "mce_loss", lambda p, y: real(p, y) * float("nan"))
    with pytest.raises(NonFiniteError, match=r"ok: non-finite loss at step 1 \(epoch 2\)"):
        T.train(cfg, tmp_path / "ok", progress=False)
    after = torch.load(tmp_path / "ok" / "checkpoint.pt", weights_only=True)
    assert after["epoch"] == 1 and all(torch.equal(after["model"][k], before["model"][k])
                                       for k in before["model"])
    assert not (tmp_path / "ok" / "summary.json").exists() or not json.loads(
        (tmp_path / "ok" / "summary.json").read_text())["complete"]
    with pytest.raises(CpfcteError, match="stopped at epoch 1 of 3"):
        pseudo_stage(cfg, tmp_path / "ok", tmp_path / "p", progress=False)
    calls = []

    def every_other(p, y):                     # steps 1 and 3 of each epoch are non-finite
        calls.append(1)
        return real(p, y) * (float("nan") if len(calls) % 2 else 1.0)

    monkeypatch.setattr(T, "mce_loss", every_other)
    skip = tiny_cfg(epochs=1, warmup_epochs=0, skip_nonfinite=True)
    summary = T.train(skip, tmp_path / "skip", progress=False)
    assert summary["complete"] and summary["history"][0]["skipped_nonfinite"] == 2
    assert summary["history"][0]["loss"] == summary["history"][0]["loss"]   # finite, not NaN


def test_deeplab_stops_on_a_non_finite_loss(tiny_cfg, toy_root, tmp_path, monkeypatch):
    from test_deeplab import TINY, _pseudo_dir

    import cpfcte.stages.deeplab_train as D

    pseudo = _pseudo_dir(toy_root, tmp_path)
    cfg = tiny_cfg(deeplab={**TINY, "iterations": 4, "ckpt_every": 2})
    D.train_deeplab(cfg, pseudo, tmp_path / "d", max_iterations=2, progress=False)
    real = D.msc_loss
    monkeypatch.setattr(D, "msc_loss", lambda *a: real(*a) * float("inf"))
    with pytest.raises(NonFiniteError, match=r"d: non-finite loss at iteration 3 \(iterations "
                                             r"up to 4\)"):
        D.train_deeplab(cfg, pseudo, tmp_path / "d", progress=False)
    assert torch.load(tmp_path / "d" / "checkpoint.pt", weights_only=True)["iteration"] == 2
    with pytest.raises(CpfcteError, match="stopped at iteration 2 of 4"):
        D.load_deeplab(tmp_path / "d", cfg)


def test_json_files_never_hold_nan(tmp_path):
    with pytest.raises(CpfcteError, match=r"m.json: refusing to write a non-finite number"):
        write_json(tmp_path / "m.json", {"loss": float("nan")})
    assert not (tmp_path / "m.json").exists()


def test_the_guard_makes_no_host_to_device_copy_in_a_step(monkeypatch):
    """A step's index reaches the device tensor in place (``fill_``): no ``torch.tensor`` or
    ``torch.as_tensor`` of a host value, which on CUDA would be a blocking copy every step."""
    import torch

    from cpfcte.machinery.finite import FiniteGuard

    guard = FiniteGuard(torch.device("cpu"), "run", "step")

    def refuse(*a, **k):
        raise AssertionError("host-to-device copy in the step")

    monkeypatch.setattr(torch, "as_tensor", refuse)
    monkeypatch.setattr(torch, "tensor", refuse)
    for i, value in enumerate([1.0, 2.0, float("nan"), float("inf"), 3.0]):
        assert guard.step(torch.full((), value), i)
    monkeypatch.undo()
    assert int(guard.first_bad) == 2
