"""Datasets: the toy generator, the VOC-layout reader (toy and real VOC), class lists."""

from __future__ import annotations

from pathlib import Path

from cpfcte.data.classes import TOY_CLASSES, VOC_CLASSES, classes_for  # noqa: F401
from cpfcte.errors import CpfcteError
from cpfcte.paths import data_dir, resolve

PREPARE_HINT = {
    "toy": "run `cpfcte data prepare toy` (or notebook 01) to generate it",
    "toy_coco": "run `cpfcte data prepare toy` (it writes the COCO twin and converts it)",
    "voc": "download and prepare PASCAL VOC 2012 + SBD (`cpfcte data download voc --to data`, "
           "`cpfcte data download sbd --to data`, `cpfcte data prepare voc`; README, Real data) "
           "or set data_root=/path/to/VOCdevkit/VOC2012",
    "folder": "prepare your folder with `cpfcte data prepare folder --images DIR --labels "
              "labels.csv --out DIR` and point data_root at DIR (README, Your own data)",
    "coco": "download and prepare MS COCO 2014 (`cpfcte data download coco --to data/coco2014`, "
            "`cpfcte data prepare coco`; README, Real data) or set data_root=/path/to/coco2014",
}


# the file each preparation writes last: a dataset without it is half prepared and refused
PREPARED = {"voc": "cpfcte_prepare_voc.json", "coco": "cpfcte_prepare_coco.json",
            "toy_coco": "cpfcte_prepare_coco.json", "folder": "cpfcte_prepare_folder.json"}


PREPARE_COMMAND = {"voc": "voc", "coco": "coco", "toy_coco": "toy", "folder": "folder …"}


def begin_preparation(out: Path, dataset: str, folders: tuple[str, ...]) -> None:
    """Start (or restart) preparing ``dataset`` into ``out``: its completion file goes first,
    so the tree is refused until ``finish_preparation``, and the temporary files a kill left in
    ``folders`` (relative to ``out``) are removed; the outputs already written are kept."""
    from cpfcte.io import clean_partial

    (out / PREPARED[dataset]).unlink(missing_ok=True)
    for sub in folders:
        clean_partial(out / sub)


def finish_preparation(out: Path, dataset: str, report: dict) -> None:
    """The last write of a preparation: its completion file, holding its ``report``."""
    from cpfcte.io import write_json

    write_json(out / PREPARED[dataset], report)


def dataset_root(cfg) -> Path:
    """The dataset folder of a config, checked to exist (a clear error says how to make it)."""
    from cpfcte.data.voc import require_root

    root = require_root(resolve(cfg.data_root, data_dir()),
                        hint=f"; {PREPARE_HINT.get(cfg.dataset, '')}")
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


def prepare_toy(root: str | Path | None = None, seed: int = 0, *, force: bool = False,
                progress: bool = True) -> Path:
    """Generate the toy dataset and convert its COCO twin through the COCO path."""
    from cpfcte.data.coco import prepare_coco
    from cpfcte.data.toy import ToySpec, generate

    from cpfcte.safety import check_folder

    root = Path(root) if root else data_dir() / "toy"
    check_folder(root, "data prepare toy", force=force)     # never replace a folder of yours
    generate(root, ToySpec(seed=seed), force=force, progress=progress)
    if force or not (root / "coco" / PREPARED["toy_coco"]).exists():
        prepare_coco(root / "coco", classes=TOY_CLASSES, known_counts=None, progress=progress)
    return root


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
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        fresh[rel] = {key: digest}
        total.update(f"{rel}\0{digest}\n".encode())
    if fresh != cache:
        try:
            from cpfcte.io import write_json

            write_json(cache_path, fresh)
        except OSError:   # a read-only dataset: no cache, same fingerprint
            pass
    return total.hexdigest()[:12]
