"""The leak guard: no stage may read training-set ground truth except evaluation, and no stage
writes into a ground-truth folder. A pseudo-label folder that is (or lies inside) a dataset's
SegmentationClass / SegmentationClassAug is refused, and so is scoring a folder against itself.
"""

from __future__ import annotations

from pathlib import Path

from cpfcte.errors import CpfcteError

GROUND_TRUTH_NAMES = ("SegmentationClass", "SegmentationClassAug", "SegmentationObject")


def is_ground_truth_dir(path: str | Path) -> bool:
    path = Path(path).resolve()
    return any(part in GROUND_TRUTH_NAMES for part in path.parts)


def refuse_ground_truth(path: str | Path, role: str = "pseudo-label folder") -> Path:
    """Return ``path`` if it is not ground truth, else raise."""
    if is_ground_truth_dir(path):
        raise CpfcteError(f"{path}: refused as {role}: it is (or lies inside) a dataset's "
                          f"ground-truth folder ({'/'.join(GROUND_TRUTH_NAMES)}). Training on or "
                          "overwriting ground truth would leak labels; use a folder under runs/")
    return Path(path)


def refuse_self_evaluation(pred_dir: Path, gt_dir: Path) -> None:
    """Scoring ground truth against (a copy of) itself is refused: the predictions may not be
    the ground-truth folder, nor any dataset's ground-truth folder."""
    if pred_dir.resolve() == gt_dir.resolve():
        raise CpfcteError(f"{pred_dir}: prediction and ground-truth folders are the same; "
                          "scoring a split against itself is meaningless")
    if is_ground_truth_dir(pred_dir):
        raise CpfcteError(f"{pred_dir}: refused as predictions: it is a dataset's ground-truth "
                          "folder, so the score would measure the labels against themselves")
