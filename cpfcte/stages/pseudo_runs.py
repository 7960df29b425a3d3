"""Where a pseudo-label run's outputs are: the folder of CRF pseudo labels DeepLabv2 trains on
(``pseudo_label_dir``), from a pseudo-label run folder or a plain folder of PNGs. Read from the
run folder alone, so DeepLabv2's stage needs nothing of stage 1."""

from __future__ import annotations

from pathlib import Path

from cpfcte.machinery.errors import CpfcteError
from cpfcte.machinery.runfolder import METRICS, RunFolder


def pseudo_run_of(path: str | Path) -> Path | None:
    """The pseudo-label run folder ``path`` is, or whose output folder it is; None for a plain
    folder of PNGs."""
    path = Path(path)
    for folder in (path, path.parent):
        if (folder / "config.json").is_file() and RunFolder(folder).stage == "pseudo":
            return folder
    return None


def pseudo_label_dir(path: str | Path) -> Path:
    """The folder of pseudo-label PNGs that DeepLabv2 trains on: ``path`` itself, or, for a
    pseudo-label run folder, its CRF pseudo labels of its config's training split."""
    path = Path(path)
    run = pseudo_run_of(path)
    if run is None or run != path:
        if (path / "config.json").is_file():
            raise CpfcteError(f"{path}: holds a {RunFolder(path).stage} run; give a pseudo-label "
                              "run or a folder of pseudo-label PNGs")
        return path
    folder = RunFolder(run)
    labels = training_split_labels(folder)
    if labels is None:
        split = folder.config().train_split
        raise CpfcteError(f"{folder.path}: holds no CRF pseudo labels of the training split "
                          f"{split!r}; make them with `cpfcte pseudo --split {split}` (or "
                          f"notebook 03 with split={split!r})")
    return labels


def training_split_labels(folder: RunFolder) -> Path | None:
    """The CRF pseudo labels of a pseudo-label run's training split, if it made them."""
    m = folder.metrics() if (folder.path / METRICS).exists() else {}
    if m.get("crf") and m.get("split") == folder.config().train_split:
        return Path(m["crf"]["crf_dir"])
    return None
