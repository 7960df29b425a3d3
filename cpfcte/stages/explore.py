"""The patch-score explorer: what a stage-1 model looks at, image by image and class by class.

For one image of a split and one class: the per-class patch probabilities Z over the image
(Eq. 7, at the inference size), the top-k patches the pooling picks for the image score
(Eq. 8), the BPM (Eq. 10) and its dense-CRF refinement, for one run and, side by side, a second
(for example without the CF-BiLSTM). A background-bias slider adds a constant to the background
probability before the BPM's argmax: the BPM panels are redrawn with it, and the mIoU it would
give over the whole split is computed from the pseudo-label run's saved patch probabilities
(when one is given): how sensitive the pseudo labels are to it.
``explorer(...)`` builds the widgets (ipywidgets); the functions below it are what they call.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cpfcte.machinery.errors import CpfcteError


def biased_argmax(probs: np.ndarray, classes: np.ndarray, bias: float) -> np.ndarray:
    """Labels of (K, H, W) probabilities over ``classes`` (background first, index 0) with
    ``bias`` added to the background before the argmax."""
    scores = probs.copy()
    if len(classes) and classes[0] == 0:
        scores[0] += bias
    return classes[scores.argmax(axis=0)].astype(np.uint8)


def patch_view(model, cfg, voc, index: int, *, crf: bool = True) -> dict:
    """Everything the explorer shows of image ``index``: the image, its label classes, the patch
    probabilities (C, h, w) at the inference size, the pooled image scores, the top-k patch
    indices per class, the BPM and (with ``crf``) the CRF mask; from the walk-through's one
    pass (``cpfcte.stages.walkthrough.walk_image``)."""
    import torch

    from cpfcte.data.transforms import aligned
    from cpfcte.method.bpm import bpm_grid
    from cpfcte.stages.walkthrough import walk_image

    labels = voc.labels(index)
    w = walk_image(model, cfg, voc.image(index), labels, voc.ids[index], crf=crf)
    grid = w.z.T.reshape(len(w.classes), *w.grid)
    maps = bpm_grid(torch.from_numpy(grid)[None], torch.from_numpy(labels)[None], cfg.bpm_norm)
    up = torch.nn.functional.interpolate(maps, size=w.image.shape[:2], mode="bilinear",
                                         align_corners=aligned(cfg))[0].numpy()
    present = np.flatnonzero(labels)
    view = {"image": w.image, "labels": labels, "grid": grid, "pooled": w.p, "topk": w.topk,
            "bpm": w.bpm, "id": w.name, "bpm_probs": up[present], "present": present}
    if crf:
        view["crf"] = w.crf
    return view


def bias_miou(pseudo_run: str | Path, bias: float) -> float | None:
    """The BPM mIoU over the pseudo-label run's split with ``bias`` added to the background
    probability before the argmax, None without masks. It reads the run's saved patch
    probabilities, stored as float16 for the CRF, so at bias 0 it matches the run's BPM mIoU up
    to the pixels whose top two classes tie within that rounding (0.04 points on the test's
    barely trained model)."""

    from cpfcte.data import open_split
    from cpfcte.machinery.io import read_label_png
    from cpfcte.machinery.runfolder import RunFolder
    from cpfcte.method.crf import load_grid_probs, upsampled_probs
    from cpfcte.method.metrics import ConfusionMatrix

    folder = RunFolder(pseudo_run)
    cfg = folder.config()
    voc = open_split(cfg, cfg.pseudo_split)
    gt = voc.gt_dir_or_none()
    probs_dirs = sorted(folder.path.glob(f"probs_{voc.split}_*"))
    if gt is None or not probs_dirs:
        return None
    cm = ConfusionMatrix(len(voc.classes))
    for i, image_id in enumerate(voc.ids):
        grid, classes = load_grid_probs(probs_dirs[0] / f"{image_id}.npz")
        w, h = voc.image_size(i)
        probs = upsampled_probs(grid, (h, w), cfg.resize == "pcm")  # the image's classes
        cm.update(biased_argmax(probs, classes, bias), read_label_png(gt / f"{image_id}.png"),
                  image_id, gt_name=str(gt / f"{image_id}.png"))
    return cm.miou()


def figure(views: dict[str, dict], cls: int, classes: tuple[str, ...], bias: float = 0.0):
    """One row per run: the class's patch probabilities over the image with its top-k patches
    outlined (with a colour bar), the BPM with ``bias`` added to the background before its
    argmax, the CRF mask (made at bias 0); a legend of the classes shown."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from cpfcte.data.classes import class_legend, palette_for
    from cpfcte.machinery.io import colorize

    pal = palette_for(classes)
    fig, axes = plt.subplots(len(views), 3, figsize=(9.5, 3 * len(views)), squeeze=False)
    shown = []
    for row, (name, v) in zip(axes, views.items()):
        h, w = v["image"].shape[:2]
        gh, gw = v["grid"].shape[1:]
        row[0].imshow(v["image"])
        im = row[0].imshow(v["grid"][cls], cmap="magma", alpha=0.55, vmin=0, vmax=1,
                           extent=(0, w, h, 0), interpolation="nearest")
        fig.colorbar(im, ax=row[0], fraction=0.046, pad=0.02)
        for p in v["topk"][cls]:
            r, c = divmod(int(p), gw)
            row[0].add_patch(Rectangle((c * w / gw, r * h / gh), w / gw, h / gh, fill=False,
                                       edgecolor="cyan", lw=1.5))
        row[0].set_title(f"{name}: Z[{classes[cls]}], top-k (score {v['pooled'][cls]:.2f})",
                         fontsize=8)
        bpm = (biased_argmax(v["bpm_probs"], v["present"], bias)
               if bias and "bpm_probs" in v else v["bpm"])
        crf = v.get("crf", v["bpm"])
        shown += [bpm, crf]
        row[1].imshow(colorize(bpm, pal))
        row[1].set_title(f"BPM, background bias {bias:+.2f}" if bias else "BPM", fontsize=8)
        row[2].imshow(colorize(crf, pal))
        row[2].set_title(("BPM + CRF" + (" (at bias 0)" if bias else "")) if "crf" in v
                         else "BPM (no CRF)", fontsize=8)
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    class_legend(fig, classes, shown, pal)
    return fig


