"""Small datasets in the exact formats of the real downloads, for the paper-scale smoke
(``cpfcte.batch.smoke``): a VOC 2012 + SBD tree and a COCO 2014 tree that ``cpfcte data prepare
voc|coco`` turns into the layout the readers use, as it does the real ones.

- VOC: VOC-sized JPEGs (500×375 and 375×500), ``Annotations/*.xml`` with the 20 VOC class
  names, ``SegmentationClass/*.png`` palette PNGs with the 255 border around every object,
  ``ImageSets/Segmentation/{train,val}.txt``; SBD: ``cls/*.mat`` (the ``GTcls`` struct with
  ``Segmentation``, ``Boundaries`` and ``CategoriesPresent``, as scipy writes MATLAB v5) and
  ``{train,val}.txt``, one SBD image also in VOC val (left out of train_aug by the union rule).
- COCO: ``train2014/`` and ``val2014/`` JPEGs named ``COCO_<split>2014_<12 digits>.jpg``,
  ``annotations/instances_<split>2014.json`` with the 80 categories at their official ids,
  polygon and uncompressed-RLE instances, and a crowd region.
(kazuto1011's COCO-pretrained DeepLabv2 init in his format is
``cpfcte.method.caffe_resnet.write_checkpoint``.)

The pictures are coloured shapes on a textured background (one colour per class), so the masks
and the labels agree; what the networks learn from eight of them is beside the point.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cpfcte.data.classes import VOC_CLASSES
from cpfcte.data.coco_classes import COCO_CLASSES
from cpfcte.data.voc import voc_xml

# the official COCO category ids of the 80 thing classes (1..90 with gaps), in COCO_CLASSES order
COCO_CATEGORY_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22,
                     23, 24, 25, 27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44,
                     46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64,
                     65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88,
                     89, 90)
VOC_SIZES = ((500, 375), (375, 500))          # (width, height) of VOC's common landscape/portrait


def _picture(rng: np.random.Generator, w: int, h: int, objects: list[tuple[int, np.ndarray]],
             n_classes: int) -> np.ndarray:
    """An RGB picture: noise background, each object's mask filled with its class's hue."""
    import colorsys

    img = rng.integers(60, 120, size=(h, w, 3), dtype=np.uint8)
    for cls, mask in objects:
        r, g, b = colorsys.hsv_to_rgb(cls / n_classes, 0.8, 0.9)
        img[mask] = np.clip(np.array([r, g, b]) * 255 + rng.normal(0, 8, (mask.sum(), 3)), 0, 255)
    return img


def _shapes(rng: np.random.Generator, w: int, h: int, classes: list[int]) -> list[tuple[int, np.ndarray]]:
    """One rectangle or ellipse per class, a fifth to a half of the image's side."""
    yy, xx = np.mgrid[:h, :w]
    out = []
    for cls in classes:
        bw, bh = rng.integers(w // 5, w // 2), rng.integers(h // 5, h // 2)
        x0, y0 = rng.integers(0, w - bw), rng.integers(0, h - bh)
        if rng.random() < 0.5:
            mask = (xx >= x0) & (xx < x0 + bw) & (yy >= y0) & (yy < y0 + bh)
        else:
            cx, cy = x0 + bw / 2, y0 + bh / 2
            mask = ((xx - cx) / (bw / 2)) ** 2 + ((yy - cy) / (bh / 2)) ** 2 <= 1
        out.append((cls, mask))
    return out


def _border(mask: np.ndarray, width: int = 3) -> np.ndarray:
    """The band of ``width`` pixels along the outline of ``mask`` (VOC's 255 'void' border)."""
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=width) & ~ndimage.binary_erosion(
        mask, iterations=width)


def write_sbd_mat(path: Path, seg: np.ndarray) -> None:
    """An SBD ``cls/<id>.mat``: the ``GTcls`` struct as SBD's MATLAB files hold it."""
    import scipy.io

    path.parent.mkdir(parents=True, exist_ok=True)
    boundaries = np.empty((20, 1), dtype=object)
    for i in range(20):
        boundaries[i, 0] = np.zeros((1, 1))
    scipy.io.savemat(path, {"GTcls": {"Boundaries": boundaries, "Segmentation": seg,
                                      "CategoriesPresent": np.unique(seg[seg > 0])[None]}})


