"""MS COCO 2014 → the VOC layout that ``cpfcte.data.voc`` reads (81 classes with background).

``cpfcte data prepare coco --coco-root DIR`` (DIR holds ``train2014/``, ``val2014/`` and
``annotations/instances_{train,val}2014.json``) writes, into DIR (or ``--out``):

* ``JPEGImages/<file stem>.jpg``: relative symbolic links to the COCO images (no copy);
* ``SegmentationClass/<stem>.png``: palette PNG masks, decoded with pycocotools, by these rules:
  - background is 0; the categories, sorted by their official id (1..90 with gaps), are
    remapped to 1..K in that order (``COCO_CLASSES``: person = 1 … toothbrush = 80);
  - crowd regions (``iscrowd: 1``, usually uncompressed RLE) are 255, ignored by evaluation;
  - instances are painted from the largest to the smallest decoded area, so where two overlap
    the smaller one is on top; instances are painted over crowd regions;
* ``Annotations/<stem>.xml``: the image-level labels (every annotated category, crowd included);
* ``ImageSets/Segmentation/{train,val}.txt``.

Kept images: those with at least one annotation, the usual WSSS choice: 82,081 of the 82,783
train images and 40,137 of the 40,504 val images; the counts are verified (``--allow-partial``
for subsets). The toy dataset's COCO twin (``cpfcte.data.toy``) goes through the same code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from cpfcte.data.preparation import begin_preparation, finish_preparation
from cpfcte.machinery.errors import CpfcteError
from cpfcte.machinery.io import IGNORE_INDEX, save_label_png, write_text

KNOWN_COUNTS = {"train": 82081, "val": 40137}
SPLITS = {"train": "train2014", "val": "val2014"}

def load_instances(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CpfcteError(f"{path}: COCO instances file not found; download the annotations "
                          "with `cpfcte data download coco --to DIR`") from None
    except json.JSONDecodeError as e:
        raise CpfcteError(f"{path}: malformed JSON ({e})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise CpfcteError(f"{path}: not a COCO instances file (no '{key}' list)")
    return data


def category_map(data: dict, classes: tuple[str, ...], source: Path) -> dict[int, int]:
    """Official category id → class index 1..K (sorted by id); the names must match."""
    cats = sorted(data["categories"], key=lambda c: c["id"])
    names = tuple(c["name"] for c in cats)
    if names != tuple(classes[1:]):
        diff = [f"{a!r}≠{b!r}" for a, b in zip(names, classes[1:]) if a != b][:3]
        raise CpfcteError(f"{source}: categories do not match the expected {len(classes) - 1} "
                          f"classes in id order ({len(names)} found; e.g. {diff})")
    return {c["id"]: i + 1 for i, c in enumerate(cats)}


def _coco(data: dict):
    import contextlib
    import io

    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
        coco.createIndex()
    return coco


def render_mask(coco, image: dict, cat_index: dict[int, int], source: Path) -> tuple[np.ndarray, list[int]]:
    """The class mask of one image and its label indices, by the rules of the module doc."""
    h, w = int(image["height"]), int(image["width"])
    mask = np.zeros((h, w), dtype=np.uint8)
    labels: set[int] = set()
    instances = []
    for ann in coco.imgToAnns.get(image["id"], []):
        if ann["category_id"] not in cat_index:
            raise CpfcteError(f"{source}: annotation {ann.get('id')} has unknown category id "
                              f"{ann['category_id']}")
        try:
            m = coco.annToMask(ann).astype(bool)
        except Exception as e:
            raise CpfcteError(f"{source}: annotation {ann.get('id')} of image {image['id']} "
                              f"cannot be decoded ({e})") from None
        if m.shape != (h, w):
            raise CpfcteError(f"{source}: annotation {ann.get('id')} decodes to {m.shape}, image "
                              f"{image['id']} is {(h, w)}")
        labels.add(cat_index[ann["category_id"]])
        if ann.get("iscrowd", 0):
            mask[m] = IGNORE_INDEX
        else:
            instances.append((int(m.sum()), int(ann.get("id", 0)), cat_index[ann["category_id"]], m))
    for _area, _id, cls, m in sorted(instances, key=lambda t: (-t[0], t[1])):
        mask[m] = cls
    return mask, sorted(labels)


def _xml(stem: str, image: dict, labels: list[int], classes: tuple[str, ...]) -> str:
    objects = "".join(f"\t<object>\n\t\t<name>{classes[c]}</name>\n\t</object>\n" for c in labels)
    return (f"<annotation>\n\t<folder>COCO</folder>\n\t<filename>{stem}.jpg</filename>\n"
            f"\t<size>\n\t\t<width>{image['width']}</width>\n\t\t<height>{image['height']}"
            f"</height>\n\t\t<depth>3</depth>\n\t</size>\n{objects}</annotation>\n")


def prepare_coco(coco_root: str | Path, out: str | Path | None = None, *,
                 classes: tuple[str, ...] | None = None, splits: dict[str, str] | None = None,
                 known_counts: dict[str, int] | None = KNOWN_COUNTS, allow_partial: bool = False,
                 progress: bool = True) -> dict:
    from cpfcte.data.coco_classes import COCO_CLASSES
    from cpfcte.machinery.progress import progress_bar

    coco_root = Path(coco_root)
    out = Path(out) if out else coco_root
    classes = classes or COCO_CLASSES
    splits = splits or SPLITS
    if not coco_root.is_dir():
        raise CpfcteError(f"{coco_root}: COCO folder not found; download it with "
                          "`cpfcte data download coco --to DIR`")
    begin_preparation(out, "coco", ("SegmentationClass", "Annotations", "ImageSets/Segmentation",
                                    "."))
    counts = {}
    for split, folder in splits.items():
        source = coco_root / "annotations" / f"instances_{folder}.json"
        data = load_instances(source)
        cat_index = category_map(data, classes, source)
        coco = _coco(data)
        keep = [img for img in data["images"] if coco.imgToAnns.get(img["id"])]
        if not keep:
            raise CpfcteError(f"{source}: no annotated image in split {split!r}")
        ids = []
        for image in progress_bar(keep, desc=f"COCO {split}", disable=not progress):
            stem = Path(image["file_name"]).stem
            src = coco_root / folder / image["file_name"]
            if not src.is_file():
                raise CpfcteError(f"{src}: image named by {source.name} not found; is the "
                                  f"{folder}.zip extracted into {coco_root}?")
            link = out / "JPEGImages" / f"{stem}.jpg"
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                os.symlink(os.path.relpath(src, link.parent), link)
            png = out / "SegmentationClass" / f"{stem}.png"
            xml = out / "Annotations" / f"{stem}.xml"
            if not (png.exists() and xml.exists()):
                mask, labels = render_mask(coco, image, cat_index, source)
                save_label_png(png, mask, palette=True)
                write_text(xml, _xml(stem, image, labels, classes))
            ids.append(stem)
        write_text(out / "ImageSets" / "Segmentation" / f"{split}.txt", "\n".join(ids) + "\n")
        counts[split] = len(ids)
    write_text(out / "classes.txt", "\n".join(classes) + "\n")
    report = {"counts": counts, "expected": known_counts, "root": str(out),
              "rules": "background 0; categories by id → 1..K; crowd → 255; smaller instance on "
                       "top; images with ≥ 1 annotation"}
    if known_counts:
        from cpfcte.data.prepare_voc import verify_counts

        verify_counts(counts, known_counts, allow_partial, "COCO 2014")
    finish_preparation(out, "coco", {**report, "allow_partial": allow_partial})
    return report
