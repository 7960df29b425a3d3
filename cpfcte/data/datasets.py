"""The datasets of a config: where its folder is (checked to be whole), its classes, its splits
(``open_split``: the one place every reader opens data), their counts, and the content
fingerprint the provenance prints."""

from __future__ import annotations

from pathlib import Path

from cpfcte.data.classes import classes_for
from cpfcte.data.preparation import PREPARE_COMMAND, PREPARED
from cpfcte.machinery.errors import CpfcteError
from cpfcte.machinery.paths import data_dir, resolve

PREPARE_HINT = {
    "toy": "run `cpfcte data prepare toy` (or notebook 01) to generate it",
    "toy_coco": "run `cpfcte data prepare toy` (it writes the COCO twin and converts it)",
    "voc": "download and prepare PASCAL VOC 2012 + SBD (`cpfcte data download voc --to data`, "
           "`cpfcte data download sbd --to data`, `cpfcte data prepare voc`; docs/data.md) "
           "or set data_root=/path/to/VOCdevkit/VOC2012",
    "folder": "prepare your folder with `cpfcte data prepare folder --images DIR --labels "
              "labels.csv --out DIR` and point data_root at DIR (docs/data.md, Your own data)",
    "coco": "download and prepare MS COCO 2014 (`cpfcte data download coco --to data/coco2014`, "
            "`cpfcte data prepare coco`; docs/data.md) or set data_root=/path/to/coco2014",
}


def dataset_root(cfg) -> Path:
    """The dataset folder of a config, checked to exist (a clear error says how to make it)."""
    from cpfcte.data.voc import require_root

    where = resolve(cfg.data_root, data_dir())
    hint = PREPARE_HINT.get(cfg.dataset, "")
    if cfg.dataset == "toy" and where.resolve() != (data_dir() / "toy").resolve():
        hint = (f"data_root={cfg.data_root} is not the project's toy folder: fix data_root, or "
                f"generate the toy there (`cpfcte data prepare toy --root {where}`)")
    root = require_root(where, hint=f"; {hint}")
    marker = PREPARED.get(cfg.dataset)
    if marker and not (root / marker).is_file():
        raise CpfcteError(
            f"{root}: not completely prepared (no {marker}, the file `cpfcte data prepare` "
            f"writes last): a preparation was interrupted or never run; run `cpfcte data "
            f"prepare {PREPARE_COMMAND[cfg.dataset]}` again")
    return root


def classes_of(cfg) -> tuple[str, ...]:
    """The classes of a config's dataset, background first: fixed for toy, VOC and COCO; read
    from the prepared folder's ``classes.txt`` for your own dataset (``dataset: folder``)."""
    if cfg.dataset == "folder":
        from cpfcte.data.folder import folder_classes

        return folder_classes(dataset_root(cfg))
    return classes_for(cfg.dataset)


def open_split(cfg, split: str):
    """The images and image-level labels of one split of a config's dataset (a ``VOCDataset``;
    its ground truth, for evaluation only, is ``.gt_dir()``, ``None`` from ``.gt_dir_or_none()``
    where the dataset has no masks). Every reader opens data here."""
    from cpfcte.data.voc import VOCDataset

    return VOCDataset(dataset_root(cfg), split, classes_of(cfg))


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


FINGERPRINT_FOLDERS = ("JPEGImages", "Annotations", "SegmentationClass", "SegmentationClassAug",
                       "ImageSets")
FINGERPRINT_CACHE = ".cpfcte-fingerprint.json"


def fingerprint(root: str | Path) -> str:
    """A short hash of a dataset's content: every image, annotation, mask and split list, by
    path and bytes (never a file date or a generator's log), so two identical datasets have the
    same fingerprint on any machine. Hashes of unchanged files (same size and modification time)
    are cached in ``root/.cpfcte-fingerprint.json``, so a large dataset is read once."""
    import hashlib
    import json

    from cpfcte.machinery.io import sha256_file

    root = Path(root)
    cache_path = root / FINGERPRINT_CACHE
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    files, fresh = [], {}
    for folder in FINGERPRINT_FOLDERS:
        if (root / folder).is_dir():
            files += sorted(p for p in (root / folder).rglob("*") if p.is_file())
    total = hashlib.sha256()
    for path in files:
        rel = path.relative_to(root).as_posix()
        stat = path.stat()
        key = f"{stat.st_size}:{stat.st_mtime_ns}"
        digest = cache.get(rel, {}).get(key)
        if digest is None:
            digest = sha256_file(path)
        fresh[rel] = {key: digest}
        total.update(f"{rel}\0{digest}\n".encode())
    if fresh != cache:
        try:
            from cpfcte.machinery.io import write_json

            write_json(cache_path, fresh)
        except OSError:   # a read-only dataset: no cache, same fingerprint
            pass
    return total.hexdigest()[:12]
