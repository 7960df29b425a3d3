"""The patch-score explorer's computations, and its widgets without a browser."""

import numpy as np
import pytest


def test_biased_argmax_moves_pixels_to_background_by_hand():
    from cpfcte.stages.explore import biased_argmax

    probs = np.array([[[0.4, 0.2]], [[0.6, 0.8]]], np.float32)      # 2 classes, 1×2 image
    classes = np.array([0, 7])
    assert biased_argmax(probs, classes, 0.0).tolist() == [[7, 7]]
    assert biased_argmax(probs, classes, 0.25).tolist() == [[0, 7]]  # 0.65 > 0.6; 0.45 < 0.8
    assert biased_argmax(probs, classes, 0.7).tolist() == [[0, 0]]


@pytest.fixture(scope="module")
def trained(toy_root, tmp_path_factory):
    from conftest import TINY_MODEL

    from cpfcte.machinery.config import load_config
    from cpfcte.stages.pseudo_labels import pseudo_stage
    from cpfcte.stages.train import train

    tmp = tmp_path_factory.mktemp("explore")
    cfg = load_config("toy", {"data_root": str(toy_root), **TINY_MODEL, "epochs": 1,
                              "crf": {"workers": 1}})
    train(cfg, tmp / "t", progress=False)
    pseudo_stage(cfg, tmp / "t", tmp / "p", progress=False)
    return tmp


def test_bias_zero_reproduces_the_runs_bpm_and_a_large_bias_all_background(trained):
    from cpfcte.machinery.io import read_json
    from cpfcte.stages.explore import bias_miou

    m = read_json(trained / "p" / "metrics.json")
    # float16 storage of the probabilities flips a few near-tied pixels: within 0.5 points
    assert bias_miou(trained / "p", 0.0) == pytest.approx(m["miou"], abs=5e-3)
    assert bias_miou(trained / "p", 1.01) == pytest.approx(m["baselines"]["background"],
                                                          abs=1e-9)


def test_patch_view_and_the_widgets(trained):
    from cpfcte.data import open_split
    from cpfcte.stages.explore import explorer, patch_view
    from cpfcte.stages.train import load_trained

    model, cfg = load_trained(trained / "t")
    voc = open_split(cfg, cfg.pseudo_split)
    v = patch_view(model, cfg, voc, 0)
    c = len(voc.classes)
    assert v["grid"].shape == (c, 6, 6) and v["pooled"].shape == (c,)
    assert v["topk"].shape == (c, cfg.k) and v["bpm"].shape == v["crf"].shape == \
        v["image"].shape[:2]
    best = v["grid"].reshape(c, -1).argmax(1)
    assert (v["topk"][:, 0] == best).all()                # the first pick is the top patch
    present = set(np.flatnonzero(v["labels"]))
    assert set(np.unique(v["bpm"])) <= present and set(np.unique(v["crf"])) <= present
    box = explorer({"a": trained / "t", "b": trained / "t"}, trained / "p", n_images=3)
    image, cls = box.children[0].children
    bias, score = box.children[1].children
    assert "BPM mIoU over train at background bias +0.00" in score.value
    assert cls.value == cls.options[0][1] and cls.value > 0    # a class of the image, chosen
    bias.value = 0.2
    assert "+0.20" in score.value
    image.value = 2
    assert {o[1] for o in cls.options} <= set(np.flatnonzero(voc.labels(2)))
    assert cls.value == cls.options[0][1]
    # without a pseudo-label run the bias still redraws, and the line says what to run
    box = explorer({"a": trained / "t"}, None, n_images=2)
    assert "notebook 03" in box.children[1].children[1].value


def test_the_bias_redraws_the_bpm_panels(trained):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cpfcte.data import open_split
    from cpfcte.stages.explore import biased_argmax, figure, patch_view
    from cpfcte.stages.train import load_trained

    model, cfg = load_trained(trained / "t")
    voc = open_split(cfg, cfg.pseudo_split)
    v = patch_view(model, cfg, voc, 0)
    # at bias 0 the view's maps give the run's BPM; a bias of 1 leaves only background
    assert (biased_argmax(v["bpm_probs"], v["present"], 0.0) == v["bpm"]).mean() > 0.999
    assert (biased_argmax(v["bpm_probs"], v["present"], 1.01) == 0).all()
    images = []
    for bias in (0.0, 1.01):
        fig = figure({"a": v}, int(v["present"][-1]), voc.classes, bias)
        images.append(fig.axes[1].images[0].get_array().copy())
        assert fig.legends and "classes" in fig.legends[0].get_title().get_text()
        assert len(fig.axes) == 4                                  # 3 panels and a colour bar
        plt.close(fig)
    assert (images[1] == 0).all() and not (images[0] == 0).all()   # all background: black


