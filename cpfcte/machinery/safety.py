"""Nothing of the user's is ever lost: where a command may write.

The rule every command follows, checked before its first write:

* it writes only into a folder that is empty (or new), that it made itself and marked as its
  own (an owner file, ``.cpfcte-owner.json``, naming the command), or that it is told to
  replace with ``--force``;
* its outputs never alias its inputs: no output path is, contains or lies inside an input;
* it never writes inside a dataset (a folder with ``JPEGImages/``, ``ImageSets/`` or a
  ``SegmentationClass*/`` folder, or one a preparation marked) unless it is that dataset's own
  preparation;
* ``--force`` replaces only what the command writes: the files at the names it writes now, and
  those an earlier run of it recorded (``.cpfcte-written.json``); a file of yours beside them
  stays;
* every name that becomes part of a path is a plain name (``plain_name``).

``claim_folder`` applies the first rule and marks the folder; ``refuse_alias`` the second;
``refuse_inside_dataset`` the third; ``Outputs`` the fourth.
"""

from __future__ import annotations

import json
from pathlib import Path

from cpfcte.machinery.errors import CpfcteError

OWNER = ".cpfcte-owner.json"
WRITTEN = ".cpfcte-written.json"
# the files a cpfcte command or the batch writes around a run, which do not make a folder the
# user's (the batch writes run.json and the executed notebook before the stage starts)
BOOKKEEPING = {OWNER, WRITTEN, ".lock", "run.json", "job.json", "launch_config.json", "config.json"}
DATASET_MARKERS = ("cpfcte_prepare_voc.json", "cpfcte_prepare_coco.json",
                   "cpfcte_prepare_folder.json", "toy_spec.json")


# a folder a preparation completed before the owner files existed is that preparation's
MADE_BY = {"cpfcte_prepare_folder.json": "data prepare folder", "toy_spec.json": "data prepare toy"}


def owner_of(folder: Path) -> str | None:
    """The command that marked ``folder`` as its own, or None."""
    folder = Path(folder)
    try:
        return json.loads((folder / OWNER).read_text()).get("by")
    except (OSError, ValueError, AttributeError):
        pass
    return next((by for name, by in MADE_BY.items() if (folder / name).is_file()), None)


def mark(folder: Path, by: str) -> None:
    from cpfcte.machinery.io import write_json

    Path(folder).mkdir(parents=True, exist_ok=True)
    write_json(Path(folder) / OWNER, {"by": by})


def user_files(folder: Path) -> list[Path]:
    """What in ``folder`` is not cpfcte bookkeeping (first level)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.name not in BOOKKEEPING and p.suffix != ".ipynb"
                  and p.name not in MADE_BY and not p.name.startswith(".cpfcte")
                  and not (p.name.startswith(".") and p.name.endswith(".tmp")))  # a killed write


def check_folder(folder: str | Path, by: str, *, force: bool = False,
                 also_ours: tuple[str, ...] = (), flag: str = "--force") -> Path:
    """Refuse ``folder`` as the output folder of command ``by`` unless it is new or empty,
    marked by ``by`` (or one of ``also_ours``), or ``force`` is given. Writes nothing."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CpfcteError(f"{folder}: exists and is a file, not a folder; give a folder path")
    owner = owner_of(folder)
    if owner not in (by, *also_ours) and not force:
        found = user_files(folder)
        if found:
            made = f" (made by `cpfcte {owner}`)" if owner else ""
            raise CpfcteError(
                f"{folder}: not empty{made} and not a folder `cpfcte {by}` made: it holds "
                f"{', '.join(p.name for p in found[:3])}{' …' if len(found) > 3 else ''}. "
                f"Nothing was written. Give a new or empty folder, or pass {flag} to replace "
                "what this command writes there")
    return folder


def claim_folder(folder: str | Path, by: str, *, force: bool = False,
                 also_ours: tuple[str, ...] = (), flag: str = "--force") -> Path:
    """``check_folder``, then mark the folder as ``by``'s own. Returns it."""
    folder = check_folder(folder, by, force=force, also_ours=also_ours, flag=flag)
    mark(folder, by)
    return folder


