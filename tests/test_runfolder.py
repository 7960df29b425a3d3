"""The run-folder protocol shared by training, pseudo labels and DeepLabv2."""

import json

import pytest
import torch

from cpfcte.machinery.config import load_config
from cpfcte.machinery.errors import CpfcteError
from cpfcte.machinery.runfolder import CONFIG, RunFolder, run_config


def test_a_folder_keeps_one_stage_and_one_digest(tmp_path):
    cfg = load_config("toy")
    folder = RunFolder(tmp_path / "r").start("train", cfg, cfg.training_fields())
    saved = json.loads((tmp_path / "r" / CONFIG).read_text())
    assert saved["stage"] == "train" and saved["digest"] == cfg.digest()
    assert folder.config() == cfg                          # what downstream stages start from
    later = load_config("toy", {"device": "cpu", "crf.iterations": 3})
    folder.start("train", later, later.training_fields())  # same network: accepted, recorded
    assert run_config(tmp_path / "r", {"k": None}).crf.iterations == 3
    other = load_config("toy", {"k": 8, "lr": 1e-3})
    folder.append_log({"epoch": 1})                        # the run has produced something
    with pytest.raises(CpfcteError, match=r"another config \(differs in k, lr\)"):
        folder.start("train", other, other.training_fields())
    with pytest.raises(CpfcteError, match="holds a train run, not a deeplab run"):
        RunFolder(tmp_path / "r").start("deeplab", cfg, cfg.deeplab_fields())


def test_checkpoints_round_trip_and_refuse_another_config(tmp_path):
    folder = RunFolder(tmp_path)
    assert folder.load_checkpoint("abc") is None
    folder.save_checkpoint({"model": {"w": torch.ones(2)}, "epoch": 3, "digest": "abc",
                            "history": [{"loss": 0.5, "frozen": True}]})
    state = folder.load_checkpoint("abc")
    assert state["epoch"] == 3 and torch.equal(state["model"]["w"], torch.ones(2))
    with pytest.raises(CpfcteError, match="trained with another config"):
        folder.load_checkpoint("xyz")
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CpfcteError, match="cannot read checkpoint"):
        folder.load_checkpoint("abc")
    assert not list(tmp_path.glob(".*.tmp"))


def test_folders_of_an_older_layout_or_none_are_refused_clearly(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / CONFIG).write_text(json.dumps({"digest": "x", "config": {"crf_iterations": 10}}))
    with pytest.raises(CpfcteError, match="written by an older cpfcte"):
        RunFolder(old).config()
    with pytest.raises(CpfcteError, match="no config.json: not a run folder"):
        RunFolder(tmp_path / "missing").config()
