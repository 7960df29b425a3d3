"""Every picture the notebooks show, drawn once: masks side by side, per-class IoU bars, training
curves, the dataset overview and each step of the method on one image (``walk_*``, notebook
09). The stage notebooks (01-04) and the paper's figures (``cpfcte.report.figures``: Figs. 6
and 7 are these pictures) use the same functions.

Functions return matplotlib figures made with pyplot (they render inline in Jupyter); save one
with ``save_figure``, which writes atomically. Label maps are drawn in their dataset's palette
(``cpfcte.data.palette_for``: the toy's colours follow its class names, VOC's palette for VOC,
COCO and your own), 255 (the boundary band, COCO's crowd regions) in cream, with a legend of
the classes shown; probability maps get a colour bar.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cpfcte.data.classes import class_legend  # noqa: F401 (drawn beside every label map)
from cpfcte.machinery.io import atomic_path, colorize

IMAGE = "<image>"                 # a column of ``examples``: the image itself
GROUND_TRUTH = "<ground truth>"   # a column of ``examples``: the split's ground-truth mask
PAIR_COLOURS = ("#9e9e9e", "#d62728")


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Save ``fig`` to ``path`` (format from the suffix: png, pdf), atomically. A PDF carries no
    creation date, so the same figure gives the same bytes."""
    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    metadata = {"CreationDate": None} if fmt == "pdf" else None
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight", metadata=metadata)
    return path


def mask_grid(rows: list[tuple[str, list]], titles: list[str], classes=None):
    """A grid: one row per image (``(row name, panels)``), one column per title; H×W panels
    are label maps (in the palette of ``classes``, with a legend of those present), H×W×3
    panels images. No rows (``n_show = 0``): a small figure that says so."""
    import matplotlib.pyplot as plt

    from cpfcte.data import palette_for

    n, m = len(rows), len(titles)
    if n == 0:
        fig, ax = plt.subplots(figsize=(3.0, 0.5))
        ax.axis("off")
        ax.text(0.5, 0.5, "no images shown (n_show = 0)", ha="center", va="center", fontsize=9)
        return fig
    pal = palette_for(classes)
    fig, axes = plt.subplots(n, m, figsize=(1.9 * m, 1.9 * n), squeeze=False)
    maps = []
    for r, (name, panels) in enumerate(rows):
        for c, panel in enumerate(panels):
            arr = np.asarray(panel)
            if arr.ndim == 2:
                maps.append(arr)
            axes[r][c].imshow(colorize(arr, pal) if arr.ndim == 2 else arr,
                              interpolation="nearest")
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
            if r == 0:
                axes[r][c].set_title(titles[c], fontsize=9)
        axes[r][0].set_ylabel(name, fontsize=7)
    fig.tight_layout()
    class_legend(fig, classes, maps, pal)
    return fig


def examples(voc, columns: dict[str, str | Path], n: int = 4):
    """The first ``n`` images of a split (a ``VOCDataset``), one column per entry of
    ``columns`` (title → ``IMAGE``, ``GROUND_TRUTH`` or a folder of label PNGs named by image
    id); each row is named by the image id and its image-level labels."""
    from cpfcte.machinery.errors import CpfcteError
    from cpfcte.machinery.io import read_label_png

    if n < 0:
        raise CpfcteError(f"n_show={n}: the number of images to show must be ≥ 0")
    gt = voc.gt_dir() if GROUND_TRUTH in columns.values() else None
    rows = []
    for i in range(min(n, len(voc))):
        image_id = voc.ids[i]
        panels = []
        for source in columns.values():
            if source == IMAGE:
                panels.append(voc.image(i))
            else:
                folder = gt if source == GROUND_TRUTH else Path(source)
                panels.append(read_label_png(folder / f"{image_id}.png"))
        labels = ", ".join(dict.fromkeys(voc.label_names(i)))
        rows.append((f"{image_id}\n{labels[:40]}", panels))
    return mask_grid(rows, list(columns), voc.classes)


def stage_columns(metrics: dict) -> dict[str, str]:
    """The label-map folders of a stage's metrics.json, by title: BPM (+ CRF) of a pseudo-label
    run; DeepLabv2 (+ CRF) of a DeepLabv2 run."""
    if metrics.get("stage") == "deeplab":
        out = {"DeepLabv2": metrics["pred_dir"]}
        if metrics.get("crf_dir"):
            out["DeepLabv2 + CRF"] = metrics["crf_dir"]
        return out
    out = {"BPM": metrics["bpm_dir"]}
    if metrics.get("crf"):
        out["BPM + CRF"] = metrics["crf"]["crf_dir"]
    return out


