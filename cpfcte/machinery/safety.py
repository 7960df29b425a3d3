"""Nothing of the user's is ever lost: where a command may write.

The rule every command follows, checked before its first write:

* it writes only into a folder that is empty (or new), that it made itself and marked as its
  own (an owner file, ``.cpfcte-owner.json``, naming the command), or that it is told to
  replace with ``--force``;
* its outputs never alias its inputs: no output path is, contains or lies inside an input;
* it never writes inside a dataset (a folder with the VOC layout, or one a preparation
  marked) unless it is that dataset's own preparation.

``claim_folder`` applies the first rule and marks the folder; ``refuse_alias`` the second;
``refuse_inside_dataset`` the third.
"""

from __future__ import annotations

import json
from pathlib import Path

from cpfcte.machinery.errors import CpfcteError

OWNER = ".cpfcte-owner.json"
# the files a cpfcte command or the batch writes around a run, which do not make a folder the
# user's (the batch writes run.json and the executed notebook before the stage starts)
BOOKKEEPING = {OWNER, ".lock", "run.json", "job.json", "launch_config.json", "config.json"}
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
    the VOC layout (``JPEGImages`` and ``Annotations`` or ``ImageSets``) or a preparation's
    completion file. None outside every dataset."""
    p = Path(path).resolve()
    for folder in (p, *p.parents):
        if any((folder / m).is_file() for m in DATASET_MARKERS):
            return folder
        if (folder / "JPEGImages").is_dir() and ((folder / "Annotations").is_dir()
                                                 or (folder / "ImageSets").is_dir()):
            return folder
    return None


def refuse_inside_dataset(path: str | Path, role: str) -> Path:
    """Refuse an output folder that is a dataset or lies inside one."""
    root = dataset_root_of(path)
    if root is not None:
        raise CpfcteError(f"{path}: refused as {role}: it is (or lies inside) the dataset "
                          f"{root}; a command never writes among a dataset's images, labels and "
                          "masks. Nothing was written. Use a folder under runs/ or elsewhere")
    return Path(path)
