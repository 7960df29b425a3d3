"""Guards by content and by name: a copy of the ground truth is refused whatever its path, and
run or profile names cannot leave runs/."""

import shutil

import pytest

from cpfcte.errors import CpfcteError


def test_a_renamed_copy_of_the_ground_truth_is_refused_as_predictions(toy_root, tmp_path):
    from cpfcte.data.voc import read_split
    from cpfcte.metrics import evaluate_dirs

    ids = read_split(toy_root, "val")
    copy = tmp_path / "my_predictions"
    shutil.copytree(toy_root / "SegmentationClass", copy)
    with pytest.raises(CpfcteError, match=r"my_predictions: refused as predictions: \d+ of \d+ "
                                          "masks are pixel-identical"):
        evaluate_dirs(copy, toy_root / "SegmentationClass", 11, ids=ids)


def test_deeplab_refuses_a_renamed_copy_of_the_training_masks(tiny_cfg, toy_root, tmp_path):
    from cpfcte.deeplab import train_deeplab
    from test_deeplab import TINY

    copy = tmp_path / "pseudo_from_somewhere"
    shutil.copytree(toy_root / "SegmentationClassAug", copy)
    with pytest.raises(CpfcteError, match="refused as pseudo labels for DeepLab training: .* "
                                          "pixel-identical"):
        train_deeplab(tiny_cfg(deeplab=TINY), copy, tmp_path / "d", progress=False)
    assert not (tmp_path / "d" / "config.json").exists()


def test_run_and_profile_names_cannot_leave_runs():
    from cpfcte.paths import run_path, runs_dir

    assert run_path("toy", "train_full") == runs_dir() / "toy" / "train_full"
    for profile, name in (("toy", "../x"), ("toy", "a/../../x"), ("../etc", "x")):
        with pytest.raises(CpfcteError, match="would leave runs/"):
            run_path(profile, name)