def stage_examples(cfg, metrics: dict, n: int = 4):
    """Image, the stage's outputs and the ground truth for the first ``n`` images of the split
    a stage scored (``metrics``: its metrics.json)."""
    from cpfcte.data import open_split

    voc = open_split(cfg, metrics["split"])
    return examples(voc, {"image": IMAGE, **stage_columns(metrics),
                          "ground truth": GROUND_TRUTH}, n)


def per_class_iou(series: dict[str, list], classes: list[str], *, ylabel: str = "IoU (%)",
                  title: str | None = None, colours=None):
    """Grouped bars of per-class IoU (fractions, None = class absent from the ground truth),
    one group per class, one bar per series."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(classes)), 3.0))
    x = np.arange(len(classes))
    width = 0.8 / max(1, len(series))
    for j, (label, values) in enumerate(series.items()):
        heights = [0 if v is None or np.isnan(v) else 100 * v for v in values]
        kw = {"color": colours[j % len(colours)]} if colours else {}
        ax.bar(x + (j - (len(series) - 1) / 2) * width, heights, width=width, label=label, **kw)
    ax.set_xticks(x, classes, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def stage_iou(metrics: dict):
    """Per-class IoU of a stage's metrics.json: BPM and BPM + CRF of a pseudo-label run;
    DeepLabv2 without and with CRF of a DeepLabv2 run."""
    if metrics.get("stage") == "deeplab":
        series = {"DeepLabv2": metrics["no_crf"]["iou"]}
        if metrics.get("crf_dir"):
            series["DeepLabv2 + CRF"] = metrics["iou"]
        where = f"{metrics['split']}, segmentation"
    else:
        series = {"BPM": metrics["iou"]}
        if metrics.get("crf"):
            series["BPM + CRF"] = metrics["crf"]["iou"]
        where = f"{metrics['split']}, pseudo labels"
    return per_class_iou(series, metrics["classes"], ylabel=f"IoU (%), {where}")


def training_curves(run_dir: str | Path):
    """The training history of a run folder: MCE loss and the mAP of the image-level scores per
    epoch of a stage-1 run (grey: epochs with a frozen backbone), or the loss per checkpoint interval of a
    DeepLabv2 run."""
    import matplotlib.pyplot as plt

    from cpfcte.machinery.runfolder import RunFolder

    folder = RunFolder(run_dir)
    history = folder.summary()["history"]
    if folder.stage == "deeplab":
        fig, ax = plt.subplots(figsize=(4.5, 2.8))
        ax.plot([h["iteration"] for h in history], [h["loss"] for h in history], marker=".")
        ax.set_title("DeepLabv2: cross-entropy on the pseudo labels", fontsize=9)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        return fig
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(8, 2.8))
    axes[0].plot(epochs, [h["loss"] for h in history], marker=".")
    axes[0].set_title("MCE loss (Eq. 9)")
    axes[1].plot(epochs, [h.get("label_map", float("nan")) for h in history], marker=".",
                 color="C2")
    axes[1].set_title("image-label mAP")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    for h in history:
        if h.get("backbone_frozen"):
            for ax in axes:
                ax.axvspan(h["epoch"] - 0.5, h["epoch"] + 0.5, color="gray", alpha=0.1)
    fig.tight_layout()
    return fig


def mechanism_curves(run_dir: str | Path):
    """What the class tokens did in a stage-1 run, epoch by epoch (note 23;
    ``cpfcte.method.diagnostics``): the soft assignment's mean largest weight and entropy, the
    share of BPM labels the mean-token swap changes, and the rms of the two halves of F_in,
    each beside the line that separates alive tokens from a learned constant. None for a run
    without measurements (``diagnostic_images=0``)."""
    import matplotlib.pyplot as plt

    from cpfcte.machinery.runfolder import RunFolder
    from cpfcte.method.diagnostics import ALIVE_MAX_WEIGHT, ALIVE_SWAP

    history = [h for h in RunFolder(run_dir).summary()["history"] if "mechanisms" in h]
    if not history:
        return None
    epochs = [h["epoch"] for h in history]
    m = [h["mechanisms"] for h in history]
    fig, axes = plt.subplots(1, 4, figsize=(12, 2.8))
    if "max_weight" in m[0]:
        uniform = m[0]["uniform_weight"]
        axes[0].plot(epochs, [d["max_weight"] for d in m], marker=".", label="mean largest weight")
        axes[0].axhline(uniform, color="gray", ls=":", label=f"uniform (1/C = {uniform:.3f})")
        axes[0].axhline(ALIVE_MAX_WEIGHT * uniform, color="C3", ls="--",
                        label=f"alive above {ALIVE_MAX_WEIGHT:g}/C")
        axes[1].plot(epochs, [d["entropy"] for d in m], marker=".", color="C1",
                     label="entropy / ln C")
        axes[1].axhline(1.0, color="gray", ls=":", label="uniform")
    else:
        for ax in axes[:2]:
            ax.text(0.5, 0.5, f"no soft assignment\n(class_tokens={m[0]['class_tokens']})",
                    ha="center", va="center", transform=ax.transAxes, fontsize=8)
    axes[0].set_title("class-token assignment", fontsize=9)
    axes[1].set_title("its entropy (1: uniform)", fontsize=9)
    if "swap_changed" in m[0]:
        axes[2].plot(epochs, [100 * d["swap_changed"] for d in m], marker=".", color="C2",
                     label="BPM labels changed")
        axes[2].axhline(100 * ALIVE_SWAP, color="C3", ls="--",
                        label=f"alive above {100 * ALIVE_SWAP:g} %")
        axes[3].plot(epochs, [d["token_rms"] for d in m], marker=".", color="C4",
                     label="token half of F_in")
    axes[2].set_title("mean-token swap (%)", fontsize=9)
    axes[3].plot(epochs, [d["patch_rms"] for d in m], marker=".", color="C5",
                 label="patch half of F_in")
    axes[3].set_title("rms", fontsize=9)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def learning_curves(runs: dict[str, str | Path]):
    """Stage-1 learning curves of several runs side by side (e.g. every seed of a
    configuration): MCE loss and the mAP of the image-level scores per epoch."""
    import matplotlib.pyplot as plt

    from cpfcte.machinery.runfolder import RunFolder

    fig, axes = plt.subplots(1, 2, figsize=(8, 2.8))
    for label, run_dir in runs.items():
        history = RunFolder(run_dir).summary()["history"]
        epochs = [h["epoch"] for h in history]
        line, = axes[0].plot(epochs, [h["loss"] for h in history], marker=".", label=label)
        axes[1].plot(epochs, [h.get("label_map", float("nan")) for h in history], marker=".",
                     color=line.get_color())
    axes[0].set_title("MCE loss (Eq. 9)")
    axes[1].set_title("image-label mAP")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def evidence_map(runs: dict[str, dict]):
    """Per run (rows) and class (columns), the share of the top-k patches of the image score
    that lie on the class's objects (``explore.class_evidence``, in each pseudo-label run's
    ``metrics.json``). A collapsed class, whose image score comes from background patches,
    is a dark cell."""
    import matplotlib.pyplot as plt

    names = list(runs)
    classes = [r["class"] for r in next(iter(runs.values()))] if runs else []
    grid = np.array([[r["topk_on_object"] for r in runs[n]] for n in names]) if runs else \
        np.zeros((0, 0))
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * len(classes), 0.8 + 0.24 * len(names)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                color="white" if v < 0.5 else "black")
    fig.colorbar(im, ax=ax, label="top-k patches on the object")
    ax.set_title("where each class's image score comes from (Eq. 8)", fontsize=9)
    fig.tight_layout()
    return fig


def class_frequency(profile: str, images_per_class: dict[str, int], split: str):
    """How many images of ``split`` carry each foreground class (labels from the XML)."""
    import matplotlib.pyplot as plt

    names, counts = list(images_per_class)[1:], list(images_per_class.values())[1:]
    fig, ax = plt.subplots(figsize=(min(16, 2 + 0.25 * len(images_per_class)), 2.4))
    ax.bar(names, counts, color="C0")
    ax.set_ylabel(f"images ({split})")
    ax.set_title(f"{profile}: class frequency (image-level labels from the XML)", fontsize=10)
    ax.tick_params(axis="x", rotation=75, labelsize=7 if len(names) > 30 else 9)
    fig.tight_layout()
    return fig


def dataset_overview(profile: str, n_show: int = 6, split: str | None = None) -> dict | None:
    """Counts per split, the class-frequency plot and a grid of images with their ground-truth
    masks for the dataset of ``profile``; ``None`` when that dataset is not prepared here."""
    from cpfcte.data import dataset_root, dataset_stats, open_split
    from cpfcte.machinery.config import load_config
    from cpfcte.machinery.errors import CpfcteError

    cfg = load_config(profile)
    try:
        root = dataset_root(cfg)
    except CpfcteError:
        return None
    splits = tuple(dict.fromkeys((cfg.train_split, cfg.pseudo_split, cfg.val_split)))
    voc = open_split(cfg, split or cfg.val_split)
    stats = dataset_stats(root, voc.classes, splits)
    frequency = class_frequency(profile, stats[cfg.train_split]["images_per_class"],
                                cfg.train_split)
    grid = examples(voc, {"image": IMAGE, f"ground truth ({voc.gt_dir().name})": GROUND_TRUTH},
                    n_show)
    return {"root": str(root), "counts": {s: v["images"] for s, v in stats.items()},
            "stats": stats, "frequency": frequency, "grid": grid}


def prediction_overlays(report: dict, n: int = 4):
    """The overlays ``cpfcte predict`` wrote (``report``: its ``predict.json``), each titled
    with the classes its image scores kept (stage 1), with a legend of the classes in the
    label maps shown."""
    import matplotlib.pyplot as plt
    from PIL import Image

    from cpfcte.machinery.io import read_label_png

    files = sorted((Path(report["out"]) / "overlays").glob("*.jpg"))[:n]
    fig, axes = plt.subplots(1, max(len(files), 1), figsize=(3 * max(len(files), 1), 3),
                             squeeze=False)
    for ax, path in zip(axes[0], files):
        with Image.open(path) as im:
            ax.imshow(np.asarray(im))
        kept = (report.get("classes_kept") or {}).get(path.stem)
        ax.set_title(path.stem + (f": {', '.join(kept) or 'background only'}"
                                  if kept is not None else ""), fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    labels = [Path(report["out"]) / "labels" / f"{p.stem}.png" for p in files]
    class_legend(fig, report.get("classes"),
                 [read_label_png(p) for p in labels if p.is_file()])
    return fig


# ---- the method on one image (notebook 09; ``cpfcte.stages.walkthrough.Walk``) -------------


def pca_rgb(tokens: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Tokens (s, D) as an (h, w, 3) picture: their first three principal components over the
    image's patches, each stretched to [0, 1]. Similar tokens get similar colours."""
    centred = tokens - tokens.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    comps = centred @ vt[:3].T
    if comps.shape[1] < 3:
        comps = np.pad(comps, ((0, 0), (0, 3 - comps.shape[1])))
    lo, hi = comps.min(axis=0), comps.max(axis=0)
    rgb = (comps - lo) / np.where(hi > lo, hi - lo, 1.0)
    return rgb.reshape(*grid, 3)