class _Split:
    """One 32×32 image whose class 1 fills the top-left quadrant (patches (0..1, 0..1))."""

    classes = ("background", "a", "b")
    ids = ["img"]
    split = "train"

    def __init__(self, root):
        from cpfcte.machinery.io import save_label_png

        self.root = root
        (root / "gt").mkdir(exist_ok=True)
        gt = np.zeros((32, 32), np.uint8)
        gt[:16, :16] = 1
        save_label_png(root / "gt" / "img.png", gt)

    def __len__(self):
        return 1

    def labels(self, i):
        return np.array([1.0, 1.0, 0.0], np.float32)

    def gt_dir_or_none(self):
        return self.root / "gt"


def test_class_evidence_by_hand(tmp_path):
    """Known answers: a healthy class picks its object's patches; a collapsed one gives them to
    the background and takes its image score from background patches. The evidence is fed the
    pseudo-label stage's own patch probabilities (no second forward pass)."""
    from cpfcte.stages.evidence import ClassEvidence

    voc = _Split(tmp_path)
    obj = np.zeros((4, 4), bool)
    obj[:2, :2] = True
    healthy = np.where(obj, 0.9, 0.05)
    ev = ClassEvidence(voc, "topk", 2)
    ev.add(0, np.stack([1 - healthy, healthy, np.zeros((4, 4))]))
    (row,) = ev.rows()
    assert row["class"] == "a" and row["images"] == 1
    assert row["on_object"] == pytest.approx(0.9) and row["bg_on_object"] == pytest.approx(0.1)
    assert row["off_object"] == pytest.approx(0.05) and row["topk_on_object"] == 1.0
    collapsed = np.where(obj, 0.02, 0.0)
    collapsed[3, 2:] = 0.6                                    # two background patches
    ev = ClassEvidence(voc, "topk", 2)
    ev.add(0, np.stack([1 - collapsed, collapsed, np.zeros((4, 4))]))
    (row,) = ev.rows()
    assert row["topk_on_object"] == 0.0 and row["bg_on_object"] == pytest.approx(0.98)
    assert row["off_object"] == pytest.approx(1.2 / 12)
    # average pooling draws from every patch: 4 of the 16 lie on the object
    ev = ClassEvidence(voc, "gap", 2)
    ev.add(0, np.stack([1 - healthy, healthy, np.zeros((4, 4))]))
    assert ev.rows()[0]["topk_on_object"] == pytest.approx(4 / 16)


def test_class_evidence_resumes_from_its_saved_sums(tmp_path):
    from cpfcte.stages.evidence import ClassEvidence

    voc = _Split(tmp_path)
    z = np.stack([np.full((4, 4), 0.5), np.full((4, 4), 0.5), np.zeros((4, 4))])
    ev = ClassEvidence(voc, "topk", 2, tmp_path / "evidence.json")
    assert ev.wants(0)
    ev.add(0, z)
    ev.save()
    again = ClassEvidence(voc, "topk", 2, tmp_path / "evidence.json")
    assert not again.wants(0) and again.rows() == ev.rows()
    other = ClassEvidence(voc, "gmp", 1, tmp_path / "evidence.json")   # another pooling: anew
    assert other.wants(0)


def test_class_evidence_needs_masks(tmp_path):
    from cpfcte.machinery.errors import CpfcteError
    from cpfcte.stages.evidence import ClassEvidence

    voc = _Split(tmp_path)
    voc.gt_dir_or_none = lambda: None
    with pytest.raises(CpfcteError, match="no ground-truth masks"):
        ClassEvidence(voc, "topk", 2)


# ---- the method on one image (cpfcte.stages.walkthrough, notebook 09) ---------------------


