"""Guards by content and by name: a copy of the ground truth is refused whatever its path, and
run or profile names cannot leave runs/."""

import shutil

import pytest

from cpfcte.machinery.errors import CpfcteError


def test_a_renamed_copy_of_the_ground_truth_is_refused_as_predictions(toy_root, tmp_path):
    from cpfcte.data.voc import read_split
    from cpfcte.method.metrics import evaluate_dirs

    ids = read_split(toy_root, "val")
    copy = tmp_path / "my_predictions"
    shutil.copytree(toy_root / "SegmentationClass", copy)
    with pytest.raises(CpfcteError, match=r"my_predictions: refused as predictions: \d+ of \d+ "
                                          "masks agree with the split's ground truth"):
        evaluate_dirs(copy, toy_root / "SegmentationClass", 11, ids=ids)


def test_deeplab_refuses_a_renamed_copy_of_the_training_masks(tiny_cfg, toy_root, tmp_path):
    from test_deeplab import TINY

    from cpfcte.stages.deeplab_train import train_deeplab

    copy = tmp_path / "pseudo_from_somewhere"
    shutil.copytree(toy_root / "SegmentationClassAug", copy)
    with pytest.raises(CpfcteError, match="refused as pseudo labels for DeepLab training: .* "
                                          "copy of the labels"):
        train_deeplab(tiny_cfg(deeplab=TINY), copy, tmp_path / "d", progress=False)
    assert not (tmp_path / "d" / "config.json").exists()


def test_split_names_are_plain_names_and_the_profile_comes_from_profile_alone(tiny_cfg):
    from cpfcte.machinery.config import derive, load_config

    cfg = tiny_cfg()
    for bad in ("../x", "a/b", "..", "", " train", "tr\nain", "a\\b"):
        for field in ("train_split", "pseudo_split", "val_split"):
            with pytest.raises(CpfcteError, match=f"parameter {field} .*plain name"):
                derive(cfg, {field: bad})
    assert derive(cfg, {"pseudo_split": "train_aug.v2"}).pseudo_split == "train_aug.v2"
    with pytest.raises(CpfcteError, match="--set profile=voc.*--profile voc"):
        load_config("toy", {"profile": "voc"})
    assert load_config("toy", {"profile": "toy"}).profile == "toy"


def test_run_and_profile_names_cannot_leave_runs():
    from cpfcte.machinery.paths import run_path, runs_dir

    assert run_path("toy", "train_full") == runs_dir() / "toy" / "train_full"
    # the path as `ls` shows it from the project's root, and the batch's profile/name
    assert run_path("toy", "runs/toy/train_full") == runs_dir() / "toy" / "train_full"
    assert run_path("toy", "toy/train_full") == runs_dir() / "toy" / "train_full"
    for profile, name in (("toy", "../x"), ("toy", "a/../../x"), ("../etc", "x")):
        with pytest.raises(CpfcteError, match="would leave runs/"):
            run_path(profile, name)


def test_one_writer_per_run_folder_and_a_stale_lock_is_taken_over(tmp_path, tiny_cfg):
    import json
    import os
    import socket
    import subprocess
    import sys

    from cpfcte.machinery.runfolder import LOCK, RunFolder

    cfg = tiny_cfg()
    folder = RunFolder(tmp_path / "run")
    (tmp_path / "run").mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "run" / LOCK).write_text(json.dumps({"pid": other.pid,
                                                         "host": socket.gethostname()}))
        with pytest.raises(CpfcteError, match=f"in use by process {other.pid} on"):
            folder.start("train", cfg, cfg.training_fields())
    finally:
        other.kill()
        other.wait()
    (tmp_path / "run" / ".checkpoint.pt.abc.tmp").write_bytes(b"half")   # a kill mid-save
    folder.start("train", cfg, cfg.training_fields())                     # stale: taken over
    assert json.loads((tmp_path / "run" / LOCK).read_text())["pid"] == os.getpid()
    assert not list((tmp_path / "run").glob(".*.tmp"))
    folder.start("train", cfg, cfg.training_fields())                     # ours: re-entrant


def test_a_failed_start_does_not_block_the_run_name(tmp_path, tiny_cfg):
    from cpfcte.machinery.runfolder import RunFolder

    a, b = tiny_cfg(), tiny_cfg(k=3)
    folder = RunFolder(tmp_path / "run").start("train", a, a.training_fields())
    # nothing produced: another config may take the name
    folder.start("train", b, b.training_fields())
    (tmp_path / "run" / "log.jsonl").write_text('{"epoch": 1}\n')
    with pytest.raises(CpfcteError, match="holds a train run with another config"):
        folder.start("train", a, a.training_fields())


def test_a_stage_releases_its_lock_when_it_returns_or_raises(tmp_path, tiny_cfg):
    """A notebook kernel lives on after its stage: the lock goes with the stage, not with the
    process, so another process (the CLI, a second notebook) may continue the run."""
    from cpfcte.machinery.runfolder import LOCK, RunFolder
    from cpfcte.stages.train import train

    cfg = tiny_cfg(epochs=1)
    train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / LOCK).exists()
    with pytest.raises(CpfcteError):                   # refused after it took the lock
        train(tiny_cfg(epochs=1, k=3), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / LOCK).exists()
    outer = RunFolder(tmp_path / "other").start("train", cfg, cfg.training_fields())
    train(cfg, tmp_path / "run", progress=False)       # a stage leaves others' locks alone
    assert (outer.path / LOCK).exists()