def _grid_axes(n: int, per_row: int = 6, size: float = 2.0):
    import matplotlib.pyplot as plt

    cols = min(n, per_row)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows + 0.3),
                             squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def _shape(a) -> str:
    return " × ".join(str(d) for d in np.shape(a))


def walk_input(w):
    """The image and the network's input with its patch grid."""
    fig, (a, b) = _grid_axes(2, size=3.2)
    a.imshow(w.image)
    a.set_title(f"{w.name}: {_shape(w.image)}", fontsize=8)
    b.imshow(w.x)
    h, wd = w.grid
    side = w.x.shape[0]
    for i in range(1, h):
        b.axhline(i * side / h - 0.5, color="white", lw=0.4, alpha=0.6)
    for j in range(1, wd):
        b.axvline(j * side / wd - 0.5, color="white", lw=0.4, alpha=0.6)
    b.set_title(f"input x: {_shape(w.x)}, {h} × {wd} patches", fontsize=8)
    for ax in (a, b):
        ax.axis("off")
    fig.tight_layout()
    return fig


def walk_tokens(w, *names: str):
    """Token arrays of the walk (``patch_tokens``, ``f_in``, ``f_out``) as PCA pictures
    (``pca_rgb``), each titled with its shape."""
    titles = {"patch_tokens": "P", "f_in": "F_in", "f_out": "F_out"}
    names = names or tuple(n for n in titles if getattr(w, n) is not None)
    fig, axes = _grid_axes(len(names), size=2.8)
    for ax, name in zip(axes, names):
        tokens = getattr(w, name)
        ax.imshow(pca_rgb(tokens, w.grid), interpolation="nearest")
        ax.set_title(f"{titles.get(name, name)}: {_shape(tokens)} (PCA → RGB)", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    return fig


def walk_assignment(w):
    """The class-token assignment A (Eq. 2, note 1): each patch's strongest token and its
    weight, and the mean weight of each token over the image."""
    import matplotlib.pyplot as plt

    if w.assignment is None:
        raise ValueError(f"{w.name}: this run has no soft class-token assignment "
                         f"(class_tokens={w.settings.get('class_tokens')})")
    a = w.assignment
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.0), gridspec_kw={"width_ratios": [1, 1, 1.6]})
    axes[0].imshow(a.argmax(axis=1).reshape(w.grid), cmap="tab20", vmin=0, vmax=19,
                   interpolation="nearest")
    axes[0].set_title("strongest token per patch", fontsize=8)
    im = axes[1].imshow(a.max(axis=1).reshape(w.grid), cmap="viridis", vmin=0,
                        vmax=max(float(a.max()), 2 / a.shape[1]), interpolation="nearest")
    axes[1].set_title(f"its weight (uniform: 1/{a.shape[1]} = {1 / a.shape[1]:.2f})",
                      fontsize=8)
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    for ax in axes[:2]:
        ax.axis("off")
    axes[2].bar(np.arange(a.shape[1]), a.mean(axis=0), color=[
        plt.get_cmap("tab20")(i % 20) for i in range(a.shape[1])])
    axes[2].set_xticks(np.arange(a.shape[1]), [f"t{i}" for i in range(a.shape[1])],
                       fontsize=7, rotation=90)
    axes[2].set_title(f"A: {_shape(a)}, mean weight per token", fontsize=8)
    fig.tight_layout()
    return fig


