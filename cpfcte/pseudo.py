"""Stage 2: the baseline pseudo mask (BPM) of Sec. 3.4 (Eq. 10; note 7) and its dense-CRF
refinement (``cpfcte.crf``; note 8).

For each image: resize to infer_size × infer_size (the ViT's position embeddings are
interpolated by timm), Z = softmax over classes per patch, zero the classes absent from the
image label (background is always kept), bilinear upsample to the original size, argmax. The
masks are written as palette PNGs, atomically, and images already done are skipped, so a killed
run resumes where it stopped. The stage runs with a ``Config`` derived from the training run's
(``cpfcte.runfolder.run_config``) and records it in its own run folder, from which DeepLabv2's
config is derived in turn (note 15).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cpfcte import numerics
from cpfcte.config import Config, derive
from cpfcte.data.voc import VOCDataset
from cpfcte.errors import CpfcteError
from cpfcte.guard import refuse_ground_truth
from cpfcte.io import save_label_png
from cpfcte.model import CPFCTE
from cpfcte.runfolder import METRICS, RunFolder, releases_locks

BASELINES = ("background", "uniform")


def mask_absent_classes(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Zero the probability maps (B, C, h, w) of classes absent from the image labels (B, C)."""
    return probs * labels[:, :, None, None].to(probs.dtype)


