"""Datasets: the toy generator, the VOC-layout reader (toy and real VOC), class lists."""

from __future__ import annotations

from pathlib import Path

from cpfcte.data.classes import TOY_CLASSES, VOC_CLASSES, classes_for  # noqa: F401
from cpfcte.errors import CpfcteError
from cpfcte.paths import data_dir, resolve

PREPARE_HINT = {
    "toy": "run `cpfcte data prepare toy` (or notebook 01) to generate it",
    "voc": "prepare PASCAL VOC 2012 + SBD there (see the README's Real data section), or set "
           "data_root=/path/to/VOCdevkit/VOC2012",
    "coco": "prepare MS COCO 2014 there (see the README's Real data section), or set "
            "data_root=/path/to/coco",
}


def dataset_root(cfg) -> Path:
    """The dataset folder of a config, checked to exist (a clear error says how to make it)."""
    from cpfcte.data.voc import require_root

    root = resolve(cfg.data_root, data_dir())
    return require_root(root, hint=f"; {PREPARE_HINT.get(cfg.dataset, '')}")


def dataset_stats(root: str | Path, classes: tuple[str, ...],
                  splits: tuple[str, ...] = ("train_aug", "train", "val")) -> dict:
    """Images per split and, per split, how many images carry each class (from the XML)."""
    from cpfcte.data.voc import VOCDataset

    out = {}
    for split in splits:
        voc = VOCDataset(root, split, classes)
        counts = voc.label_matrix().sum(axis=0).astype(int).tolist()
        out[split] = {"images": len(voc), "images_per_class": dict(zip(classes, counts))}
    return out