def walk_z(w):
    """Z per class (Eq. 7) on the patch grid; the image's classes titled in bold."""
    c = len(w.classes)
    fig, axes = _grid_axes(c, per_row=7, size=1.6)
    present = set(w.present())
    im = None
    for i, ax in enumerate(axes):
        im = ax.imshow(w.z[:, i].reshape(w.grid), cmap="magma", vmin=0, vmax=1,
                       interpolation="nearest")
        ax.set_title(w.classes[i], fontsize=7, fontweight="bold" if i in present else "normal")
        ax.axis("off")
    fig.suptitle(f"Z: {_shape(w.z)}, one map per class (bold: the image's labels)", fontsize=8)
    fig.tight_layout()
    if im is not None:
        fig.colorbar(im, ax=list(axes), fraction=0.02, pad=0.02, label="Z (patch probability)")
    return fig


def walk_topk(w):
    """For each of the image's classes, its Z over the image with the k patches the pooling
    averages (Eq. 8) outlined."""
    from matplotlib.patches import Rectangle

    shown = w.present()
    fig, axes = _grid_axes(len(shown), per_row=4, size=2.6)
    gh, gw = w.grid
    h, wd = w.image.shape[:2]
    im = None
    for ax, c in zip(axes, shown):
        ax.imshow(w.image)
        im = ax.imshow(w.z[:, c].reshape(w.grid), cmap="magma", alpha=0.55, vmin=0, vmax=1,
                       extent=(0, wd, h, 0), interpolation="nearest")
        for idx in w.topk[c]:
            r, col = divmod(int(idx), gw)
            ax.add_patch(Rectangle((col * wd / gw, r * h / gh), wd / gw, h / gh, fill=False,
                                   edgecolor="cyan", lw=1.2))
        ax.set_title(f"{w.classes[c]}: top-{w.k}, p = {w.p[c]:.2f}", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    if im is not None:
        fig.colorbar(im, ax=list(axes), fraction=0.03, pad=0.02, label="Z of the class")
    return fig


def walk_scores(w, threshold: float | None = None):
    """p (Eq. 8), one bar per class; the image's classes coloured; the threshold a photo's
    classes are kept at, when given."""
    import matplotlib.pyplot as plt

    present = set(w.present())
    fig, ax = plt.subplots(figsize=(max(5, 0.4 * len(w.classes)), 2.6))
    ax.bar(np.arange(len(w.classes)), w.p,
           color=["#d62728" if i in present else "#9e9e9e" for i in range(len(w.classes))])
    if threshold is not None:
        ax.axhline(threshold, color="black", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(w.classes)), w.classes, rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_title(f"p: {_shape(w.p)} (red: {w.labels_from})", fontsize=8)
    fig.tight_layout()
    return fig


def walk_masks(w):
    """The image, the BPM (Eq. 10) and the BPM refined by the dense CRF, in the palette of the
    run's classes, with a legend."""
    from cpfcte.data import palette_for

    pal = palette_for(w.classes)
    maps = [w.bpm] + ([w.crf] if w.crf is not None else [])
    panels = [(f"{w.name}", w.image), (f"BPM: {_shape(w.bpm)}", colorize(w.bpm, pal))]
    if w.crf is not None:
        panels.append((f"BPM + CRF: {_shape(w.crf)}", colorize(w.crf, pal)))
    fig, axes = _grid_axes(len(panels), size=3.0)
    for ax, (title, img) in zip(axes, panels):
        ax.imshow(img)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    class_legend(fig, w.classes, maps, pal)
    return fig