def bpm_from_probs(probs: torch.Tensor, labels: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """One image: patch-grid probabilities (C, h, w) → H×W label map (uint8)."""
    masked = mask_absent_classes(probs[None], labels[None])
    up = torch.nn.functional.interpolate(masked, size=size, mode="bilinear", align_corners=False)
    return up[0].argmax(dim=0).to(torch.uint8).cpu().numpy()


def resized_input(image: Image.Image, size: int) -> torch.Tensor:
    """An RGB image resized (bilinear) to ``size``×``size``: the model's uint8 (3, S, S) input
    at inference."""
    return torch.from_numpy(np.asarray(image.resize((size, size), Image.BILINEAR),
                                       dtype=np.uint8).transpose(2, 0, 1).copy())


@torch.no_grad()
def patch_probs(model: CPFCTE, images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, S, S) → Z as maps (B, C, h, w), float32."""
    out = model(images)
    z, (h, w) = out["z"], out["grid"]
    return z.float().transpose(1, 2).reshape(z.shape[0], z.shape[2], h, w)


def baseline_mask(kind: str, labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Reference masks scored beside the model (they need no model):

    * ``background``: every pixel background.
    * ``uniform``: Z uniform over the image's labels, then argmax with ties broken towards
      foreground, i.e. every pixel gets the image's first foreground class.
    """
    if kind == "background":
        return np.zeros(size, dtype=np.uint8)
    if kind == "uniform":
        fg = np.flatnonzero(labels[1:] > 0)
        return np.full(size, fg[0] + 1 if fg.size else 0, dtype=np.uint8)
    raise ValueError(kind)


def make_pseudo_labels(model: CPFCTE, voc: VOCDataset, out_dir: str | Path, *, infer_size: int,
                       batch_size: int = 8, probs_dir: str | Path | None = None,
                       progress: bool = True) -> dict:
    """Write the BPM of every image of ``voc`` to ``out_dir/<id>.png`` and, with ``probs_dir``,
    the masked patch-grid probabilities the CRF stage starts from (``<id>.npz``, only the
    classes of the image label); skip the images whose outputs are all present."""
    from cpfcte.crf import save_grid_probs
    from cpfcte.io import clean_partial
    from cpfcte.progress import progress_bar

    out_dir = refuse_ground_truth(Path(out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    clean_partial(out_dir)
    if probs_dir is not None:
        probs_dir = refuse_ground_truth(Path(probs_dir))
        probs_dir.mkdir(parents=True, exist_ok=True)
        clean_partial(probs_dir)

    def done(i: int) -> bool:
        return (out_dir / f"{voc.ids[i]}.png").exists() and (
            probs_dir is None or (probs_dir / f"{voc.ids[i]}.npz").exists())

    device = next(model.parameters()).device
    todo = [i for i in range(len(voc)) if not done(i)]
    t0 = time.time()
    bar = progress_bar(total=len(todo), desc=f"pseudo labels @{infer_size}", disable=not progress,
               leave=False)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        imgs = [voc.image(i) for i in chunk]
        x = torch.stack([resized_input(im, infer_size) for im in imgs]).to(device)
        probs = patch_probs(model, x)
        for j, i in enumerate(chunk):
            labels = torch.from_numpy(voc.labels(i)).to(device)
            w, h = imgs[j].size
            if probs_dir is not None:
                save_grid_probs(probs_dir / f"{voc.ids[i]}.npz", probs[j].cpu().numpy(),
                                labels.cpu().numpy())
            save_label_png(out_dir / f"{voc.ids[i]}.png", bpm_from_probs(probs[j], labels, (h, w)))
        bar.update(len(chunk))
    bar.close()
    return {"written": len(todo), "skipped": len(voc) - len(todo),
            "seconds": round(time.time() - t0, 3)}


def write_baselines(voc: VOCDataset, out_root: str | Path) -> dict[str, Path]:
    """Write the reference masks of every image (see ``baseline_mask``) under out_root/<kind>."""
    out = {}
    for kind in BASELINES:
        folder = refuse_ground_truth(Path(out_root) / kind)
        for i, image_id in enumerate(voc.ids):
            path = folder / f"{image_id}.png"
            if not path.exists():
                w, h = voc.image_size(i)
                save_label_png(path, baseline_mask(kind, voc.labels(i), (h, w)))
        out[kind] = folder
    return out


def infer_size_for(cfg: Config, patch: int) -> int:
    """The inference size: ``infer_scale`` × the training size rounded to whole patches (Fig. 5
    sweeps patches per side: 24..72 for ViT-B/16 at 384) when it is set, else ``infer_size``."""
    if cfg.infer_scale:
        size = max(1, round(cfg.img_size * float(cfg.infer_scale) / patch)) * patch
    else:
        size = int(cfg.infer_size)
    if size % patch:
        raise CpfcteError(f"infer_size={size} is not a multiple of the patch size {patch}")
    return size


@releases_locks
def pseudo_stage(cfg: Config, train_run: str | Path, run_dir: str | Path, *, crf: bool = True,
                 baselines: bool = True, progress: bool = True) -> dict:
    """Make the BPMs of the ``cfg.pseudo_split`` images with the model of ``train_run`` and
    (with ``crf``) their dense-CRF refinement (``cfg.crf``), score both, and write
    ``metrics.json`` in ``run_dir``. ``cfg`` is the training run's config or one derived from
    it (other inference size, split, CRF settings, device); it is recorded in ``run_dir``."""
    from cpfcte.data import open_split
    from cpfcte.metrics import evaluate_dirs
    from cpfcte.train import load_trained

    numerics.apply(cfg)
    model, cfg = load_trained(train_run, cfg)
    folder = RunFolder(run_dir).start(
        "pseudo", cfg, {"training": cfg.digest(), "crf": cfg.crf.parameters()},
        train_run=str(train_run))
    patch = model.patch_size[0]
    size = infer_size_for(cfg, patch)
    split = cfg.pseudo_split
    voc = open_split(cfg, split)
    bpm_dir = folder.path / f"bpm_{split}_{size}"
    probs_dir = folder.path / f"probs_{split}_{size}" if crf else None
    timing = make_pseudo_labels(model, voc, bpm_dir, infer_size=size, probs_dir=probs_dir,
                                batch_size=cfg.infer_batch, progress=progress)
    gt = voc.gt_dir_or_none()                      # None: a dataset without masks
    scores = score_or_none(bpm_dir, gt, voc)
    metrics = {
        "stage": "pseudo_labels", "level": "pseudo-label (BPM, no CRF)", "profile": cfg.profile,
        "dataset": cfg.dataset, "split": split, "train_run": str(Path(train_run)),
        "config_digest": cfg.digest(), "infer_size": size, "patches_per_side": size // patch,
        "bpm_dir": str(bpm_dir), **scores, "timing": timing,
        "numerics": numerics.describe(next(model.parameters()).device),
    }
    if gt is not None:                             # where each class's image score comes from
        from cpfcte.explore import class_evidence

        metrics["evidence"] = class_evidence(model, cfg, voc)
    if crf:
        metrics["crf"] = crf_refine(voc, probs_dir, folder.path / f"crf_{split}_{size}", gt,
                                    cfg, progress=progress)
    if baselines and gt is not None:
        metrics["baselines"] = {
            kind: evaluate_dirs(path, gt, len(voc.classes), ids=voc.ids)["miou"]
            for kind, path in write_baselines(voc, folder.path / "baselines").items()}
    folder.write_metrics(metrics)
    return metrics


def score_or_none(pred_dir: Path, gt: Path | None, voc: VOCDataset) -> dict:
    """The scores of a folder of label PNGs against the split's masks, or ``no_masks`` (and no
    mIoU) for a dataset without them."""
    from cpfcte.metrics import evaluate_dirs

    if gt is None:
        return {"miou": None, "iou": None, "no_masks": True}
    return evaluate_dirs(pred_dir, gt, len(voc.classes), ids=voc.ids, classes=voc.classes)


def crf_refine(voc: VOCDataset, probs_dir: Path, out_dir: Path, gt: Path | None, cfg: Config,
               progress: bool = True) -> dict:
    """The CRF stage over a split; scored against ``gt``. A failed image is an error naming
    it (after every other image was written, so a rerun only redoes the failures)."""
    from cpfcte.crf import CRFJob, crf_stage

    jobs = [CRFJob(str(out_dir / f"{image_id}.png"), str(voc.image_path(i)),
                   str(probs_dir / f"{image_id}.npz")) for i, image_id in enumerate(voc.ids)]
    run = crf_stage(jobs, cfg.crf, progress=progress)
    raise_on_failures(run, out_dir)
    scores = score_or_none(out_dir, gt, voc)
    return {"level": "pseudo-label (BPM + dense CRF)", "crf_dir": str(out_dir),
            "params": cfg.crf.parameters(), "params_text": cfg.crf.describe(), **scores,
            "timing": {k: v for k, v in run.items() if k != "failed"}}


def raise_on_failures(run: dict, out_dir: Path) -> None:
    """A CRF stage with failed images is an error naming them (the others are written)."""
    if run["failed"]:
        first = next(iter(run["failed"].items()))
        raise CpfcteError(f"dense CRF failed on {len(run['failed'])} image(s), e.g. {first[0]}: "
                          f"{first[1]}; the others are written to {out_dir}; rerun to retry")


def ensure_pseudo_labels(profile: str, pseudo_run: str | Path, train_run: str | Path,
                         progress: bool = True) -> Path:
    """The pseudo-label run that DeepLabv2 learns from: ``pseudo_run`` when it holds the CRF
    pseudo labels of its training split, else made now from ``train_run`` (trained first when
    needed) on that run's training split."""
    from cpfcte.train import ensure_trained

    folder = RunFolder(pseudo_run)
    if (folder.path / "config.json").is_file() and _training_split_labels(folder):
        return folder.path
    train_dir = ensure_trained(profile, train_run, progress=progress)
    trained = RunFolder(train_dir).config()
    pseudo_stage(derive(trained, {"pseudo_split": trained.train_split}), train_dir, folder.path,
                 baselines=False, progress=progress)
    return folder.path


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
    labels = _training_split_labels(folder)
    if labels is None:
        split = folder.config().train_split
        raise CpfcteError(f"{folder.path}: holds no CRF pseudo labels of the training split "
                          f"{split!r}; make them with `cpfcte pseudo --split {split}` (or "
                          f"notebook 03 with split={split!r})")
    return labels


def _training_split_labels(folder: RunFolder) -> Path | None:
    """The CRF pseudo labels of a pseudo-label run's training split, if it made them."""
    m = folder.metrics() if (folder.path / METRICS).exists() else {}
    if m.get("crf") and m.get("split") == folder.config().train_split:
        return Path(m["crf"]["crf_dir"])
    return None