def explorer(runs: dict[str, str | Path], pseudo_run: str | Path | None = None,
             n_images: int = 30):
    """The widgets: image and class pickers, a background-bias slider with the split's mIoU
    at that bias, and the figure for every run in ``runs`` ({label: training run folder}).
    Returns the widget box; ``box.update()`` redraws (what a change of any picker does)."""
    import ipywidgets as W
    import matplotlib.pyplot as plt
    from IPython.display import display

    from cpfcte.data import open_split
    from cpfcte.stages.train import load_trained

    if not runs:
        raise CpfcteError("explorer: give at least one training run")
    models = {name: load_trained(path) for name, path in runs.items()}
    cfg = next(iter(models.values()))[1]
    voc = open_split(cfg, cfg.pseudo_split)
    image = W.Dropdown(options=[(voc.ids[i], i) for i in range(min(n_images, len(voc)))],
                       description="image")
    cls = W.Dropdown(description="class")
    bias = W.FloatSlider(value=0.0, min=-0.5, max=0.5, step=0.05, description="bg bias",
                         continuous_update=False)
    score = W.HTML()
    out = W.Output()
    cache: dict = {}

    def classes_of_image(*_):
        present = np.flatnonzero(voc.labels(image.value))
        options = [(voc.classes[c], int(c)) for c in present if c > 0] or [(voc.classes[0], 0)]
        cls.options = options
        cls.value = options[0][1]                      # the first of the image's classes

    def update(*_):
        key = image.value
        if key not in cache:
            cache.clear()
            cache[key] = {name: patch_view(m, c, voc, key) for name, (m, c) in models.items()}
        with out:
            out.clear_output(wait=True)
            fig = figure(cache[key], cls.value or 0, voc.classes, bias.value)
            display(fig)
            plt.close(fig)

    def update_bias(*_):
        if pseudo_run is None:
            score.value = ("the BPM panels follow the bias; the split's mIoU at each bias needs "
                           "a pseudo-label run: run notebook 03 (or <code>cpfcte pseudo "
                           "--run pseudo_full</code>) first")
            return
        m = bias_miou(pseudo_run, bias.value)
        score.value = ("split has no masks" if m is None else
                       f"BPM mIoU over {voc.split} at background bias {bias.value:+.2f}: "
                       f"<b>{100 * m:.1f}%</b>")

    image.observe(lambda ch: (classes_of_image(), update()), names="value")
    cls.observe(update, names="value")
    bias.observe(lambda ch: (update(), update_bias()), names="value")
    classes_of_image()
    update()
    update_bias()
    box = W.VBox([W.HBox([image, cls]), W.HBox([bias, score]), out])
    box.update, box.update_bias = update, update_bias
    return box
