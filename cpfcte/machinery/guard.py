"""The leak guard: no stage may read training-set ground truth except evaluation, and no stage
writes into a ground-truth folder. A pseudo-label folder that is (or lies inside) a dataset's
SegmentationClass / SegmentationClassAug is refused, and so is scoring a folder against itself.
By content too, whatever the path: a prediction or pseudo-label folder most of whose masks are
near copies of the split's ground truth (at least ``COPY_AGREEMENT`` = 99.9 % of their pixels,
255 borders included, equal: a copy with a few pixels changed is still a copy; no model agrees
with most masks that closely) is refused (``refuse_copy``; for DeepLabv2's pseudo labels the
guard reads the ground truth only to compare, never to train).
"""

from __future__ import annotations

from pathlib import Path

from cpfcte.machinery.errors import CpfcteError

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


COPY_SHARE = 0.5          # more than this share of near copies: a copy of the ground truth
COPY_SAMPLE = 50          # masks compared (spread over the split) when checking a folder
COPY_AGREEMENT = 0.999    # a mask with at least this share of its pixels equal is a near copy


def near_copy(mask, truth) -> bool:
    """Whether ``mask`` is (nearly) the ground truth ``truth``: same size and at least
    ``COPY_AGREEMENT`` of the pixels equal, where the truth holds at least two labels (255
    aside). Agreeing with a one-label truth proves nothing: an all-background mask agrees with
    every all-background image, and the stage's own all-background baseline is no leak."""
    import numpy as np

    if mask.shape != truth.shape:
        return False
    if np.unique(truth[truth != 255]).size < 2 or np.unique(mask).size < 2:
        return False
    return float(np.mean(mask == truth)) >= COPY_AGREEMENT


def refuse_copy(identical: int, compared: int, folder: str | Path, role: str) -> None:
    """Raise when most of ``compared`` masks of ``folder`` are near copies of the ground
    truth's."""
    if compared >= 2 and identical > COPY_SHARE * compared:
        raise CpfcteError(f"{folder}: refused as {role}: {identical} of {compared} masks agree "
                          f"with the split's ground truth on at least {COPY_AGREEMENT:.1%} of "
                          "their pixels, so it is a copy of the labels, whatever its path")


def refuse_copy_of_ground_truth(folder: str | Path, gt_dir: str | Path | None, ids: list[str],
                                role: str) -> None:
    """Compare up to ``COPY_SAMPLE`` masks of ``folder`` (spread over ``ids``) with the ground
    truth; refuse a copy. No ground truth (your own data without masks): nothing to compare."""
    from cpfcte.machinery.io import read_label_png

    if gt_dir is None or not ids:
        return
    step = max(1, len(ids) // COPY_SAMPLE)
    sample = [i for i in ids[::step] if (Path(folder) / f"{i}.png").is_file()
              and (Path(gt_dir) / f"{i}.png").is_file()][:COPY_SAMPLE]
    same = sum(near_copy(read_label_png(Path(folder) / f"{i}.png"),
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
