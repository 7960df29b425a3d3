"""mIoU from one confusion matrix over a whole split (note 10).

Pixels whose ground truth is ``ignore_index`` (255) are skipped. A prediction of
``ignore_index`` ("no label") on a valid pixel counts as a miss for the true class. IoU_c =
TP / (TP + FP + FN); mIoU is the mean over the classes present in the ground truth, and classes
absent from it have IoU ``None``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cpfcte.machinery.errors import CpfcteError
from cpfcte.machinery.io import IGNORE_INDEX, read_label_png


class ConfusionMatrix:
    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        if num_classes < 1 or num_classes > 255:
            raise CpfcteError(f"num_classes must be in 1..255, got {num_classes}")
        if not 0 <= ignore_index <= 255 or ignore_index < num_classes:
            raise CpfcteError(f"--ignore-index {ignore_index}: must be in {num_classes}..255, "
                              f"outside the class indices 0..{num_classes - 1} (VOC's is 255, "
                              "the boundary band)")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)  # [gt, pred]
        self.unlabelled = np.zeros(num_classes, dtype=np.int64)  # gt c predicted as ignore

    def update(self, pred: np.ndarray, gt: np.ndarray, name: str = "prediction",
               gt_name: str | None = None) -> None:
        """Add one image: ``name`` names the prediction in errors, ``gt_name`` its ground truth
        (a bad label is reported in the file that holds it)."""
        pred = np.asarray(pred)
        gt = np.asarray(gt)
        if pred.shape != gt.shape:
            raise CpfcteError(f"{name}: prediction size {pred.shape} differs from the ground "
                              f"truth's {gt.shape}")
        n = self.num_classes
        valid = gt != self.ignore_index
        g = gt[valid].astype(np.int64)
        p = pred[valid].astype(np.int64)
        if g.size and g.max() >= n:
            top = int(g.max())
            why = (f"255 is VOC's boundary band: --ignore-index is {self.ignore_index}, pass "
                   "--ignore-index 255" if top == 255 and self.ignore_index != 255 else
                   "wrong --num-classes or a corrupt mask")
            raise CpfcteError(f"{gt_name or f'the ground truth of {name}'}: ground truth holds "
                              f"label {top} ≥ num_classes {n}; {why}")
        unl = p == self.ignore_index
        bad = (p >= n) & ~unl
        if bad.any():
            raise CpfcteError(f"{name}: prediction holds label {int(p[bad].max())} ≥ num_classes "
                              f"{n}")
        self.unlabelled += np.bincount(g[unl], minlength=n)
        self.matrix += np.bincount(g[~unl] * n + p[~unl], minlength=n * n).reshape(n, n)

    def iou(self) -> list[float | None]:
        tp = np.diag(self.matrix).astype(np.float64)
        gt_count = self.matrix.sum(axis=1) + self.unlabelled
        pred_count = self.matrix.sum(axis=0)
        union = gt_count + pred_count - tp
        return [float(tp[c] / union[c]) if gt_count[c] > 0 else None
                for c in range(self.num_classes)]

    def miou(self) -> float:
        present = [v for v in self.iou() if v is not None]
        if not present:
            raise CpfcteError("mIoU of an empty evaluation (no valid ground-truth pixel)")
        return float(np.mean(present))

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum() + self.unlabelled.sum()
        return float(np.trace(self.matrix) / total) if total else float("nan")

    def summary(self, classes: tuple[str, ...] | None = None) -> dict:
        out = {"miou": self.miou(), "iou": self.iou(), "pixel_accuracy": self.pixel_accuracy(),
               "num_classes": self.num_classes, "ignore_index": self.ignore_index,
               "pixels": int(self.matrix.sum() + self.unlabelled.sum())}
        if classes is not None:
            out["classes"] = list(classes)
        return out


def evaluate_dirs(pred_dir: str | Path, gt_dir: str | Path, num_classes: int, *,
                  ids: list[str] | None = None, ignore_index: int = IGNORE_INDEX,
                  classes: tuple[str, ...] | None = None) -> dict:
    """Score the PNGs of ``pred_dir`` against same-named PNGs of ``gt_dir`` (palette or
    grayscale). With ``ids``, exactly those images are scored and each must exist in both."""
    from cpfcte.machinery.guard import near_copy, refuse_copy, refuse_self_evaluation

    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for d, what in ((pred_dir, "prediction"), (gt_dir, "ground-truth")):
        if not d.is_dir():
            raise CpfcteError(f"{d}: {what} folder not found")
    refuse_self_evaluation(pred_dir, gt_dir)
    if ids is None:
        ids = sorted(p.stem for p in pred_dir.glob("*.png"))
        if not ids:
            raise CpfcteError(f"{pred_dir}: no PNG predictions to evaluate")
    cm = ConfusionMatrix(num_classes, ignore_index)
    identical = 0
    for image_id in ids:
        pred_path = pred_dir / f"{image_id}.png"
        gt_path = gt_dir / f"{image_id}.png"
        if not pred_path.is_file():
            raise CpfcteError(f"{pred_path}: prediction missing for image {image_id}")
        if not gt_path.is_file():
            raise CpfcteError(f"{gt_path}: ground truth missing for image {image_id}")
        pred, gt = read_label_png(pred_path), read_label_png(gt_path)
        identical += near_copy(pred, gt)
        cm.update(pred, gt, name=str(pred_path), gt_name=str(gt_path))
    refuse_copy(identical, len(ids), pred_dir, "predictions")
    result = cm.summary(classes)
    result["images"] = len(ids)
    return result


def headline(metrics: dict) -> dict[str, float]:
    """The mIoU values (%, one decimal) of a stage's metrics.json, by name: BPM, BPM + CRF and
    the model-free references of a pseudo-label run; DeepLabv2 at each test-time level (single
    scale, multi-scale + flip, + CRF)."""
    if metrics.get("stage") == "deeplab":
        if "levels" in metrics:
            scores = {f"DeepLabv2, {v['label']}": v["miou"] for v in metrics["levels"].values()}
        else:                                   # a run folder written before the levels
            scores = {"DeepLabv2": metrics["no_crf"]["miou"]}
            if metrics.get("crf_dir"):
                scores["DeepLabv2 + CRF"] = metrics["miou"]
    else:
        norm = {"pcm": "ViT-PCM normalisation", "none": "Eq. 10 as printed"}
        main = f" ({norm[metrics['bpm_norm']]})" if "bpm_norm" in metrics else ""
        scores = {f"BPM{main}": metrics["miou"]}
        if metrics.get("crf"):
            scores[f"BPM{main} + CRF"] = metrics["crf"]["miou"]
        other = metrics.get("other_norm")
        if other:
            scores[f"BPM ({norm[other['bpm_norm']]})"] = other["miou"]
            if other.get("crf"):
                scores[f"BPM ({norm[other['bpm_norm']]}) + CRF"] = other["crf"]["miou"]
        scores.update({f"reference: {k}": v for k, v in (metrics.get("baselines") or {}).items()})
    return {k: round(100 * v, 1) if v is not None else "no masks" for k, v in scores.items()}


def average_precision(scores, labels) -> float | None:
    """Average precision of one class: the mean, over its positive images, of the precision
    among the images scored at least as high (ties counted pessimistically); None without a
    positive."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels) > 0.5
    if not labels.any():
        return None
    order = np.argsort(-scores, kind="stable")
    ranked_scores, ranked = scores[order], labels[order]
    hits = np.cumsum(ranked)
    # at ties, every tied image counts as ranked above: precision at the end of the tie group
    last_of_group = np.searchsorted(-ranked_scores, -ranked_scores, side="right") - 1
    precision = hits[last_of_group] / (last_of_group + 1)
    return float(precision[ranked].mean())


def label_map(p, y) -> float:
    """Mean average precision of the image-level scores ``p`` (N, C) against the labels ``y``
    over the foreground classes (column 0, the background, is in every image): a threshold-free
    measure of what the classifier has learnt."""
    aps = [average_precision(p[:, c], y[:, c]) for c in range(1, np.asarray(p).shape[1])]
    aps = [a for a in aps if a is not None]
    return float(np.mean(aps)) if aps else float("nan")


def score_or_none(pred_dir: Path, gt: Path | None, voc) -> dict:
    """The scores of a folder of label PNGs against the split's masks, or ``no_masks`` (and no
    mIoU) for a dataset without them."""
    if gt is None:
        return {"miou": None, "iou": None, "no_masks": True, "images": len(voc)}
    return evaluate_dirs(pred_dir, gt, len(voc.classes), ids=voc.ids, classes=voc.classes)
