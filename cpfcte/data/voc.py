"""One reader for the PASCAL VOC on-disk layout, shared by the toy dataset and real VOC 2012.

    <root>/JPEGImages/<id>.jpg
    <root>/Annotations/<id>.xml                    image-level labels come from here, never masks
    <root>/SegmentationClass/<id>.png              palette PNG, 255 = boundary/ignore (VOC's own)
    <root>/SegmentationClassAug/<id>.png           grayscale PNG (train_aug, from SBD)
    <root>/ImageSets/Segmentation/{train,val,trainval}.txt
    <root>/ImageSets/SegmentationAug/train_aug.txt

Masks are for evaluation only: ``VOCDataset`` gives images and image-level labels; the ground
truth folder of a split is given by ``gt_dir`` and read by ``cpfcte.method.metrics``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from cpfcte.machinery.errors import CpfcteError
from cpfcte.machinery.io import read_image

SPLIT_FOLDERS = ("ImageSets/Segmentation", "ImageSets/SegmentationAug")
GT_FOLDERS = ("SegmentationClass", "SegmentationClassAug")


def require_root(root: str | Path, hint: str = "") -> Path:
    root = Path(root)
    if not root.is_dir():
        raise CpfcteError(f"{root}: dataset folder not found{hint}")
    for sub in ("JPEGImages", "Annotations"):
        if not (root / sub).is_dir():
            raise CpfcteError(f"{root}: not a VOC-layout dataset (no {sub}/ folder){hint}")
    return root


def split_file(root: Path, split: str) -> Path:
    for folder in SPLIT_FOLDERS:
        path = root / folder / f"{split}.txt"
        if path.is_file():
            return path
    tried = ", ".join(f"{folder}/{split}.txt" for folder in SPLIT_FOLDERS)
    raise CpfcteError(f"{root}: no list for split {split!r} (looked for {tried})")


def read_split(root: str | Path, split: str) -> list[str]:
    path = split_file(Path(root), split)
    from cpfcte.machinery.io import read_ids

    ids = read_ids(path)
    if not ids:
        raise CpfcteError(f"{path}: split list is empty")
    return ids


def parse_annotation(path: Path, classes: tuple[str, ...]) -> list[str]:
    """The object class names listed in a VOC XML annotation (in file order, with repeats)."""
    if not path.is_file():
        raise CpfcteError(f"{path}: annotation not found; every image of a split needs its "
                          "Annotations/<id>.xml")
    try:
        tree = ET.parse(path)
    except ET.ParseError as e:
        raise CpfcteError(f"{path}: malformed XML ({e})") from None
    names = []
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in classes or name == classes[0]:
            raise CpfcteError(f"{path}: object class {name!r} is not one of this dataset's "
                              f"classes ({', '.join(classes[1:])})")
        names.append(name)
    return names


def voc_xml(filename: str, size: tuple[int, int], names: list[str]) -> str:
    """A VOC ``Annotations`` file naming the image's objects (names and file name escaped:
    a class ``R&D`` or a file ``tom & jerry.jpg`` stays valid XML)."""
    from xml.sax.saxutils import escape

    w, h = size
    filename = escape(filename)
    objs = "".join(f"\t<object>\n\t\t<name>{escape(n)}</name>\n\t\t<pose>Unspecified</pose>\n"
                   f"\t\t<truncated>0</truncated>\n\t\t<difficult>0</difficult>\n\t</object>\n"
                   for n in names)
    return (f"<annotation>\n\t<folder>VOC2012</folder>\n\t<filename>{filename}</filename>\n"
            f"\t<size>\n\t\t<width>{w}</width>\n\t\t<height>{h}</height>\n\t\t<depth>3</depth>\n"
            f"\t</size>\n\t<segmented>1</segmented>\n{objs}</annotation>\n")


def gt_dir(root: str | Path, split: str) -> Path:
    """Ground-truth mask folder for a split, for evaluation only: VOC's own SegmentationClass
    where it holds every image of the split, else SegmentationClassAug."""
    root = Path(root)
    ids = read_split(root, split)
    for folder in GT_FOLDERS:
        if all((root / folder / f"{i}.png").is_file() for i in ids):
            return root / folder
    raise CpfcteError(f"{root}: no ground-truth folder ({' or '.join(GT_FOLDERS)}) holds a mask "
                      f"for every image of split {split!r}")


class VOCDataset:
    """Images and image-level labels of one split. ``labels(i)`` is a float multi-hot vector of
    length C with background (index 0) always 1."""

    def __init__(self, root: str | Path, split: str, classes: tuple[str, ...]):
        self.root = require_root(root)
        self.split = split
        self.classes = tuple(classes)
        self.ids = read_split(self.root, split)

    def __len__(self) -> int:
        return len(self.ids)

    def gt_dir_or_none(self) -> Path | None:
        """The ground-truth folder, or None when the dataset has no masks for this split (your
        own dataset without ``--masks``): the stages then write no score ("no masks")."""
        try:
            return self.gt_dir()
        except CpfcteError:
            return None

    def gt_dir(self) -> Path:
        """The split's ground-truth folder: for evaluation only (``gt_dir``)."""
        return gt_dir(self.root, self.split)

    def image_path(self, index: int) -> Path:
        return self.root / "JPEGImages" / f"{self.ids[index]}.jpg"

    def image(self, index: int) -> Image.Image:
        return read_image(self.image_path(index))

    def image_size(self, index: int) -> tuple[int, int]:
        """(width, height) as the image displays, from its header, without decoding."""
        from cpfcte.machinery.io import image_size

        return image_size(self.image_path(index))

    def label_names(self, index: int) -> list[str]:
        return _annotation(self.root / "Annotations" / f"{self.ids[index]}.xml", self.classes)

    def labels(self, index: int) -> np.ndarray:
        vec = np.zeros(len(self.classes), dtype=np.float32)
        vec[0] = 1.0
        for name in self.label_names(index):
            vec[self.classes.index(name)] = 1.0
        return vec

    def label_matrix(self) -> np.ndarray:
        return np.stack([self.labels(i) for i in range(len(self))])


@lru_cache(maxsize=65536)
def _cached_annotation(path: str, mtime: float, classes: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(parse_annotation(Path(path), classes))


def _annotation(path: Path, classes: tuple[str, ...]) -> list[str]:
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        mtime = -1.0
    return list(_cached_annotation(str(path), mtime, classes))