def make_voc_sbd(root: str | Path, n: int = 8, seed: int = 0) -> tuple[Path, Path]:
    """Write ``root/VOCdevkit/VOC2012`` and ``root/benchmark_RELEASE/dataset`` with ``n`` images:
    VOC train = the first half, VOC val = the next quarter (at least 1); SBD train = image 0 and
    the last quarter, SBD val = the first VOC val image (so train_aug = VOC train + the last
    quarter). Returns (voc_root, sbd_root)."""
    from PIL import Image

    from cpfcte.machinery.io import save_label_png

    rng = np.random.default_rng(seed)
    root = Path(root)
    voc, sbd = root / "VOCdevkit" / "VOC2012", root / "benchmark_RELEASE" / "dataset"
    ids = [f"2008_{i + 1:06d}" for i in range(n)]
    n_train, n_val = n // 2, max(1, n // 4)
    train, val, extra = ids[:n_train], ids[n_train:n_train + n_val], ids[n_train + n_val:]
    for i, image_id in enumerate(ids):
        w, h = VOC_SIZES[i % 2]
        classes = sorted(rng.choice(np.arange(1, 21), size=int(rng.integers(1, 3)),
                                    replace=False).tolist())
        objects = _shapes(rng, w, h, classes)
        (voc / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.fromarray(_picture(rng, w, h, objects, 21)).save(
            voc / "JPEGImages" / f"{image_id}.jpg", quality=90)
        (voc / "Annotations").mkdir(parents=True, exist_ok=True)
        (voc / "Annotations" / f"{image_id}.xml").write_text(
            voc_xml(f"{image_id}.jpg", (w, h), [VOC_CLASSES[c] for c in classes]))
        seg = np.zeros((h, w), np.uint8)
        for cls, mask in objects:
            seg[mask] = cls
        if image_id in train or image_id in val:
            voc_mask = seg.copy()
            for _, mask in objects:
                voc_mask[_border(mask)] = 255
            save_label_png(voc / "SegmentationClass" / f"{image_id}.png", voc_mask, palette=True)
        if image_id == ids[0] or image_id in extra or image_id == val[0]:
            write_sbd_mat(sbd / "cls" / f"{image_id}.mat", seg)
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (sets / "val.txt").write_text("".join(f"{i}\n" for i in val))
    (sbd / "train.txt").write_text("".join(f"{i}\n" for i in [ids[0], *extra]))
    (sbd / "val.txt").write_text(f"{val[0]}\n")
    return voc, sbd


def _polygon(mask: np.ndarray) -> list[list[float]]:
    from cpfcte.data.toy import mask_polygons

    return mask_polygons(mask)


def make_coco(root: str | Path, n_train: int = 4, n_val: int = 2, seed: int = 0) -> Path:
    """Write a COCO 2014 tree at ``root`` (``train2014/``, ``val2014/``, ``annotations/``):
    VOC-sized images with 1–2 instances each, polygons for the first instance of an image, an
    uncompressed RLE for the second, and on the first image of each split a crowd region.
    Returns ``root``."""
    from PIL import Image

    from cpfcte.data.toy import rle_uncompressed

    rng = np.random.default_rng(seed)
    root = Path(root)
    categories = [{"id": cid, "name": name, "supercategory": "thing"}
                  for cid, name in zip(COCO_CATEGORY_IDS, COCO_CLASSES[1:])]
    ann_id = 1
    for split, count in (("train", n_train), ("val", n_val)):
        folder = root / f"{split}2014"
        folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            image_id = 100 * (split == "val") + i + 1
            w, h = VOC_SIZES[i % 2]
            classes = sorted(rng.choice(np.arange(1, 81), size=int(rng.integers(1, 3)),
                                        replace=False).tolist())
            objects = _shapes(rng, w, h, classes)
            name = f"COCO_{split}2014_{image_id:012d}.jpg"
            Image.fromarray(_picture(rng, w, h, objects, 81)).save(folder / name, quality=90)
            images.append({"id": image_id, "file_name": name, "height": h, "width": w})
            for j, (cls, mask) in enumerate(objects):
                ys, xs = np.nonzero(mask)
                seg = _polygon(mask) if j == 0 else rle_uncompressed(mask)
                annotations.append({
                    "id": ann_id, "image_id": image_id, "category_id": COCO_CATEGORY_IDS[cls - 1],
                    "iscrowd": 0, "area": float(mask.sum()), "segmentation": seg,
                    "bbox": [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1),
                             float(np.ptp(ys) + 1)]})
                ann_id += 1
            if i == 0:                             # a crowd of persons in the top-left corner
                crowd = np.zeros((h, w), bool)
                crowd[: h // 6, : w // 6] = True
                annotations.append({
                    "id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 1,
                    "area": float(crowd.sum()), "segmentation": rle_uncompressed(crowd),
                    "bbox": [0.0, 0.0, float(w // 6), float(h // 6)]})
                ann_id += 1
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(
            {"info": {"description": "cpfcte smoke fixture"}, "images": images,
             "annotations": annotations, "categories": categories}))
    return root
