"""PASCAL VOC 2012 + SBD → the train_aug set used by every WSSS paper (Sec. 4.1).

``cpfcte data prepare voc --voc-root VOCdevkit/VOC2012 --sbd-root benchmark_RELEASE/dataset``

* train_aug = (SBD train ∪ SBD val ∪ VOC train) − VOC val: 10,582 images; VOC train 1,464 and
  VOC val 1,449 come from ``ImageSets/Segmentation``.
* ``SegmentationClassAug/<id>.png`` (grayscale, class indices, 255 = ignore) for every image of
  train_aug and val: VOC's own ``SegmentationClass`` mask where VOC has one (it carries the 255
  boundary band), else SBD's ``cls/<id>.mat`` (``GTcls.Segmentation``, 0..20, no band).
* ``ImageSets/SegmentationAug/train_aug.txt``. Image-level labels stay in ``Annotations/*.xml``.

The original ``SegmentationClass`` is never written to. Existing outputs are kept (the stage is
idempotent and resumes), each PNG is written atomically, and the counts are verified against
the known numbers (``--allow-partial`` accepts a subset, e.g. for a quick look).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cpfcte.data.classes import VOC_CLASSES
from cpfcte.data.preparation import begin_preparation, finish_preparation
from cpfcte.data.voc import parse_annotation, read_split
from cpfcte.machinery.errors import CpfcteError
from cpfcte.machinery.io import IGNORE_INDEX, read_label_png, save_label_png, write_text

KNOWN_COUNTS = {"train_aug": 10582, "train": 1464, "val": 1449}


def read_sbd_mat(path: Path) -> np.ndarray:
    """The class mask of an SBD ``cls/*.mat`` file: ``GTcls.Segmentation`` (H×W, 0..20)."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path))
    except FileNotFoundError:
        raise CpfcteError(f"{path}: SBD annotation not found") from None
    except Exception as e:
        raise CpfcteError(f"{path}: not a readable MATLAB file ({e})") from None
    try:
        gt = mat["GTcls"]
        seg = gt["Segmentation"].flat[0] if gt.dtype.names else gt.Segmentation
    except (KeyError, ValueError, AttributeError, IndexError):
        raise CpfcteError(f"{path}: no GTcls.Segmentation struct field; is this an SBD "
                          "cls/*.mat file?") from None
    seg = np.asarray(seg)
    if seg.ndim != 2:
        raise CpfcteError(f"{path}: GTcls.Segmentation has shape {seg.shape}, expected H×W")
    return seg


def _check_mask(mask: np.ndarray, image: Path, source: Path) -> np.ndarray:
    from cpfcte.machinery.io import image_size

    w, h = image_size(image)
    size = (h, w)
    if mask.shape != size:
        raise CpfcteError(f"{source}: mask is {mask.shape[1]}×{mask.shape[0]} but its image "
                          f"{image.name} is {size[1]}×{size[0]}")
    bad = (mask >= len(VOC_CLASSES)) & (mask != IGNORE_INDEX)
    if bad.any():
        raise CpfcteError(f"{source}: label {int(mask[bad].max())} ≥ {len(VOC_CLASSES)} classes "
                          "(VOC has 0..20 and 255)")
    return mask.astype(np.uint8)


def _require(path: Path, what: str, fix: str) -> Path:
    if not path.exists():
        raise CpfcteError(f"{path}: {what} not found; {fix}")
    return path


def prepare_voc(voc_root: str | Path, sbd_root: str | Path, out: str | Path | None = None, *,
                allow_partial: bool = False, progress: bool = True) -> dict:
    from cpfcte.machinery.progress import progress_bar

    voc_root, sbd_root = Path(voc_root), Path(sbd_root)
    get = "download it with `cpfcte data download voc --to DIR` (or by hand)"
    for sub in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Segmentation"):
        _require(voc_root / sub, f"VOC folder {sub}", f"--voc-root must be VOCdevkit/VOC2012; {get}")
    _require(sbd_root / "cls", "SBD folder cls", "--sbd-root must be benchmark_RELEASE/dataset; "
             "download it with `cpfcte data download sbd --to DIR`")
    out = Path(out) if out else voc_root
    begin_preparation(out, "voc", ("SegmentationClassAug", "ImageSets/SegmentationAug", "."))
    if out != voc_root:
        _link_voc(voc_root, out)
    voc_train = read_split(voc_root, "train")
    voc_val = read_split(voc_root, "val")
    sbd_ids: list[str] = []
    for name in ("train", "val"):
        sbd_ids += [ln.strip() for ln in _require(sbd_root / f"{name}.txt", f"SBD list {name}.txt",
                    "--sbd-root must be benchmark_RELEASE/dataset").read_text().splitlines()
                    if ln.strip()]
    val_set = set(voc_val)
    train_aug = sorted((set(sbd_ids) | set(voc_train)) - val_set)
    if not train_aug:
        raise CpfcteError(f"{sbd_root}: train_aug would be empty")
    for image_id in train_aug + voc_val:
        _require(voc_root / "JPEGImages" / f"{image_id}.jpg", "image",
                 "every SBD and VOC segmentation image must be in VOC2012 JPEGImages")
        parse_annotation(voc_root / "Annotations" / f"{image_id}.xml", VOC_CLASSES)

    aug_dir = out / "SegmentationClassAug"
    aug_dir.mkdir(parents=True, exist_ok=True)
    written = from_voc = from_sbd = 0
    for image_id in progress_bar(train_aug + voc_val, desc="SegmentationClassAug", disable=not progress):
        voc_mask = voc_root / "SegmentationClass" / f"{image_id}.png"
        target = aug_dir / f"{image_id}.png"
        if voc_mask.exists():
            from_voc += 1
            source, load = voc_mask, read_label_png
        else:
            from_sbd += 1
            source = sbd_root / "cls" / f"{image_id}.mat"
            if image_id in val_set:
                raise CpfcteError(f"{voc_mask}: VOC val image without its VOC mask")
            load = read_sbd_mat
        if target.exists():
            continue
        mask = _check_mask(load(source), voc_root / "JPEGImages" / f"{image_id}.jpg", source)
        save_label_png(target, mask, palette=False)
        written += 1
    write_text(out / "ImageSets" / "SegmentationAug" / "train_aug.txt", "\n".join(train_aug) + "\n")
    counts = {"train_aug": len(train_aug), "train": len(voc_train), "val": len(voc_val)}
    report = {"counts": counts, "expected": KNOWN_COUNTS, "masks_from_voc": from_voc,
              "masks_from_sbd": from_sbd, "written": written, "root": str(out)}
    verify_counts(counts, KNOWN_COUNTS, allow_partial, "VOC 2012 + SBD")
    finish_preparation(out, "voc", {**report, "allow_partial": allow_partial})
    return report


def verify_counts(counts: dict, expected: dict, allow_partial: bool, what: str) -> None:
    wrong = {k: (counts.get(k), v) for k, v in expected.items() if counts.get(k) != v}
    if wrong and not allow_partial:
        text = ", ".join(f"{k}: {got} (expected {want})" for k, (got, want) in wrong.items())
        raise CpfcteError(f"{what}: image counts differ from the standard split ({text}); a "
                          "download is incomplete or a list is wrong. --allow-partial accepts "
                          "a subset deliberately")


def _link_voc(voc_root: Path, out: Path) -> None:
    """Make ``out`` a VOC-layout root whose originals are links to ``voc_root``'s."""
    for sub in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Segmentation"):
        link = out / sub
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            os.symlink(os.path.relpath(voc_root / sub, link.parent), link)
