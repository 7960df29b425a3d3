"""The leak guard: no stage may read training-set ground truth except evaluation, and no stage
writes into a ground-truth folder. A pseudo-label folder that is (or lies inside) a dataset's
SegmentationClass / SegmentationClassAug is refused, and so is scoring a folder against itself.
By content too, whatever the path: a prediction or pseudo-label folder whose masks are mostly
pixel-identical to the split's ground truth is a copy of it (no model reproduces most masks,
255 borders included, exactly) and is refused (``refuse_copy``; for DeepLabv2's pseudo labels
the guard reads the ground truth only to compare, never to train).
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


COPY_SHARE = 0.5          # more than this share of identical masks: a copy of the ground truth
COPY_SAMPLE = 50          # masks compared (spread over the split) when checking a folder


def refuse_copy(identical: int, compared: int, folder: str | Path, role: str) -> None:
    """Raise when most of ``compared`` masks of ``folder`` equal the ground truth's."""
    if compared >= 2 and identical > COPY_SHARE * compared:
        raise CpfcteError(f"{folder}: refused as {role}: {identical} of {compared} masks are "
                          "pixel-identical to the split's ground truth, so it is a copy of the "
                          "labels, whatever its path")


def refuse_copy_of_ground_truth(folder: str | Path, gt_dir: str | Path | None, ids: list[str],
                                role: str) -> None:
    """Compare up to ``COPY_SAMPLE`` masks of ``folder`` (spread over ``ids``) with the ground
    truth; refuse a copy. No ground truth (your own data without masks): nothing to compare."""
    import numpy as np

    from cpfcte.io import read_label_png

    if gt_dir is None or not ids:
        return
    step = max(1, len(ids) // COPY_SAMPLE)
    sample = [i for i in ids[::step] if (Path(folder) / f"{i}.png").is_file()
              and (Path(gt_dir) / f"{i}.png").is_file()][:COPY_SAMPLE]
    same = sum(np.array_equal(read_label_png(Path(folder) / f"{i}.png"),
                              read_label_png(Path(gt_dir) / f"{i}.png")) for i in sample)
    refuse_copy(same, len(sample), folder, role)


def refuse_self_evaluation(pred_dir: Path, gt_dir: Path) -> None:
    """Scoring ground truth against (a copy of) itself is refused: the predictions may not be
    the ground-truth folder, nor any dataset's ground-truth folder."""
    if pred_dir.resolve() == gt_dir.resolve():
        raise CpfcteError(f"{pred_dir}: prediction and ground-truth folders are the same; "
                          "scoring a split against itself is meaningless")
    if is_ground_truth_dir(pred_dir):
        raise CpfcteError(f"{pred_dir}: refused as predictions: it is a dataset's ground-truth "
                          "folder, so the score would measure the labels against themselves")
