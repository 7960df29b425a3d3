"""Download the official dataset archives: resumable, verified, extracted atomically.

``cpfcte data download voc|sbd|coco --to DIR`` fetches each archive into ``DIR/downloads/`` as
``<name>.part`` (an interrupted transfer resumes with an HTTP Range request), checks its size and
MD5 against the known values, and only then renames it to ``<name>`` and extracts it into
``DIR`` through a staging folder that is renamed into place: an interrupted extraction never
leaves a half dataset behind. A corrupt download is refused (and removed) with a clear error.
"""

from __future__ import annotations

import hashlib
import http.client
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from cpfcte.machinery.errors import CpfcteError


@dataclass(frozen=True)
class Archive:
    name: str            # file name
    url: str
    md5: str | None      # known MD5, or None where only the size is published
    size: int | None     # bytes
    extracts_to: str     # top-level folder the archive creates inside DIR


# Checksums: VOC and SBD as published by torchvision's dataset classes; COCO publishes none,
# so its archives are checked by size.
ARCHIVES: dict[str, tuple[Archive, ...]] = {
    "voc": (Archive("VOCtrainval_11-May-2012.tar",
                    "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
                    "6cd6e144f989b92b3379bac3b3de84fd", 1999639040, "VOCdevkit"),),
    "sbd": (Archive("benchmark.tgz",
                    "https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/"
                    "semantic_contours/benchmark.tgz",
                    "82b4d87ceb2ed10f6038a1cba92111cb", 1419539633, "benchmark_RELEASE"),),
    "coco": (Archive("train2014.zip", "http://images.cocodataset.org/zips/train2014.zip",
                     None, 13510573713, "train2014"),
             Archive("val2014.zip", "http://images.cocodataset.org/zips/val2014.zip",
                     None, 6645013297, "val2014"),
             Archive("annotations_trainval2014.zip",
                     "http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
                     None, 252872794, "annotations")),
}

CHUNK = 1 << 20


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def fetch(archive: Archive, downloads: Path, *, progress: bool = True, timeout: float = 60) -> Path:
    """Download ``archive`` into ``downloads``; resume a ``.part`` file; verify; return the path."""
    from cpfcte.machinery.progress import progress_bar

    downloads.mkdir(parents=True, exist_ok=True)
    final = downloads / archive.name
    if final.exists():                  # it may be a file you put there: checked, never removed
        verify(archive, final, removed=False)
        return final
    part = downloads / (archive.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if archive.size is not None and have > archive.size:
        part.unlink()
        have = 0
    if archive.size is None or have < archive.size:
        request = urllib.request.Request(archive.url, headers={"Range": f"bytes={have}-"}
                                         if have else {})
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # range not satisfiable: the .part is complete
                response = None
            else:
                raise CpfcteError(f"{archive.url}: HTTP {e.code} {e.reason}; try again later or "
                                  f"download it by hand into {downloads}") from None
        except (urllib.error.URLError, OSError) as e:
            raise CpfcteError(f"{archive.url}: cannot connect ({e}); check the network, or "
                              f"download the file by hand into {downloads}") from None
        if response is not None:
            with response:
                if have and response.status != 206:  # no range support: start over
                    have = 0
                length = response.headers.get("Content-Length")
                total = archive.size or (have + int(length) if length else None)
                mode = "ab" if have else "wb"
                with open(part, mode) as fh, progress_bar(
                        total=total, initial=have, unit="B", unit_scale=True, desc=archive.name,
                        disable=not progress) as bar:
                    try:
                        for block in iter(lambda: response.read(CHUNK), b""):
                            fh.write(block)
                            bar.update(len(block))
                    except (OSError, urllib.error.URLError, http.client.HTTPException) as e:
                        raise CpfcteError(f"{archive.url}: transfer interrupted ({e}); run the "
                                          "same command again to resume") from None
    size = part.stat().st_size
    if archive.size is not None and size < archive.size:
        raise CpfcteError(f"{part}: transfer stopped at {size} of {archive.size} bytes; run the "
                          "same command again to resume")
    try:
        verify(archive, part, removed=True)
    except CpfcteError:
        part.unlink(missing_ok=True)
        raise
    part.rename(final)
    return final


def verify(archive: Archive, path: Path, removed: bool = True) -> None:
    """Refuse a file of the wrong size or MD5. ``removed`` says what the caller does with it:
    a partial download of ours is removed; a finished file (maybe yours) is left in place."""
    fix = ("it was removed: run the command again" if removed else
           "it is left in place: delete it, or put the right file there, and run the command "
           "again")
    size = path.stat().st_size
    if archive.size is not None and size != archive.size:
        raise CpfcteError(f"{path}: {size} bytes, expected {archive.size}; the file is corrupt "
                          f"or another one ({fix})")
    if archive.md5 is not None:
        digest = md5sum(path)
        if digest != archive.md5:
            raise CpfcteError(f"{path}: MD5 {digest}, expected {archive.md5}; the file is "
                              f"corrupt or another one ({fix})")


def extract(archive_path: Path, dest: Path, top: str) -> Path:
    """Extract into ``dest`` through a staging folder; ``dest/top`` appears only when whole."""
    target = dest / top
    if target.exists():
        return target
    staging = dest / f".{top}.extracting"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        if zipfile.is_zipfile(archive_path):
            with zipfile.ZipFile(archive_path) as zf:
                zf.extractall(staging)
        else:
            with tarfile.open(archive_path) as tf:
                tf.extractall(staging, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise CpfcteError(f"{archive_path}: cannot extract ({e}); delete it and download "
                          "again") from None
    if not (staging / top).is_dir():
        found = sorted(p.name for p in staging.iterdir())
        shutil.rmtree(staging, ignore_errors=True)
        raise CpfcteError(f"{archive_path}: expected a top-level folder {top!r}, found {found}")
    (staging / top).rename(target)
    shutil.rmtree(staging, ignore_errors=True)
    return target


def download(dataset: str, to: str | Path, *, archives: dict[str, tuple[Archive, ...]] | None = None,
             progress: bool = True) -> list[Path]:
    """Fetch, verify and extract every archive of ``dataset`` into ``to``."""
    table = archives or ARCHIVES
    if dataset not in table:
        raise CpfcteError(f"unknown dataset {dataset!r} to download: expected "
                          f"{', '.join(table)}")
    to = Path(to)
    out = []
    for archive in table[dataset]:
        path = fetch(archive, to / "downloads", progress=progress)
        out.append(extract(path, to, archive.extracts_to))
    return out
