"""Atomic file writes and the label-PNG format.

Every output is written to a temporary file in the destination folder and then renamed over the
target (``os.replace`` is atomic on POSIX), so a killed run never leaves half a PNG, checkpoint or
metrics file behind: a reader sees the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from cpfcte.machinery.errors import CpfcteError

IGNORE_INDEX = 255


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it to ``target``, on any
    exception remove it and leave ``target`` untouched. A write the system refuses (a full
    disk, a read-only folder) is a ``CpfcteError`` naming the folder and the fix
    (``write_error``)."""
    from cpfcte.machinery import faults

    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp",
                                   dir=target.parent)
        os.close(fd)
    except OSError as e:
        raise write_error(target, e) from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        faults.on_write(target)          # fault injection (benchmarks/fault_bench.py); no-op
        os.chmod(tmp_path, 0o666 & ~_umask())   # mkstemp's 0600 → what open() would give
        os.replace(tmp_path, target)
    except BaseException as e:
        tmp_path.unlink(missing_ok=True)
        if isinstance(e, OSError) or _is_torch_write_error(e):
            raise write_error(target, e) from None
        raise


def _read_umask() -> int:
    """The process's umask, read once when this module loads (by setting and restoring it:
    the standard library has no other way; done once, before any thread of ours writes)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _umask() -> int:
    return _UMASK


_TMP_PID = re.compile(r"\.(\d+)\.[A-Za-z0-9_]+\.tmp$")


def clean_partial(folder: str | Path, names: list[str] | None = None, *,
                  recursive: bool = False) -> int:
    """Remove the temporary files of atomic writes a kill cut short in ``folder`` (never a
    finished file): all of them (in subfolders too with ``recursive``), or those of the files
    ``names`` only. A temporary file names its writer's pid (``atomic_path``); one whose writer
    is another live process is that process's write in progress (two report runs of a batch
    write the same figures at once) and stays."""
    patterns = [f".{n}.*.tmp" for n in names] if names is not None else [".*.tmp"]
    n = 0
    for pattern in patterns:
        for tmp in (Path(folder).rglob if recursive else Path(folder).glob)(pattern):
            if writer_alive(tmp.name):
                continue
            tmp.unlink(missing_ok=True)
            n += 1
    return n


def writer_alive(name: str) -> bool:
    """Whether the temporary file ``name`` is being written by another live process."""
    m = _TMP_PID.search(name)
    return m is not None and int(m.group(1)) != os.getpid() and pid_alive(int(m.group(1)))


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # alive, another user's
        return True
    return True


def write_error(target: str | Path, e: BaseException) -> CpfcteError:
    """A failed write as an error that names the folder and what to do; the outputs already
    written stay whole (every write is atomic) and a rerun resumes from them."""
    import errno

    target = Path(target)
    code = getattr(e, "errno", None)
    if code == errno.ENOSPC or "No space" in str(e) or "file write failed" in str(e):
        fix = "free space on that disk (or move runs/ with CPFCTE_RUNS)"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "make the folder writable (or move runs/ with CPFCTE_RUNS)"
    else:
        fix = "check the disk and the folder"
    reason = getattr(e, "strerror", None) or str(e).split("\n")[0]
    return CpfcteError(f"{target.parent}: cannot write {target.name} ({reason}); {fix}, then "
                       "rerun the same command (`cpfcte train` with --resume): what is written "
                       "is whole and the run resumes from it")


def _is_torch_write_error(e: BaseException) -> bool:
    """torch.save reports a failed write (a full disk) as a RuntimeError of its zip writer."""
    return isinstance(e, RuntimeError) and "PytorchStreamWriter" in str(e)


def append_line(path: str | Path, line: str) -> None:
    """Append one line (a log record); a refused write is a ``write_error``."""
    try:
        with open(path, "a") as fh:
            fh.write(line + "\n")
    except OSError as e:
        raise write_error(path, e) from None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """The sha256 (hex) of a file's bytes, read in chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    """Strict JSON: a NaN or infinity is an error naming the file, never written (it would be
    invalid JSON for strict parsers, and a sign that a stage went wrong)."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default, allow_nan=False)
    except ValueError as e:
        from cpfcte.machinery.errors import CpfcteError

        raise CpfcteError(f"{path}: refusing to write a non-finite number ({e})") from None
    write_text(path, text + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CpfcteError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise CpfcteError(f"{path}: not valid JSON ({e}); delete it and rerun the stage that "
                          "writes it") from None


def torch_save(obj: Any, path: str | Path) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def colorize(labels, palette: np.ndarray | None = None) -> np.ndarray:
    """A label map as an RGB array in ``palette`` (256 × 3; ``cpfcte.data.palette_for`` gives a
    dataset's), by default VOC's (255 in its cream colour)."""
    pal = (np.array(voc_palette(), dtype=np.uint8).reshape(256, 3) if palette is None
           else np.asarray(palette, dtype=np.uint8))
    return pal[np.asarray(labels)]


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (256 RGB entries, flattened): index 1 = (128, 0, 0),
    index 15 = (192, 128, 128), 255 = (224, 224, 192)."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def save_label_png(path: str | Path, labels: np.ndarray, *, palette: bool = True) -> None:
    """Write an H×W label map atomically: a mode ``P`` PNG with the VOC palette (as VOC's
    SegmentationClass), or a mode ``L`` grayscale PNG (as SegmentationClassAug)."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise CpfcteError(f"{path}: a label map must be H×W, got shape {labels.shape}")
    if labels.min(initial=0) < 0 or labels.max(initial=0) > 255:
        raise CpfcteError(f"{path}: label values must lie in 0..255")
    img = Image.fromarray(labels.astype(np.uint8), mode="L")
    if palette:
        img = img.convert("P")
        img.putpalette(voc_palette())
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def read_label_png(path: str | Path) -> np.ndarray:
    """Read a label PNG as class indices: palette (``P``) PNGs by index, never by colour;
    grayscale (``L``) PNGs by value. Anything else (RGB colour masks) is refused."""
    path = Path(path)
    if not path.is_file():
        raise CpfcteError(f"{path}: label file not found")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("P", "L"):
                raise CpfcteError(
                    f"{path}: label PNG has mode {im.mode!r}; expected a palette ('P') PNG as in "
                    "VOC SegmentationClass or a grayscale ('L') PNG of class indices")
            return np.array(im, dtype=np.uint8)
    except CpfcteError:
        raise
    except Exception as e:  # PIL raises many types for truncated/corrupt files
        raise CpfcteError(f"{path}: cannot read label PNG ({e}); the file is corrupt or "
                          "truncated: regenerate or re-download it") from None


MAX_PIXELS = 40_000_000   # larger images are refused: resize them first (VOC's are ~0.2 MP)
# EXIF orientations that swap width and height (5-8: transposed or rotated by 90°)
_SWAPPING = {5, 6, 7, 8}


def _too_large(path: Path, w: int, h: int) -> CpfcteError:
    return CpfcteError(f"{path}: image is {w}×{h} ({w * h / 1e6:.0f} megapixels), above the "
                       f"{MAX_PIXELS / 1e6:.0f} that cpfcte reads; resize it (at most about "
                       "6000 px on a side) and give the resized copy")


def _open(path: Path):
    """``Image.open`` with PIL's decompression-bomb guard turned into a clear error."""
    try:
        return Image.open(path)
    except Image.DecompressionBombError as e:
        raise CpfcteError(f"{path}: image too large to decode safely ({e}); resize it (at "
                          "most about 6000 px on a side) and give the resized copy") from None


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) as the image displays (its EXIF orientation applied), from the header
    alone; an image above ``MAX_PIXELS`` is refused."""
    path = Path(path)
    if not path.is_file():
        raise CpfcteError(f"{path}: image not found")
    try:
        with _open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except CpfcteError:
        raise
    except Exception as e:
        raise CpfcteError(f"{path}: cannot read image header ({e}); the file is corrupt: "
                          "regenerate or re-download it") from None
    if w * h > MAX_PIXELS:
        raise _too_large(path, w, h)
    return (h, w) if orientation in _SWAPPING else (w, h)


def read_image(path: str | Path) -> Image.Image:
    """Open an image as 8-bit RGB as it displays: its EXIF orientation applied (a phone's
    portrait JPEG stored sideways comes out upright, as a viewer shows it and as masks are
    drawn on it), 16-bit images scaled to 8 bits (not clipped), with a clear error for a
    missing, corrupt or too large file."""
    from PIL import ImageOps

    path = Path(path)
    if not path.is_file():
        raise CpfcteError(f"{path}: image not found")
    try:
        with _open(path) as im:
            if im.size[0] * im.size[1] > MAX_PIXELS:
                raise _too_large(path, *im.size)
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode.startswith("I"):               # 16-bit (or 32-bit integer) grey
                arr = np.asarray(im, dtype=np.float64)
                top = 65535.0 if arr.max() > 255 or im.mode.startswith("I;16") else 255.0
                im = Image.fromarray(np.round(arr * (255.0 / top)).clip(0, 255)
                                     .astype(np.uint8), mode="L")
            return im.convert("RGB")
    except CpfcteError:
        raise
    except Exception as e:
        raise CpfcteError(f"{path}: cannot decode image ({e}); the file is corrupt or "
                          "truncated: regenerate or re-download it") from None


def read_ids(path: str | Path) -> list[str]:
    """The ids of a split list: one per line, the whole line (a file name may hold spaces),
    blank lines skipped."""
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