def test_the_walk_shows_the_tensors_the_pseudo_label_stage_makes(trained):
    import torch

    from cpfcte.data import open_split
    from cpfcte.data.transforms import aligned, resized_input
    from cpfcte.method.bpm import bpm_from_probs, crf_start, patch_probs
    from cpfcte.method.crf import crf_labels
    from cpfcte.method.topk_pooling import pool
    from cpfcte.stages.pseudo_labels import infer_size_for
    from cpfcte.stages.train import load_trained
    from cpfcte.stages.walkthrough import walk

    w = walk(trained / "t", index=1)
    model, cfg = load_trained(trained / "t")
    voc = open_split(cfg, cfg.pseudo_split)       # the pseudo-label stage's calls, one by one
    assert cfg.pooling == "topk"
    image = np.asarray(voc.image(1), dtype=np.uint8)
    x = resized_input(voc.image(1), infer_size_for(cfg, model.patch_size[0]), cfg.resize)
    with torch.no_grad():
        grid = patch_probs(model, x[None])[0]                                 # (C, h, w)
    labels = torch.from_numpy(voc.labels(1))
    start = crf_start(grid, labels, image.shape[:2], norm=cfg.bpm_norm, params=cfg.crf)
    flat = grid.flatten(1).T                                                  # (s, C)
    v = {"grid": grid.numpy(), "pooled": pool(flat[None], cfg.pooling, cfg.k)[0].numpy(),
         "topk": flat.topk(cfg.k, dim=0).indices.T.numpy(), "labels": voc.labels(1),
         "bpm": bpm_from_probs(grid, labels, image.shape[:2], norm=cfg.bpm_norm,
                               align_corners=aligned(cfg)),
         "crf": crf_labels(image, *start, cfg.crf)}
    c, (h, gw), e = len(w.classes), w.grid, model.backbone.embed_dim
    s = h * gw
    assert (h, gw) == (6, 6) and w.x.shape == (48, 48, 3) and w.x.dtype == np.uint8
    assert w.patch_tokens.shape == (s, e) and w.f_in.shape == w.f_out.shape == (s, e + 8)
    assert w.assignment.shape == (s, c) and np.allclose(w.assignment.sum(1), 1, atol=1e-5)
    tokens = model.class_tokens.tokens.detach().numpy()          # Eq. 2: F_in = [P, A·T]
    assert np.allclose(w.f_in[:, :e], w.patch_tokens)
    assert np.allclose(w.f_in[:, e:], w.assignment @ tokens, atol=1e-5)
    assert w.z.shape == (s, c) and np.allclose(w.z.sum(1), 1, atol=1e-5)
    assert np.allclose(w.z.T.reshape(c, h, gw), v["grid"], atol=1e-6)   # the stage's own Z
    assert np.allclose(w.p, v["pooled"], atol=1e-6) and (w.topk == v["topk"]).all()
    kth = np.sort(w.z, axis=0)[::-1][: w.k].mean(0)                      # Eq. 8 by hand
    assert np.allclose(w.p, kth, atol=1e-6)
    assert (w.bpm == v["bpm"]).all() and (w.crf == v["crf"]).all()
    assert w.labels_from == "image-level labels" and (w.labels == v["labels"]).all()
    assert "| Z, patch class probabilities | Eq. 7 | 36 × " in w.shapes()
    assert torch.is_grad_enabled()                           # the no_grad ends with the walk


def test_a_photo_of_yours_walks_with_the_classes_p_keeps(trained, tmp_path):
    from PIL import Image

    from cpfcte.machinery.errors import CpfcteError
    from cpfcte.stages.walkthrough import walk

    rng = np.random.default_rng(0)
    photo = tmp_path / "mine.jpg"
    Image.fromarray(rng.integers(0, 255, (37, 53, 3), dtype=np.uint8)).save(photo)
    w = walk(trained / "t", photo=photo, threshold=0.3)
    assert w.image.shape == (37, 53, 3) and w.bpm.shape == w.crf.shape == (37, 53)
    kept = {0} | {int(i) for i in np.flatnonzero(w.p > 0.3)}       # background always
    assert set(w.present()) == kept and set(np.unique(w.bpm)) <= kept
    assert w.labels_from == "p > 0.3" and w.name == "mine.jpg"
    assert w.settings["threshold_chosen"] == "given" and "mine.jpg" in w.verdict()
    high = walk(trained / "t", photo=photo, threshold=0.99)
    assert high.present() == [0] and "no class passes p > 0.99" in high.verdict()
    auto = walk(trained / "t", photo=photo)                # the run's calibrated threshold
    assert auto.settings["threshold_chosen"].startswith("calibrated on")
    assert (trained / "t" / "threshold.json").is_file()
    with pytest.raises(CpfcteError, match="threshold 1.5"):
        walk(trained / "t", photo=photo, threshold=1.5)
    with pytest.raises(CpfcteError, match="index 999"):
        walk(trained / "t", index=999)
    with pytest.raises(CpfcteError, match="nothing.jpg"):
        walk(trained / "t", photo=tmp_path / "nothing.jpg")


def test_every_step_of_the_walk_draws(trained):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cpfcte import plots
    from cpfcte.stages.walkthrough import walk

    w = walk(trained / "t", index=0, crf=False)
    for fig in (plots.walk_input(w), plots.walk_tokens(w), plots.walk_assignment(w),
                plots.walk_z(w), plots.walk_topk(w), plots.walk_scores(w, 0.5),
                plots.walk_masks(w)):
        assert fig.axes
        plt.close(fig)
    assert len(plots.walk_tokens(w).axes) == 3 and len(plots.walk_masks(w).axes) == 2
    legend = plots.walk_masks(w).legends[0]                   # the classes the masks show
    shown = {t.get_text() for t in legend.get_texts()}
    assert shown == {w.classes[c] for c in np.unique(w.bpm)}
    z = plots.walk_z(w)                                       # the Z maps' colour bar
    assert any(ax.get_ylabel() == "Z (patch probability)" for ax in z.axes)
    plt.close("all")


def test_pca_rgb_by_hand():
    from cpfcte.plots import pca_rgb

    tokens = np.array([[0.0, 0.0], [2.0, 0.0], [4.0, 0.0], [6.0, 0.0]])    # one direction
    rgb = pca_rgb(tokens, (2, 2))
    assert rgb.shape == (2, 2, 3) and rgb.min() >= 0 and rgb.max() <= 1
    first = rgb[..., 0].ravel()
    assert np.allclose(first, [0, 1 / 3, 2 / 3, 1]) or np.allclose(first, [1, 2 / 3, 1 / 3, 0])
    assert np.allclose(rgb[..., 1:], 0)                      # no variance left: flat
