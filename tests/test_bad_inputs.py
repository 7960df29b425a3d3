"""Inputs that used to give a traceback or name the wrong file: each is now a CpfcteError that
names the file at fault and the fix."""

import json

import numpy as np
import pytest

from cpfcte.machinery.errors import CpfcteError
from cpfcte.machinery.io import save_label_png
from cpfcte.machinery.runfolder import RunFolder
from cpfcte.method.metrics import evaluate_dirs


@pytest.mark.parametrize("content, words", [
    ({"stage": "train", "config": [1, 2]}, "must be a mapping of parameters, got list"),
    ({"stage": "train", "config": {"crf": [3]}}, "'crf' in .* is a section"),
    ({"stage": "train", "config": {"epochs": "many"}}, "epochs='many' must be of type int"),
    ([1, 2], "not a cpfcte run config"),
])
def test_a_config_json_of_the_wrong_shape_is_named(tmp_path, content, words):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(content))
    with pytest.raises(CpfcteError, match=words) as e:
        RunFolder(run).config()
    assert "config.json" in str(e.value) or "epochs" in str(e.value)


def test_a_truncated_checkpoint_is_named_with_the_fix(tmp_path):
    import torch

    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    folder.save_checkpoint({"model": {"w": torch.ones(1000)}, "digest": "x"})
    data = (folder.path / "checkpoint.pt").read_bytes()
    (folder.path / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CpfcteError, match=r"checkpoint.pt: cannot read checkpoint, truncated or "
                                          r"not a cpfcte checkpoint .*delete it to retrain"):
        folder.load_checkpoint("x")


def test_a_missing_run_lists_the_runs_beside_it(tmp_path):
    runs = tmp_path / "runs" / "toy"
    for name in ("train_full", "train_base"):
        (runs / name).mkdir(parents=True)
        (runs / name / "config.json").write_text("{}")
    with pytest.raises(CpfcteError, match="no config.json: .* runs in .*: train_base, "
                                          "train_full"):
        RunFolder(runs / "train_ful").record()
    with pytest.raises(CpfcteError, match="holds no runs: make one first"):
        RunFolder(tmp_path / "runs" / "voc" / "x").record()


def test_a_ground_truth_label_out_of_range_names_the_ground_truth_file(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    save_label_png(pred / "a.png", np.zeros((4, 4), np.uint8))
    bad = np.zeros((4, 4), np.uint8)
    bad[0, 0] = 40
    save_label_png(gt / "a.png", bad)
    with pytest.raises(CpfcteError) as e:
        evaluate_dirs(pred, gt, num_classes=21)
    assert str(e.value).startswith(f"{gt / 'a.png'}: ground truth holds label 40")


class _Payload:
    """A pickle that would create a file when loaded (what a foreign checkpoint can hold)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    import torch

    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    witness = tmp_path / "pwned"
    torch.save({"model": _Payload(witness), "digest": "x"}, folder.path / "checkpoint.pt")
    with pytest.raises(CpfcteError, match="cannot read checkpoint"):
        folder.load_checkpoint("x")
    assert not witness.exists()


def test_no_checkpoint_is_read_with_pickle_enabled():
    from cpfcte.machinery.paths import project_root

    for path in [*(project_root() / "cpfcte").rglob("*.py"),
                 *(project_root() / "benchmarks").glob("*.py")]:
        text = path.read_text()
        assert "weights_only=False" not in text, path
        for line in (ln for ln in text.splitlines() if "torch.load(" in ln):
            assert "weights_only=True" in line, f"{path}: {line.strip()}"


def test_n_show_zero_draws_no_rows_and_a_negative_count_is_refused(tiny_cfg, toy_root):
    import matplotlib

    matplotlib.use("Agg")
    from cpfcte import plots
    from cpfcte.data import open_split

    voc = open_split(tiny_cfg(), "val")
    columns = {"image": plots.IMAGE, "ground truth": plots.GROUND_TRUTH}
    empty = plots.examples(voc, columns, n=0)
    assert "n_show = 0" in empty.axes[0].texts[0].get_text()
    assert len(plots.examples(voc, columns, n=2).axes) == 4           # 2 rows × 2 columns
    with pytest.raises(CpfcteError, match="n_show=-1"):
        plots.examples(voc, columns, n=-1)
