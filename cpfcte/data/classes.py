"""Class lists. Index 0 is background, always present in an image label (note 4)."""

from __future__ import annotations

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


def classes_for(dataset: str) -> tuple[str, ...]:
    if dataset in ("toy", "toy_coco"):  # toy_coco: the toy scenes through the COCO path
        return TOY_CLASSES
    if dataset == "voc":
        return VOC_CLASSES
    if dataset == "coco":
        from cpfcte.data.coco_classes import COCO_CLASSES  # added with the COCO data path

        return COCO_CLASSES
    raise CpfcteError(f"unknown dataset {dataset!r}: expected toy, toy_coco, voc or coco")
