"""Datasets: the toy generator, the VOC-layout reader (toy, VOC+SBD, COCO converted, your own
folder), the preparations, and ViT-PCM's stage-1 transforms. The names most callers need are
here; each lives in the module named after it."""

from cpfcte.data.classes import TOY_CLASSES, VOC_CLASSES, classes_for, palette_for  # noqa: F401
from cpfcte.data.datasets import classes_of, dataset_root, dataset_stats, fingerprint, open_split  # noqa: F401
