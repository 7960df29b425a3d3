"""Stage 2 without CRF: the baseline pseudo mask (BPM) of Sec. 3.4 (Eq. 10; DESIGN note 7).

For each image: resize to infer_size × infer_size (the ViT's position embeddings are
interpolated by timm), Z = softmax over classes per patch, zero the classes absent from the
image label (background is always kept), bilinear upsample to the original size, argmax. The
masks are written as palette PNGs, atomically, and images already done are skipped, so a killed
run resumes where it stopped.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cpfcte.data.voc import VOCDataset
from cpfcte.guard import refuse_ground_truth
from cpfcte.io import save_label_png
from cpfcte.model import CPFCTE, upsample_probs

BASELINES = ("background", "uniform")


def mask_absent_classes(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Zero the probability maps (B, C, h, w) of classes absent from the image labels (B, C)."""
    return probs * labels[:, :, None, None].to(probs.dtype)


def bpm_from_probs(probs: torch.Tensor, labels: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """One image: patch-grid probabilities (C, h, w) → H×W label map (uint8)."""
    masked = mask_absent_classes(probs[None], labels[None])
    up = torch.nn.functional.interpolate(masked, size=size, mode="bilinear", align_corners=False)
    return up[0].argmax(dim=0).to(torch.uint8).cpu().numpy()


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
    from cpfcte.progress import progress_bar as tqdm

    from cpfcte.crf import clean_partial, save_grid_probs

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
    bar = tqdm(total=len(todo), desc=f"pseudo labels @{infer_size}", disable=not progress,
               leave=False)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        imgs = [voc.image(i) for i in chunk]
        x = torch.stack([torch.from_numpy(np.asarray(
            im.resize((infer_size, infer_size), Image.BILINEAR), dtype=np.uint8).transpose(2, 0, 1).copy())
            for im in imgs]).to(device)
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


def infer_size_for(cfg, patch: int, infer_scale: float | None = None,
                   infer_size: int | None = None) -> int:
    """The inference size: explicit, or ``infer_scale`` × the training size rounded to whole
    patches (Fig. 5 sweeps patches per side: 24..72 for ViT-B/16 at 384), else the profile's."""
    if infer_size:
        size = int(infer_size)
    elif infer_scale:
        size = max(1, round(cfg.img_size * float(infer_scale) / patch)) * patch
    else:
        size = cfg.infer_size
    if size % patch:
        from cpfcte.errors import CpfcteError

        raise CpfcteError(f"infer_size={size} is not a multiple of the patch size {patch}")
    return size


def pseudo_stage(train_run: str | Path, run_dir: str | Path, *, infer_size: int | None = None,
                 infer_scale: float | None = None, split: str | None = None,
                 baselines: bool = True, crf: bool = True, crf_overrides: dict | None = None,
                 device: str = "auto", progress: bool = True) -> dict:
    """Make the BPMs of a trained run and (with ``crf``) their dense-CRF refinement, score
    both, and write ``metrics.json`` in ``run_dir``. ``crf_overrides`` replaces fields of the
    trained run's CRF parameters (``crf_bilateral_sxy=50``, ...)."""
    from cpfcte.config import config_from_dict
    from cpfcte.data import classes_for, dataset_root
    from cpfcte.data.voc import gt_dir
    from cpfcte.io import write_json
    from cpfcte.metrics import evaluate_dirs
    from cpfcte.train import load_trained

    run_dir = Path(run_dir)
    model, cfg = load_trained(train_run, device=device)
    if crf_overrides:
        from cpfcte.config import check_keys

        check_keys(crf_overrides, "crf_overrides")
        cfg = config_from_dict({**cfg.to_dict(), **crf_overrides}).validate()
    patch = model.patch_size[0]
    size = infer_size_for(cfg, patch, infer_scale, infer_size)
    split = split or cfg.pseudo_split
    classes = classes_for(cfg.dataset)
    root = dataset_root(cfg)
    voc = VOCDataset(root, split, classes)
    bpm_dir = run_dir / f"bpm_{split}_{size}"
    probs_dir = run_dir / f"probs_{split}_{size}" if crf else None
    timing = make_pseudo_labels(model, voc, bpm_dir, infer_size=size, probs_dir=probs_dir,
                                batch_size=cfg.infer_batch, progress=progress)
    gt = gt_dir(root, split)
    scores = evaluate_dirs(bpm_dir, gt, len(classes), ids=voc.ids, classes=classes)
    metrics = {
        "stage": "pseudo_labels", "level": "pseudo-label (BPM, no CRF)", "profile": cfg.profile,
        "dataset": cfg.dataset, "split": split, "train_run": str(Path(train_run)),
        "config_digest": cfg.digest(), "infer_size": size, "patches_per_side": size // patch,
        "bpm_dir": str(bpm_dir), **scores, "timing": timing,
    }
    if crf:
        metrics["crf"] = crf_refine(voc, probs_dir, run_dir / f"crf_{split}_{size}", gt, cfg,
                                    progress=progress)
    if baselines:
        metrics["baselines"] = {
            kind: evaluate_dirs(folder, gt, len(classes), ids=voc.ids)["miou"]
            for kind, folder in write_baselines(voc, run_dir / "baselines").items()}
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def crf_refine(voc: VOCDataset, probs_dir: Path, out_dir: Path, gt: Path, cfg,
               progress: bool = True) -> dict:
    """The CRF stage over a split; scored against ``gt``. A failed image is an error naming
    it (after every other image was written, so a rerun only redoes the failures)."""
    from cpfcte.crf import crf_stage
    from cpfcte.errors import CpfcteError
    from cpfcte.metrics import evaluate_dirs

    params = cfg.crf_params()
    jobs = [(str(voc.image_path(i)), str(probs_dir / f"{image_id}.npz"),
             str(out_dir / f"{image_id}.png")) for i, image_id in enumerate(voc.ids)]
    run = crf_stage(jobs, params, workers=cfg.crf_workers, progress=progress)
    if run["failed"]:
        first = next(iter(run["failed"].items()))
        raise CpfcteError(f"dense CRF failed on {len(run['failed'])} image(s), e.g. {first[0]}: "
                          f"{first[1]}; the others are written to {out_dir}")
    scores = evaluate_dirs(out_dir, gt, len(voc.classes), ids=voc.ids, classes=voc.classes)
    from dataclasses import asdict

    return {"level": "pseudo-label (BPM + dense CRF)", "crf_dir": str(out_dir),
            "params": asdict(params), "params_text": params.describe(), **scores,
            "timing": {k: v for k, v in run.items() if k != "failed"}}


def ensure_pseudo_labels(profile: str, pseudo_run: str | Path, train_run: str | Path,
                         split: str, progress: bool = True) -> Path:
    """The CRF-refined pseudo labels of ``split`` for DeepLab training: those of
    ``pseudo_run`` when it made them, else made now (training ``train_run`` first if needed)."""
    from cpfcte.io import read_json
    from cpfcte.train import ensure_trained

    pseudo_run = Path(pseudo_run)
    saved = pseudo_run / "metrics.json"
    if saved.exists():
        m = read_json(saved)
        if m.get("split") == split and m.get("crf"):
            return Path(m["crf"]["crf_dir"])
    ensure_trained(profile, train_run, progress=progress)
    m = pseudo_stage(train_run, pseudo_run, split=split, baselines=False, progress=progress)
    return Path(m["crf"]["crf_dir"])
