"""Which classes a stage-1 run keeps in an image that has no labels (``cpfcte predict``, the
walk-through on a photo): those whose image score p (the run's pooling, Eq. 8) exceeds a
threshold. A fixed 0.5 assumes the MCE loss put the decision there; measured on the toy's
own training images it keeps almost nothing (recall 0.11). So the threshold is calibrated per
run, on its training split's image-level labels (what weak supervision gives): the one of
0.01, 0.02, …, 0.99 with the best micro-F1 over the foreground classes, the smallest on a tie.
It is written once to the run folder (``threshold.json``) with its F1, precision and recall
and those at 0.5, and read from there after. A number passed instead is used as given.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cpfcte.machinery.errors import CpfcteError

THRESHOLD_FILE = "threshold.json"
GRID = np.round(np.arange(1, 100) / 100, 2)
MAX_IMAGES = 2000          # spread evenly over the training split (VOC's train_aug: 10,582)


def f1_curve(scores: np.ndarray, labels: np.ndarray, grid: np.ndarray = GRID) -> dict:
    """Micro precision, recall and F1 of ``scores > t`` against ``labels`` (N, C foreground,
    0/1) at each t of ``grid``."""
    truth = labels.astype(bool)
    keep = scores[None] > grid[:, None, None]                       # (T, N, C)
    tp = (keep & truth).sum(axis=(1, 2)).astype(float)
    fp = (keep & ~truth).sum(axis=(1, 2)).astype(float)
    fn = (~keep & truth).sum(axis=(1, 2)).astype(float)
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=tp + fp > 0)
    recall = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=tp + fn > 0)
    f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=2 * tp + fp + fn > 0)
    return {"threshold": grid, "precision": precision, "recall": recall, "f1": f1}


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> dict:
    """The threshold of ``GRID`` with the best micro-F1 (the smallest on a tie), with its
    figures and those of 0.5."""
    curve = f1_curve(scores, labels)
    i = int(np.argmax(curve["f1"]))
    half = int(np.flatnonzero(GRID == 0.5)[0])

    def at(j: int) -> dict:
        return {k: round(float(curve[k][j]), 4) for k in ("f1", "precision", "recall")}

    return {"threshold": float(GRID[i]), **at(i), "at_0.5": at(half)}


@torch.no_grad()
def image_scores(run_dir: str | Path, max_images: int = MAX_IMAGES,
                 progress: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
    """p (N, C) of a run on its training split at its inference size, as ``predict`` scores
    a photo, with the image-level labels (N, C) and what was scored."""
    from cpfcte.data import open_split
    from cpfcte.data.transforms import resized_input
    from cpfcte.machinery.progress import progress_bar
    from cpfcte.method.bpm import patch_probs
    from cpfcte.method.topk_pooling import pool
    from cpfcte.stages.pseudo_labels import infer_size_for
    from cpfcte.stages.train import load_trained

    model, cfg = load_trained(run_dir)
    size = infer_size_for(cfg, model.patch_size[0])
    data = open_split(cfg, cfg.train_split)
    idx = np.unique(np.linspace(0, len(data) - 1, min(max_images, len(data))).round()
                    .astype(int))
    device = next(model.parameters()).device
    scores = []
    batch = max(1, int(cfg.infer_batch))
    for start in progress_bar(range(0, len(idx), batch), desc="calibrating the threshold",
                              disable=not progress, leave=False):
        x = torch.stack([resized_input(data.image(int(i)), size, cfg.resize)
                         for i in idx[start:start + batch]]).to(device)
        grid = patch_probs(model, x)                                   # (B, C, h, w)
        scores.append(pool(grid.flatten(2).transpose(1, 2), cfg.pooling, cfg.k).float().cpu())
    labels = data.label_matrix()[idx]
    return (torch.cat(scores).numpy(), labels,
            {"split": cfg.train_split, "images": int(len(idx)), "infer_size": size})


def calibrated_threshold(run_dir: str | Path, progress: bool = True) -> dict:
    """The run's calibrated threshold (``threshold.json``; computed and written when missing
    or written for another checkpoint)."""
    from cpfcte.machinery.io import read_json, write_json
    from cpfcte.machinery.runfolder import RunFolder

    folder = RunFolder(run_dir)
    if folder.stage != "train":
        raise CpfcteError(f"{folder.path}: a {folder.stage or 'unknown'} run; a threshold is "
                          "calibrated for a stage-1 training run")
    cfg = folder.config()
    key = {"digest": cfg.digest(), "epochs": cfg.epochs}
    path = folder.path / THRESHOLD_FILE
    if path.is_file():
        saved = read_json(path)
        if all(saved.get(k) == v for k, v in key.items()):
            return saved
    scores, labels, scored = image_scores(folder.path, progress=progress)
    found = best_threshold(scores[:, 1:], labels[:, 1:])
    result = {**found, **scored, **key,
              "rule": "best micro-F1 of p > t against the training split's image-level "
                      "labels, foreground classes, t in 0.01..0.99"}
    write_json(path, result)
    return result


def resolve_threshold(run_dir: str | Path, threshold: float | str | None,
                      progress: bool = True) -> tuple[float, str]:
    """(threshold, how it was chosen): ``"auto"`` (or None) → the run's calibrated one; a
    number in (0, 1) → itself."""
    if threshold in (None, "auto"):
        t = calibrated_threshold(run_dir, progress)
        return t["threshold"], (f"calibrated on {t['images']} {t['split']} images: best F1 "
                                f"{t['f1']:.2f} (precision {t['precision']:.2f}, recall "
                                f"{t['recall']:.2f}; at 0.5 the F1 is {t['at_0.5']['f1']:.2f})")
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise CpfcteError(f"threshold {threshold!r}: give a number in (0, 1) or 'auto' (the "
                          "run's calibrated threshold)") from None
    if not 0 < value < 1:
        raise CpfcteError(f"threshold {value}: must be in (0, 1), or 'auto'")
    return value, "given"
