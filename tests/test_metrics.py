import json

import numpy as np
import pytest

from cpfcte.machinery.errors import CpfcteError
from cpfcte.machinery.io import save_label_png
from cpfcte.method.metrics import ConfusionMatrix, evaluate_dirs


def test_known_confusion_matrix():
    # gt/pred pairs giving the confusion [[9, 5, 0], [3, 7, 0], [0, 0, 0]] (rows = gt)
    gt = np.array([0] * 14 + [1] * 10)
    pred = np.array([0] * 9 + [1] * 5 + [0] * 3 + [1] * 7)
    cm = ConfusionMatrix(3)
    cm.update(pred, gt)
    assert cm.matrix.tolist() == [[9, 5, 0], [3, 7, 0], [0, 0, 0]]
    iou = cm.iou()
    assert iou[0] == pytest.approx(9 / 17) and iou[1] == pytest.approx(7 / 15)
    assert iou[2] is None                                      # absent from the ground truth
    assert cm.miou() == pytest.approx((9 / 17 + 7 / 15) / 2)  # 0.4980392...


def test_ignore_index_and_absent_classes():
    gt = np.array([[0, 0, 255, 1], [1, 1, 255, 0]])
    pred = np.array([[0, 2, 1, 1], [1, 0, 2, 0]])
    cm = ConfusionMatrix(3)
    cm.update(pred, gt)
    # class 0: tp 2 (0,0),(1,3); fn 1 (0,1)->2; fp 1 (1,1) -> 2/4
    # class 1: tp 2 (0,3),(1,0); fn 1 (1,1)->0; fp 0 -> 2/3 ; class 2 absent from gt: None
    assert cm.iou() == [pytest.approx(0.5), pytest.approx(2 / 3), None]
    assert cm.miou() == pytest.approx((0.5 + 2 / 3) / 2)
    assert cm.summary()["pixels"] == 6


def test_prediction_of_ignore_counts_as_a_miss():
    cm = ConfusionMatrix(2)
    cm.update(np.array([255, 1, 1]), np.array([1, 1, 0]))
    assert cm.iou() == [0.0, pytest.approx(1 / 3)]


def test_bad_values_and_sizes_are_refused():
    cm = ConfusionMatrix(3)
    with pytest.raises(CpfcteError, match="differs from the ground truth"):
        cm.update(np.zeros((2, 2)), np.zeros((2, 3)), name="x.png")
    with pytest.raises(CpfcteError, match="ground truth holds label 7"):
        cm.update(np.zeros(2), np.array([0, 7]))
    with pytest.raises(CpfcteError, match="prediction holds label 5"):
        cm.update(np.array([0, 5]), np.zeros(2))


def _write_pair(pred_dir, gt_dir, name, pred, gt, palette_gt=True):
    save_label_png(pred_dir / f"{name}.png", np.asarray(pred, dtype=np.uint8), palette=True)
    save_label_png(gt_dir / f"{name}.png", np.asarray(gt, dtype=np.uint8), palette=palette_gt)