def _overlap(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def refuse_alias(outputs: list[Path], inputs: list[Path | None], command: str) -> None:
    """Refuse when an output path is, contains or lies inside an input path."""
    for out in outputs:
        for src in inputs:
            if src is not None and _overlap(Path(out), Path(src)):
                raise CpfcteError(f"{command}: the output {out} and the input {src} overlap, so "
                                  "writing would overwrite the input. Nothing was written. "
                                  "Give an output folder outside the inputs")


def dataset_root_of(path: str | Path) -> Path | None:
    """The dataset ``path`` is, or lies inside: the nearest folder (itself or an ancestor) with
    a ``JPEGImages``, ``ImageSets`` or ``SegmentationClass*`` folder (VOC's layout, SBD's, ours)
    or a preparation's completion file. None outside every dataset."""
    p = Path(path).resolve()
    for folder in (p, *p.parents):
        if any((folder / m).is_file() for m in DATASET_MARKERS):
            return folder
        if (folder / "JPEGImages").is_dir() or (folder / "ImageSets").is_dir():
            return folder
        try:
            if any(c.is_dir() and c.name.startswith("SegmentationClass")
                   for c in folder.iterdir()):
                return folder
        except OSError:
            pass
    return None


def refuse_inside_dataset(path: str | Path, role: str, own: str | None = None) -> Path:
    """Refuse an output folder that is a dataset or lies inside one; ``own``: the preparation
    that may write its own dataset again (``path`` is that dataset, marked by it)."""
    root = dataset_root_of(path)
    if root is not None and own is not None and root == Path(path).resolve() and \
            owner_of(root) == own:
        return Path(path)
    if root is not None:
        raise CpfcteError(f"{path}: refused as {role}: it is (or lies inside) the dataset "
                          f"{root}; a command never writes among a dataset's images, labels and "
                          "masks. Nothing was written. Use a folder under runs/ or elsewhere")
    return Path(path)


def plain_name(value: str, what: str) -> str:
    """``value`` as a name that becomes part of a path (a split, a run, a profile): one plain
    component, so that the path stays inside its root. Refused: empty, ``.``, ``..``, a
    separator, a leading or trailing space or a control character."""
    text = str(value)
    if (not text or text in (".", "..") or "/" in text or "\\" in text or text != text.strip()
            or any(ord(ch) < 32 for ch in text)):
        raise CpfcteError(f"{what} {text!r}: give a plain name (letters, digits, '_', '-', "
                          "'.'; no '/', no '..'): it becomes part of a path")
    return text


class Outputs:
    """The files a command writes into ``folder``, kept in ``.cpfcte-written.json``, so that a
    rerun (or ``--force``) replaces exactly those: the files at the names it writes now, and
    the ones an earlier run recorded that it does not write again. Nothing else in the folder
    is touched. Use: ``plan(paths)`` before the first write (the record then holds both runs'
    files, so a killed run leaves nothing unknown), write, ``finish()``."""

    def __init__(self, folder: str | Path, subfolders: tuple[str, ...] = ()):
        self.folder = Path(folder)
        for sub in subfolders:                       # never write through a link of yours
            if (self.folder / sub).is_symlink():
                raise CpfcteError(f"{self.folder / sub}: a symbolic link; this command writes "
                                  f"its own {sub}/ here. Nothing was written. Remove the link "
                                  "or give another output folder")
        self.before = self._read()
        self.planned: set[str] = set()

    def _read(self) -> set[str]:
        try:
            files = json.loads((self.folder / WRITTEN).read_text()).get("files", [])
        except (OSError, ValueError, AttributeError):
            return set()
        return {f for f in files if isinstance(f, str)}

    def _write(self, files: set[str]) -> None:
        from cpfcte.machinery.io import write_json

        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(self.folder / WRITTEN, {"files": sorted(files)})

    def rel(self, path: str | Path) -> str:
        p = Path(path)
        try:
            return p.relative_to(self.folder).as_posix()
        except ValueError:
            return p.as_posix()

    def plan(self, paths) -> None:
        self.planned = {self.rel(p) for p in paths}
        self._write(self.before | self.planned)

    def finish(self) -> list[Path]:
        """Remove the files the earlier run recorded and this one did not write (and folders
        they leave empty); record this run's. Returns what was removed."""
        removed = []
        root = self.folder.resolve()
        for rel in sorted(self.before - self.planned):
            path = self.folder / rel
            try:
                inside = path.parent.resolve() == root or root in path.parent.resolve().parents
            except OSError:
                inside = False
            if rel in ("", ".", WRITTEN, OWNER) or ".." in Path(rel).parts or not inside:
                continue
            if path.is_symlink() or path.is_file():
                path.unlink()
                removed.append(path)
                parent = path.parent
                while parent != self.folder and parent.is_dir() and not any(parent.iterdir()):
                    parent.rmdir()
                    parent = parent.parent
        self._write(self.planned)
        return removed
