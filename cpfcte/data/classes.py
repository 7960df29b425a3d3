"""Class lists. Index 0 is background, always present in an image label (note 4)."""

from __future__ import annotations

import colorsys

import numpy as np

from cpfcte.machinery.errors import CpfcteError

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

# The toy dataset's own classes: five colour families, two classes in each. The two classes of a
# family share body colours and textures and differ only by a small marker (a light dot or a dark
# bar), so the most discriminative patches of an object are few and the rest is ambiguous: the
# weak-supervision problem in miniature (see cpfcte.data.toy). The family hues are spread evenly
# round the colour wheel (72° apart): with red and amber 47° apart, as in the toy's first
# version, two families could stay confused long enough to push each other to the background.
TOY_FAMILIES: tuple[tuple[str, float], ...] = (
    ("ruby", 0.0), ("jade", 0.4), ("cobalt", 0.6), ("lime", 0.2), ("violet", 0.8),
)
TOY_MARKERS: tuple[str, ...] = ("dot", "bar")
TOY_CLASSES: tuple[str, ...] = ("background",) + tuple(
    f"{family}_{marker}" for family, _ in TOY_FAMILIES for marker in TOY_MARKERS)


# How the toy's classes are drawn: each family in its own hue (the hue of TOY_FAMILIES), the dot
# class bright and the bar class dark, so that a figure's colours say the names: ruby red, lime
# yellow-green, jade green, cobalt blue, violet purple.
TOY_TONES = {"dot": (0.75, 1.0), "bar": (1.0, 0.55)}      # (saturation, value)


def toy_palette() -> np.ndarray:
    """The toy's label colours (256 × 3 uint8): background black, each class in its family's
    hue (dot bright, bar dark), 255 (ignore) cream as in VOC's palette, the rest VOC's."""
    from cpfcte.machinery.io import voc_palette

    pal = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)
    hues = dict(TOY_FAMILIES)
    for i, name in enumerate(TOY_CLASSES[1:], start=1):
        family, marker = name.split("_")
        s, v = TOY_TONES[marker]
        pal[i] = np.round(255 * np.array(colorsys.hsv_to_rgb(hues[family], s, v)))
    return pal


def palette_for(classes) -> np.ndarray:
    """The colours label maps of these classes are drawn in (256 × 3 uint8): the toy's own for
    the toy's classes, VOC's for every other list (VOC, COCO, your own). Label PNGs on disk
    keep VOC's palette whatever the classes (``cpfcte.machinery.io.save_label_png``)."""
    from cpfcte.machinery.io import voc_palette

    if classes is not None and tuple(classes) == TOY_CLASSES:
        return toy_palette()
    return np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)


def class_legend(fig, classes, label_maps, palette=None, **kwargs) -> None:
    """A legend beside ``fig`` of the classes present in ``label_maps``, in their colours (255:
    ignored)."""
    from matplotlib.patches import Patch

    pal = palette_for(classes) if palette is None else palette
    present = sorted(set().union(*(np.unique(np.asarray(m)).tolist() for m in label_maps)))
    if not present:
        return
    names = list(classes or [])
    handles = [Patch(facecolor=pal[i] / 255.0, edgecolor="0.6", linewidth=0.5,
                     label="ignored (255)" if i == 255 else names[i] if i < len(names)
                     else f"class {i}") for i in present]
    fig.legend(handles=handles, loc=kwargs.pop("loc", "center left"),
               bbox_to_anchor=kwargs.pop("bbox_to_anchor", (1.0, 0.5)), fontsize=7,
               frameon=False, title="classes", title_fontsize=7, **kwargs)


def classes_for(dataset: str) -> tuple[str, ...]:
    if dataset in ("toy", "toy_coco"):  # toy_coco: the toy scenes through the COCO path
        return TOY_CLASSES
    if dataset == "voc":
        return VOC_CLASSES
    if dataset == "coco":
        from cpfcte.data.coco_classes import COCO_CLASSES  # added with the COCO data path

        return COCO_CLASSES
    raise CpfcteError(f"unknown dataset {dataset!r}: expected toy, toy_coco, voc or coco")
