"""Your own dataset: a folder of images and a CSV of image-level labels (optionally label PNGs,
for evaluation only), prepared into the VOC layout every reader uses.

    cpfcte data prepare folder --images DIR --labels labels.csv --out DIR [--masks DIR]
                               [--val-fraction 0.2 --seed 0 | --train-list F --val-list F]

The CSV has a header. Either ``image,labels`` and one row per image: its file name, then its
class names (in further columns, or in one column separated by spaces or ``;``), the classes
being every name used (sorted) unless ``--classes a,b,c`` fixes them; or ``image,<class 1>,...,
<class K>`` and one multi-hot row (0/1) per image. Background is class 0, always present; the
classes are written to ``classes.txt``. Images are linked (``JPEGImages/<stem>.jpg`` →
the original, any format PIL reads: it opens files by their content), labels written as VOC
XML, masks re-saved as palette PNGs after their values (0..K and 255) and sizes are checked.
Splits: ``val`` drawn by a seeded fraction (or given lists), ``train`` the rest;
``train_aug`` = ``train`` (the name stage 1 reads). Every error names the file and line.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from cpfcte.machinery.errors import CpfcteError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def read_label_csv(path: Path, classes: tuple[str, ...] | None = None
                   ) -> tuple[tuple[str, ...], list[tuple[int, str, list[str]]]]:
    """(classes without background, [(line, file name, class names)]) of a label CSV."""
    if not path.is_file():
        raise CpfcteError(f"{path}: label CSV not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [(i, [c.strip() for c in r]) for i, r in enumerate(csv.reader(f), start=1)
                    if any(c.strip() for c in r)]
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise CpfcteError(f"{path}:{line}: not UTF-8 (byte {e.object[e.start]:#04x}); save the "
                          "CSV as UTF-8 (a spreadsheet's 'CSV UTF-8' export, or `iconv -f "
                          "latin1 -t utf-8`)") from None
    if not rows:
        raise CpfcteError(f"{path}: empty label CSV; expected a header (image,labels or "
                          "image,<class>,...) and one row per image")
    (_, header), body = rows[0], rows[1:]
    if not body:
        raise CpfcteError(f"{path}: no image rows after the header")
    entries = []
    if len(header) >= 2 and header[1].lower() == "labels":
        for line, row in body:
            names = [n for cell in row[1:] for n in cell.replace(";", " ").split()]
            entries.append((line, row[0], names))
        used = sorted({n for _, _, names in entries for n in names})
        known = tuple(classes) if classes else tuple(used)
    else:
        known = tuple(header[1:])
        if classes and tuple(classes) != known:
            raise CpfcteError(f"{path}:1: header classes {list(known)} differ from --classes "
                              f"{list(classes)}")
        for line, row in body:
            if len(row) != len(header):
                raise CpfcteError(f"{path}:{line}: {len(row)} cells, the header has "
                                  f"{len(header)}")
            bad = [c for c in row[1:] if c not in ("0", "1")]
            if bad:
                raise CpfcteError(f"{path}:{line}: multi-hot cells must be 0 or 1, got {bad[0]!r}")
            entries.append((line, row[0], [k for k, c in zip(known, row[1:]) if c == "1"]))
    if not known:
        semicolons = len(header) == 1 and ";" in header[0]
        raise CpfcteError(f"{path}: no class names (header or rows)" + (
            "; its header is one cell with ';' in it: the file is separated by semicolons. "
            "Save it with commas (image,labels)" if semicolons else
            "; expected a header image,labels (then 'a.jpg,cat dog' rows) or image,<class>,..."))
    if "background" in known:
        raise CpfcteError(f"{path}: 'background' is class 0 already; do not list it")
    seen: dict[str, int] = {}
    for line, name, names in entries:
        if name in seen:
            raise CpfcteError(f"{path}:{line}: duplicate row for {name!r} (first on line "
                              f"{seen[name]})")
        seen[name] = line
        unknown = [n for n in names if n not in known]
        if unknown:
            raise CpfcteError(f"{path}:{line}: unknown class {unknown[0]!r} for {name!r}; the "
                              f"classes are {list(known)}")
        if not names:
            raise CpfcteError(f"{path}:{line}: {name!r} has no label; every training image needs "
                              "at least one class (weak supervision)")
    return known, entries


def _check_image(path: Path, where: str) -> tuple[int, int]:
    """The size of an image as it displays (EXIF orientation applied), after decoding it once:
    a missing, corrupt, too large or unreadable file is an error naming the CSV line."""
    from cpfcte.machinery.io import read_image

    if not path.is_file():
        raise CpfcteError(f"{where}: image {path} not found")
    try:
        return read_image(path).size
    except CpfcteError as e:
        raise CpfcteError(f"{where}: {e}") from None


def list_images(folder: Path) -> list[Path]:
    """The image files of a folder (by suffix), sorted; an error when there is none."""
    if not folder.is_dir():
        raise CpfcteError(f"{folder}: image folder not found")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CpfcteError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _read_list(path: Path) -> list[str]:
    from cpfcte.machinery.io import read_ids

    if not path.is_file():
        raise CpfcteError(f"{path}: split list not found")
    return [Path(x).stem for x in read_ids(path)]


# what a preparation writes into its --out folder (and replaces when it prepares it again)
OUTPUTS = ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets", "classes.txt")


def prepare_folder(images: str | Path, labels: str | Path, out: str | Path, *,
                   masks: str | Path | None = None, classes: tuple[str, ...] | None = None,
                   val_fraction: float = 0.2, seed: int = 0, train_list: str | Path | None = None,
                   val_list: str | Path | None = None, force: bool = False) -> dict:
    """Write the VOC layout of a folder of images with image-level labels; returns a report.
    ``out`` must be new or empty, or a folder this command prepared before (its outputs are then
    replaced: no mask of an earlier preparation stays), or ``force`` replaces them in a folder
    of yours; no output may overlap the inputs. Every check runs before the first write."""
    import shutil

    from cpfcte.data.preparation import begin_preparation, finish_preparation
    from cpfcte.data.voc import voc_xml
    from cpfcte.machinery.io import read_label_png, save_label_png, write_text
    from cpfcte.machinery.safety import (
        Outputs,
        check_folder,
        claim_folder,
        owner_of,
        refuse_alias,
        refuse_inside_dataset,
    )

    images, labels, out = Path(images), Path(labels), Path(out)
    if not images.is_dir():
        raise CpfcteError(f"{images}: image folder not found")
    if not 0 <= val_fraction < 1:
        raise CpfcteError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    by = "data prepare folder"
    refuse_alias([out / o for o in OUTPUTS] + [out],
                 [images, labels, Path(masks) if masks else None,
                  Path(train_list) if train_list else None,
                  Path(val_list) if val_list else None], f"cpfcte {by}")
    refuse_inside_dataset(out, "the prepared folder (--out)", own=by)
    check_folder(out, by, force=force)                 # before reading anything large
    known, entries = read_label_csv(labels, classes)
    all_classes = ("background",) + known
    stems: dict[str, int] = {}
    sizes = {}
    for line, name, _ in entries:
        where = f"{labels}:{line}"
        inside = (images / name).resolve()
        if Path(name).is_absolute() or ".." in Path(name).parts or \
                images.resolve() not in inside.parents:
            raise CpfcteError(f"{where}: {name!r} is not a file name inside --images {images}; "
                              "give names relative to that folder (a.jpg, sub/b.jpg)")
        stem = Path(name).stem
        if stem in stems:
            raise CpfcteError(f"{where}: {name!r} has the same stem as line {stems[stem]}")
        stems[stem] = line
        sizes[stem] = _check_image(images / name, where)
    mask_files = {}
    if masks is not None:
        masks = Path(masks)
        if not masks.is_dir():
            raise CpfcteError(f"{masks}: mask folder not found")
        for line, name, _ in entries:
            stem = Path(name).stem
            path = masks / f"{stem}.png"
            if not path.is_file():
                continue
            mask = read_label_png(path)
            w, h = sizes[stem]
            if mask.shape != (h, w):
                hint = (" (the image's EXIF orientation is applied: its size is as it "
                        "displays; a mask drawn on the stored, unrotated pixels has the "
                        "other shape)") if mask.shape == (w, h) else ""
                raise CpfcteError(f"{path}: mask is {mask.shape[1]}×{mask.shape[0]}, its image "
                                  f"{name} is {w}×{h}{hint}")
            bad = np.setdiff1d(np.unique(mask), np.r_[np.arange(len(all_classes)), 255])
            if bad.size:
                raise CpfcteError(f"{path}: values {bad.tolist()} outside 0..{len(known)} and "
                                  f"255 (classes: {list(all_classes)})")
            mask_files[stem] = mask
    listed = {Path(name).name for _, name, _ in entries}
    unlisted = [p.name for p in list_images(images) if p.name not in listed]
    if unlisted:
        raise CpfcteError(f"{labels}: no row for {len(unlisted)} image(s) of {images}, e.g. "
                          f"{unlisted[0]!r}; every image needs its labels (add a row, or move "
                          "the image out of the folder)")
    ids = [Path(name).stem for _, name, _ in entries]
    if train_list or val_list:
        if not (train_list and val_list):
            raise CpfcteError("--train-list and --val-list go together")
        train, val = _read_list(Path(train_list)), _read_list(Path(val_list))
        for lst, path in ((train, train_list), (val, val_list)):
            missing = [i for i in lst if i not in stems]
            if missing:
                raise CpfcteError(f"{path}: {missing[0]!r} is not in {labels}")
        overlap = set(train) & set(val)
        if overlap:
            raise CpfcteError(f"{val_list}: {sorted(overlap)[0]!r} is also in {train_list}")
    else:
        order = np.random.default_rng(seed).permutation(len(ids))
        n_val = int(round(val_fraction * len(ids)))
        val = sorted(ids[i] for i in order[:n_val])
        train = sorted(ids[i] for i in order[n_val:])
    if not train:
        raise CpfcteError(f"{labels}: no training image left (lower --val-fraction)")
    sets = out / "ImageSets" / "Segmentation"
    planned = ([f"JPEGImages/{i}.jpg" for i in ids] + [f"Annotations/{i}.xml" for i in ids]
               + [f"SegmentationClass/{i}.png" for i in ids if i in mask_files]
               + [f"ImageSets/Segmentation/{s}.txt" for s in ("train", "train_aug", "val")]
               + ["classes.txt"])
    written = Outputs(out, ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets"))
    legacy = owner_of(out) == by and not written.before    # ours, before records were kept
    strays = [] if legacy else [p for p in sorted((out / "SegmentationClass").glob("*.png"))
                                if p.stem in stems and p.stem not in mask_files
                                and f"SegmentationClass/{p.name}" not in written.before]
    if strays:
        raise CpfcteError(f"{strays[0]}: a mask this command did not write, for an image it "
                          "prepares without one; it would be read as that image's ground "
                          "truth. Nothing was written. Move it, or give another --out")
    claim_folder(out, by, force=force)                 # every check passed: the first write
    written.plan(planned)
    begin_preparation(out, "folder", ("Annotations", "SegmentationClass",
                                      "ImageSets/Segmentation", "."))
    if legacy:                 # a preparation of ours from before the record: all of it goes
        for name in OUTPUTS:
            target = out / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
    for (line, name, names), stem in zip(entries, ids):
        link = out / "JPEGImages" / f"{stem}.jpg"
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(os.path.relpath((images / name).resolve(), link.parent.resolve()), link)
        write_text(out / "Annotations" / f"{stem}.xml", voc_xml(name, sizes[stem], names))
        if stem in mask_files:
            save_label_png(out / "SegmentationClass" / f"{stem}.png", mask_files[stem],
                           palette=True)
    for split, lst in (("train", train), ("train_aug", train), ("val", val)):
        write_text(sets / f"{split}.txt", "".join(f"{i}\n" for i in lst))
    write_text(out / "classes.txt", "\n".join(all_classes) + "\n")
    report = {"root": str(out), "classes": list(all_classes),
              "counts": {"train": len(train), "val": len(val)}, "masks": len(mask_files),
              "images": str(images), "labels": str(labels),
              "split": ({"lists": [str(train_list), str(val_list)]} if train_list
                        else {"val_fraction": val_fraction, "seed": seed})}
    finish_preparation(out, "folder", report)
    written.finish()
    return report


def folder_classes(root: Path) -> tuple[str, ...]:
    """The classes of a prepared folder dataset (``classes.txt``, background first)."""
    path = Path(root) / "classes.txt"
    if not path.is_file():
        raise CpfcteError(f"{path}: not found; prepare the folder with `cpfcte data prepare "
                          "folder --images DIR --labels labels.csv --out DIR`")
    names = tuple(x.strip() for x in path.read_text().splitlines() if x.strip())
    if not names or names[0] != "background":
        raise CpfcteError(f"{path}: the first class must be 'background'")
    return names

