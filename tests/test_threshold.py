"""The image-level threshold a stage-1 run keeps a photo's classes at (cpfcte.stages.threshold),
and how its answers are drawn: the toy's palette, legends, overlays."""

import numpy as np
import pytest


def test_f1_curve_and_best_threshold_by_hand():
    from cpfcte.stages.threshold import best_threshold, f1_curve

    scores = np.array([[0.9, 0.3], [0.25, 0.1], [0.6, 0.05]])
    labels = np.array([[1, 1], [1, 0], [0, 0]])
    c = f1_curve(scores, labels, np.array([0.2, 0.5]))
    # t 0.2: kept 0.9, 0.3, 0.25, 0.6 → tp 3, fp 1, fn 0; t 0.5: kept 0.9, 0.6 → tp 1, fp 1, fn 2
    assert np.allclose(c["precision"], [3 / 4, 1 / 2]) and np.allclose(c["recall"], [1, 1 / 3])
    assert np.allclose(c["f1"], [6 / 7, 2 / 5])
    best = best_threshold(scores, labels)
    # p > t keeps the three true labels (0.9, 0.3, 0.25) and the false 0.6 but not the false
    # 0.1 for t in [0.10, 0.25): the best F1, 2·3/(2·3+1); the smallest such t of the grid
    assert best["threshold"] == 0.1 and best["f1"] == pytest.approx(6 / 7, abs=1e-4)
    assert best["at_0.5"]["recall"] == pytest.approx(1 / 3, abs=1e-4)


def test_a_number_is_used_as_given_and_bad_ones_are_refused(tmp_path):
    from cpfcte.machinery.errors import CpfcteError
    from cpfcte.stages.threshold import resolve_threshold

    assert resolve_threshold(tmp_path, 0.3) == (0.3, "given")
    assert resolve_threshold(tmp_path, "0.25") == (0.25, "given")
    for bad in (0, 1.5, "half"):
        with pytest.raises(CpfcteError, match="threshold"):
            resolve_threshold(tmp_path, bad)


def test_the_calibrated_threshold_is_written_once_and_named_in_the_description(tiny_cfg,
                                                                                tmp_path):
    from cpfcte.machinery.io import read_json
    from cpfcte.stages.threshold import calibrated_threshold, image_scores
    from cpfcte.stages.train import describe_model, train

    train(tiny_cfg(epochs=1), tmp_path / "t", progress=False)
    first = calibrated_threshold(tmp_path / "t", progress=False)
    saved = read_json(tmp_path / "t" / "threshold.json")
    assert saved == first and 0 < first["threshold"] < 1 and first["split"] == "train_aug"
    scores, labels, _ = image_scores(tmp_path / "t", progress=False)
    assert scores.shape == labels.shape and scores.min() >= 0 and scores.max() <= 1
    from cpfcte.stages.threshold import best_threshold

    assert best_threshold(scores[:, 1:], labels[:, 1:])["threshold"] == first["threshold"]
    (tmp_path / "t" / "threshold.json").write_text('{"threshold": 0.77, "digest": "x"}')
    assert calibrated_threshold(tmp_path / "t", progress=False) == first   # another digest
    line = describe_model(tmp_path / "t")
    assert "toy-profile" in line and "10 classes" in line and "only these synthetic" in line
    # predict takes the calibrated threshold by default, and its overlays come with a legend
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cpfcte.plots import prediction_overlays
    from cpfcte.stages.predict import predict_folder

    report = predict_folder(tmp_path / "t", None, tmp_path / "pred", limit=2, progress=False)
    assert report["threshold"] == first["threshold"]
    fig = prediction_overlays(report, 2)
    names = {t.get_text() for t in fig.legends[0].get_texts()}
    assert "background" in names and names <= set(report["classes"])
    plt.close(fig)


def test_the_toys_colours_follow_its_names_and_voc_keeps_its_palette():
    import colorsys

    from cpfcte.data import TOY_CLASSES, VOC_CLASSES, palette_for
    from cpfcte.machinery.io import voc_palette

    pal = palette_for(TOY_CLASSES)
    hue = {"ruby": 0.0, "lime": 0.2, "jade": 0.4, "cobalt": 0.6, "violet": 0.8}
    assert pal[0].tolist() == [0, 0, 0] and pal[255].tolist() == [224, 224, 192]
    for i, name in enumerate(TOY_CLASSES[1:], start=1):
        family, marker = name.split("_")
        h, s, v = colorsys.rgb_to_hsv(*(pal[i] / 255.0))
        assert min(abs(h - hue[family]), 1 - abs(h - hue[family])) < 0.02, name
        assert (v > 0.9) if marker == "dot" else (v < 0.6), name     # dot bright, bar dark
    assert len({tuple(c) for c in pal[:11]}) == 11
    voc = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)
    assert (palette_for(VOC_CLASSES) == voc).all() and (palette_for(None) == voc).all()


def test_overlays_outline_each_region_in_its_colour():
    from cpfcte.data import TOY_CLASSES, palette_for
    from cpfcte.stages.predict import overlay

    image = np.full((6, 6, 3), 100, np.uint8)
    labels = np.zeros((6, 6), np.uint8)
    labels[1:5, 1:5] = 2                                   # ruby_bar, dark red
    pal = palette_for(TOY_CLASSES)
    out = overlay(image, labels, palette=pal)
    assert (out[0] == 100).all() and (out[:, 0] == 100).all()       # background: the image
    assert (out[1, 1:5] == pal[2]).all() and (out[4, 1:5] == pal[2]).all()   # the edge, solid
    inside = (0.5 * 100 + 0.5 * pal[2].astype(float)).round()
    assert (out[2:4, 2:4] == inside).all()                          # the inside, half
