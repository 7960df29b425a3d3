"""The PASCAL VOC evaluation server's submission: segmentation results for the test images.

    cpfcte export voc-test --pred DIR --out FILE.tar.gz [--list test.txt] [--images DIR]

packs ``results/VOC2012/Segmentation/comp6_test_cls/<id>.png`` (comp6: trained on data other
than VOC's own segmentation annotations, as weakly supervised methods are) and refuses, before
writing anything, what the server would reject: an id of the test list without a PNG, a PNG
that is not a palette ("P") image, values outside 0..20, and, with ``--images``, a PNG whose
size differs from its image. The test list defaults to VOC 2012 test's
``ImageSets/Segmentation/test.txt`` under the voc profile's data root.

    cpfcte export voc-test --check FILE.tar.gz [--list test.txt] [--images DIR]

checks an archive before upload, whoever made it: the layout (every member a file under
``results/VOC2012/Segmentation/comp6_test_cls/``), palette PNGs with values in 0..20, the ids
against the test list (or, without one, the count against VOC 2012 test's 1,456 images) and,
with ``--images``, each size against its JPEG.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np

from cpfcte.machinery.errors import CpfcteError

SERVER_DIR = "results/VOC2012/Segmentation/comp6_test_cls"
NUM_CLASSES = 21
OFFICIAL_TEST_IMAGES = 1456      # VOC 2012 test, ImageSets/Segmentation/test.txt


def check_prediction(path: Path, image: Path | None = None) -> None:
    """Refuse one PNG the server would reject, naming it."""
    _check_png(path, path, image)


def _check_png(source, path: Path, image: Path | None) -> None:
    from PIL import Image

    with Image.open(source) as im:
        if im.mode != "P":
            raise CpfcteError(f"{path}: a {im.mode} PNG; the server takes palette PNGs (write "
                              "them with cpfcte predict, or cpfcte.machinery.io.save_label_png)")
        values = np.unique(np.asarray(im))
        size = im.size
    bad = values[values >= NUM_CLASSES]
    if bad.size:
        raise CpfcteError(f"{path}: values {bad.tolist()} outside 0..{NUM_CLASSES - 1} (the "
                          "server scores the 20 VOC classes and background; no 255)")
    if image is not None:
        from cpfcte.machinery.io import image_size

        shown = image_size(image)
        if shown != size:
            raise CpfcteError(f"{path}: {size[0]}×{size[1]}, its image {image.name} is "
                              f"{shown[0]}×{shown[1]} (as it displays: EXIF orientation "
                              "applied)")


def export_voc_test(pred: str | Path, out: str | Path, test_list: str | Path,
                    images: str | Path | None = None, force: bool = False) -> dict:
    """Check every prediction of the test list, then write the tar.gz atomically. An id that
    is not a plain file name (``../x``, ``a/b``) or comes twice is refused, and so is an
    existing archive without ``force``."""
    from cpfcte.machinery.io import atomic_path, read_ids

    pred, out, test_list = Path(pred), Path(out), Path(test_list)
    if not test_list.is_file():
        raise CpfcteError(f"{test_list}: test list not found; pass --list "
                          "VOC2012/ImageSets/Segmentation/test.txt")
    ids = read_ids(test_list)
    if not ids:
        raise CpfcteError(f"{test_list}: empty test list")
    for line, i in enumerate(ids, start=1):
        if Path(i).name != i or i in (".", "..") or "\\" in i:
            raise CpfcteError(f"{test_list}: id {i!r} is not a plain image id (it would leave "
                              "the prediction folder and the archive's folder); fix the list")
    seen: dict[str, int] = {}
    for n, i in enumerate(ids, start=1):
        if i in seen:
            raise CpfcteError(f"{test_list}: id {i!r} appears twice (entries {seen[i]} and "
                              f"{n}); the archive would hold it twice")
        seen[i] = n
    if out.exists() and not force:
        raise CpfcteError(f"{out}: exists; nothing was written. Give another file name, or "
                          "--force to replace it")
    missing = [i for i in ids if not (pred / f"{i}.png").is_file()]
    if missing:
        raise CpfcteError(f"{pred}: {len(missing)} of {len(ids)} test ids have no PNG (e.g. "
                          f"{missing[0]}.png); predict every image of {test_list}")
    for i in ids:
        check_prediction(pred / f"{i}.png",
                         Path(images) / f"{i}.jpg" if images is not None else None)
    if not out.name.endswith(".tar.gz"):
        raise CpfcteError(f"{out}: the output must be a .tar.gz")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        with tarfile.open(tmp, "w:gz", dereference=True) as tar:   # contents, never links
            for i in ids:
                tar.add(pred / f"{i}.png", arcname=f"{SERVER_DIR}/{i}.png")
    return {"out": str(out), "images": len(ids), "layout": SERVER_DIR}


def check_voc_test(archive: str | Path, test_list: str | Path | None = None,
                   images: str | Path | None = None) -> dict:
    """Check a test-server archive as the server reads it; the first problem is an error
    naming the member and the fix. Returns what was checked."""
    import io

    from PIL import Image

    from cpfcte.machinery.io import read_ids

    archive = Path(archive)
    if not archive.is_file():
        raise CpfcteError(f"{archive}: archive not found")
    try:
        tar = tarfile.open(archive, "r:gz")
    except (tarfile.TarError, OSError) as e:
        raise CpfcteError(f"{archive}: not a .tar.gz the server can read ({e})") from None
    found: dict[str, bytes] = {}
    with tar:
        for m in tar.getmembers():
            name = m.name.lstrip("./")
            if m.isdir() and (SERVER_DIR.startswith(name) or name == ""):
                continue
            if not m.isfile():
                raise CpfcteError(f"{archive}: {m.name} is a {'link' if m.issym() or m.islnk() else 'special member'}, "
                                  "not a file; the server reads file contents (pack with cpfcte "
                                  "export voc-test, which stores them)")
            parent, _, leaf = name.rpartition("/")
            if parent != SERVER_DIR or not leaf.endswith(".png"):
                raise CpfcteError(f"{archive}: {m.name} is not <id>.png in {SERVER_DIR}/; the "
                                  "server reads only that folder")
            found[leaf[:-4]] = tar.extractfile(m).read()
    if not found:
        raise CpfcteError(f"{archive}: no PNG in {SERVER_DIR}/")
    for image_id, data in sorted(found.items()):
        where = Path(f"{archive}:{SERVER_DIR}/{image_id}.png")
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
        except Exception as e:  # noqa: BLE001 (a member that is no PNG: named, with the cause)
            raise CpfcteError(f"{where}: not a readable PNG ({type(e).__name__})") from None
        tmp = io.BytesIO(data)
        _check_png(tmp, where, Path(images) / f"{image_id}.jpg" if images else None)
    if test_list is not None:
        ids = read_ids(Path(test_list))
        missing = sorted(set(ids) - set(found))
        extra = sorted(set(found) - set(ids))
        if missing or extra:
            raise CpfcteError(
                f"{archive}: {len(found)} PNGs against {len(ids)} ids of {test_list}"
                + (f"; missing {len(missing)} (e.g. {missing[0]})" if missing else "")
                + (f"; {len(extra)} not in the list (e.g. {extra[0]})" if extra else ""))
    elif len(found) != OFFICIAL_TEST_IMAGES:
        raise CpfcteError(f"{archive}: {len(found)} PNGs; VOC 2012 test has "
                          f"{OFFICIAL_TEST_IMAGES} images (pass --list to check against "
                          "another list)")
    return {"archive": str(archive), "images": len(found), "layout": SERVER_DIR,
            "checked_against": str(test_list) if test_list else
            f"the official count ({OFFICIAL_TEST_IMAGES})",
            "sizes_checked": images is not None}