def test_evaluate_dirs_reads_palette_and_grayscale_pngs(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    _write_pair(pred, gt, "a", [[0, 1], [1, 1]], [[0, 1], [255, 1]], palette_gt=True)
    _write_pair(pred, gt, "b", [[0, 0], [2, 2]], [[0, 0], [2, 1]], palette_gt=False)
    r = evaluate_dirs(pred, gt, 3)
    # one matrix over both images: c0 tp 3; c1 tp 2, fn 1 -> 2/3; c2 tp 1, fp 1 -> 1/2
    assert r["images"] == 2
    assert r["iou"] == [pytest.approx(1.0), pytest.approx(2 / 3), pytest.approx(0.5)]


def test_evaluate_dirs_missing_files_and_self_scoring(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    _write_pair(pred, gt, "a", [[0]], [[0]])
    with pytest.raises(CpfcteError, match="prediction missing for image z"):
        evaluate_dirs(pred, gt, 2, ids=["a", "z"])
    save_label_png(pred / "b.png", np.zeros((1, 1), np.uint8))
    with pytest.raises(CpfcteError, match="ground truth missing"):
        evaluate_dirs(pred, gt, 2)
    with pytest.raises(CpfcteError, match="same"):
        evaluate_dirs(gt, gt, 2)
    aug = tmp_path / "VOC2012" / "SegmentationClassAug"
    save_label_png(aug / "a.png", np.zeros((1, 1), np.uint8))
    with pytest.raises(CpfcteError, match="ground-truth folder, so the score"):
        evaluate_dirs(aug, gt, 2, ids=["a"])
    with pytest.raises(CpfcteError, match="folder not found"):
        evaluate_dirs(tmp_path / "nope", gt, 2)


def test_rgb_masks_and_truncated_pngs_are_refused(tmp_path):
    from PIL import Image

    from cpfcte.machinery.io import read_label_png

    Image.new("RGB", (4, 4)).save(tmp_path / "rgb.png")
    with pytest.raises(CpfcteError, match="mode 'RGB'"):
        read_label_png(tmp_path / "rgb.png")
    save_label_png(tmp_path / "ok.png", np.zeros((32, 32), np.uint8))
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(CpfcteError, match="corrupt or truncated"):
        read_label_png(tmp_path / "cut.png")


def test_cli_eval_prints_json(tmp_path, capsys):
    from cpfcte.cli import main

    pred, gt = tmp_path / "pred", tmp_path / "gt"
    _write_pair(pred, gt, "a", [[0, 1], [1, 1]], [[0, 1], [1, 0]])
    main(["eval", "--pred", str(pred), "--gt", str(gt), "--num-classes", "3"])
    out = json.loads(capsys.readouterr().out)
    assert out["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert out["iou"][2] is None


def test_cli_errors_exit_2_with_the_file_named(tmp_path, capsys):
    from cpfcte.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["eval", "--pred", str(tmp_path / "p"), "--gt", str(tmp_path), "--num-classes", "3"])
    assert exc.value.code == 2
    assert f"{tmp_path / 'p'}: prediction folder not found" in capsys.readouterr().err


def test_average_precision_known_answers():
    from cpfcte.method.metrics import average_precision, label_map

    # ranked: +, -, +, -  → precisions at the positives 1/1 and 2/3 → AP = 5/6
    assert average_precision([0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0]) == pytest.approx(5 / 6)
    assert average_precision([0.9, 0.8], [0, 0]) is None
    # all tied: each positive sees the whole tie group → precision 2/4
    assert average_precision([0.5, 0.5, 0.5, 0.5], [1, 0, 1, 0]) == pytest.approx(0.5)
    p = np.array([[1, 0.9, 0.1], [1, 0.2, 0.8], [1, 0.6, 0.7]])
    y = np.array([[1, 1, 0], [1, 0, 1], [1, 1, 0]])
    # class 1: ranked 0.9(+) 0.6(+) 0.2(-) → 1; class 2: 0.8(+) 0.7(-) 0.1(-) → 1
    assert label_map(p, y) == pytest.approx(1.0)
    assert label_map(p, 1 - y) < 0.6


def test_a_bad_ignore_index_is_named_not_blamed_on_num_classes():
    import numpy as np
    import pytest

    from cpfcte.machinery.errors import CpfcteError
    from cpfcte.method.metrics import ConfusionMatrix

    with pytest.raises(CpfcteError, match=r"--ignore-index 3: must be in 11..255"):
        ConfusionMatrix(11, 3)
    cm = ConfusionMatrix(11, 254)
    gt = np.array([[1, 255]], np.uint8)
    with pytest.raises(CpfcteError, match="pass --ignore-index 255"):
        cm.update(np.array([[1, 1]], np.uint8), gt)
