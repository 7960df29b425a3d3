"""Predictions on any folder of images, with a trained run: stage 1 (BPM, optionally + dense
CRF) or DeepLabv2 (multi-scale + flip, optionally + CRF).

    cpfcte predict --run RUN --images DIR --out DIR [--crf] [--scores] [--threshold auto]

Writes, per image: ``labels/<stem>.png`` in the VOC palette (class-index PNGs look black in an
image viewer; the palette colours them and keeps the index), ``overlays/<stem>.jpg`` (the
colours over the image, half transparent) and, with ``--scores`` (stage 1), ``scores/<stem>.npz``:
the per-class patch probabilities ``z`` (C × h × w, background first), the image-level scores
``image_scores`` (the run's pooling over the patches, as in training) and ``classes``.

Without image-level labels, a stage-1 run decides which classes may appear from its own image
scores: a class is kept when its pooled score exceeds ``threshold``; background is always kept.
By default (``auto``) the threshold is the run's own, calibrated on its training labels
(``cpfcte.stages.threshold``: the best F1; a fixed 0.5 keeps almost nothing on the toy); a
number is used as given. The BPM is then Eq. 10 with those classes. Overlays are drawn in the
dataset's palette (the toy's follows its class names) with each object outlined; the label
PNGs keep VOC's palette. A DeepLabv2 run predicts every class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cpfcte.machinery.errors import CpfcteError


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5,
            palette: np.ndarray | None = None) -> np.ndarray:
    """The label colours over the image (background and 255 left as the image), each region's
    edge drawn solid in its colour, so that a dark colour on a dark object still shows."""
    from cpfcte.machinery.io import colorize

    colours = colorize(labels, palette).astype(np.float32)
    keep = ((labels == 0) | (labels == 255))[..., None]
    mixed = (1 - alpha) * image.astype(np.float32) + alpha * colours
    edge = np.zeros(labels.shape, dtype=bool)
    edge[1:] |= labels[1:] != labels[:-1]
    edge[:-1] |= labels[1:] != labels[:-1]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[:, :-1] |= labels[:, 1:] != labels[:, :-1]
    out = np.where(keep, image.astype(np.float32), mixed)
    out = np.where((edge & ~keep[..., 0])[..., None], colours, out)
    return out.round().clip(0, 255).astype(np.uint8)


def image_classes(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """The multi-hot classes of one image from its pooled scores (C,), background always."""
    keep = (scores > threshold).to(scores.dtype)
    keep[0] = 1
    return keep


@torch.no_grad()
def predict_folder(run: str | Path, images: str | Path | None, out: str | Path, *,
                   crf: bool = False,
                   scores: bool = False, threshold: float | str = "auto",
                   device: str | None = None,
                   limit: int | None = None, force: bool = False, progress: bool = True) -> dict:
    """Predict every image of ``images`` (None: the run's own dataset's ``JPEGImages``; the
    first ``limit`` by name, when given) with the run folder ``run``; see the module doc.
    ``out`` must be new, empty or an earlier prediction's (``force``: a folder of yours), may
    not overlap the images or lie in a dataset; every image is decoded once before anything is
    written, so a bad file is an error naming it and no output."""
    from PIL import Image

    from cpfcte.machinery.io import atomic_path, read_image, save_label_png, write_json
    from cpfcte.machinery.progress import progress_bar
    from cpfcte.machinery.runfolder import RunFolder
    from cpfcte.machinery.safety import (
        Outputs,
        check_folder,
        mark,
        refuse_alias,
        refuse_inside_dataset,
    )

    if limit is not None and limit < 1:
        raise CpfcteError(f"--limit {limit}: must be ≥ 1 (the number of images to predict)")
    folder = RunFolder(run)
    stage = folder.stage
    if stage not in ("train", "deeplab"):
        raise CpfcteError(f"{folder.path}: a {stage or 'unknown'} run; predict takes a stage-1 "
                          "training run or a DeepLabv2 run")
    if threshold not in (None, "auto"):
        from cpfcte.stages.threshold import resolve_threshold

        resolve_threshold(folder.path, threshold)     # a bad number fails before any work
    if scores and stage != "train":
        raise CpfcteError("--scores: patch scores exist for stage-1 runs only")
    from cpfcte.data import dataset_root
    from cpfcte.data.folder import list_images

    cfg = folder.config()
    source = Path(images) if images is not None else dataset_root(cfg) / "JPEGImages"
    files = list_images(source)[:limit]
    same = _same_stems(files)
    if same:
        raise CpfcteError(f"{source}: {same[0].name} and {same[1].name} would write the same "
                          f"outputs ({same[0].stem}.png, {same[0].stem}.jpg); rename one")
    out = Path(out)
    refuse_alias([out / "labels", out / "overlays", out / "scores", out / "predict.json"],
                 [source, folder.path], "cpfcte predict")
    refuse_inside_dataset(out, "prediction folder")
    check_folder(out, "predict", force=force)
    for path in progress_bar(files, desc="checking images", disable=not progress, leave=False):
        read_image(path)                       # a bad file fails here, before any output
    if device:
        from cpfcte.machinery.config import derive

        cfg = derive(cfg, {"device": device})
    if stage == "train":
        from cpfcte.data.transforms import aligned, resized_input
        from cpfcte.method.bpm import bpm_from_probs, crf_start, patch_probs
        from cpfcte.method.topk_pooling import pool
        from cpfcte.stages.pseudo_labels import infer_size_for
        from cpfcte.stages.threshold import resolve_threshold
        from cpfcte.stages.train import load_trained

        threshold, chosen = resolve_threshold(folder.path, threshold, progress)
        if progress:
            import sys

            print(f"classes kept when p > {threshold} ({chosen})", file=sys.stderr, flush=True)
        model, cfg = load_trained(folder.path, cfg)
        size = infer_size_for(cfg, model.patch_size[0])
        classes = _classes(cfg)
    else:
        from cpfcte.stages.deeplab_predict import predict_probs
        from cpfcte.stages.deeplab_train import load_deeplab

        model = load_deeplab(folder.path, cfg)
        classes = _classes(cfg)
    from cpfcte.data import palette_for

    palette = palette_for(classes)
    device_ = next(model.parameters()).device
    crf_params = (cfg.crf if stage == "train" else cfg.test_crf()) if crf else None
    kept = {}
    # the files this prediction writes; an earlier one's that it does not write again go, and
    # nothing else in the folder is touched (--force included)
    written = Outputs(out, ("labels", "overlays", "scores"))
    mark(out, "predict")
    written.plan([f"{sub}/{f.stem}.{ext}" for f in files
                  for sub, ext in (("labels", "png"), ("overlays", "jpg"))
                  + ((("scores", "npz"),) if scores and stage == "train" else ())]
                 + ["predict.json"])
    for path in progress_bar(files, desc="predict", disable=not progress):
        rgb = read_image(path)
        image = np.asarray(rgb, dtype=np.uint8)
        h, w = image.shape[:2]
        if stage == "train":                   # as the pseudo-label stage: Eq. 10, then the CRF
            x = resized_input(rgb, size, cfg.resize)[None].to(device_)
            grid = patch_probs(model, x)[0]                                 # (C, h, w)
            pooled = pool(grid.flatten(1).T[None], cfg.pooling, cfg.k)[0]   # (C,)
            keep = image_classes(pooled, threshold)
            present = torch.nonzero(keep).flatten().cpu().numpy()
            labels = bpm_from_probs(grid, keep, (h, w), norm=cfg.bpm_norm,
                                    align_corners=aligned(cfg))
            if crf_params is not None:
                from cpfcte.method.crf import crf_labels

                probs, present = crf_start(grid, keep, (h, w), norm=cfg.bpm_norm,
                                           params=crf_params)
                labels = crf_labels(image, probs, present, crf_params)
            if scores:
                (out / "scores").mkdir(parents=True, exist_ok=True)
                with atomic_path(out / "scores" / f"{path.stem}.npz") as tmp:
                    with open(tmp, "wb") as fh:
                        np.savez_compressed(fh, z=grid.cpu().numpy().astype(np.float32),
                                            image_scores=pooled.cpu().numpy().astype(np.float32),
                                            classes=np.array(classes))
            kept[path.stem] = [classes[i] for i in present if i > 0]
        else:                                  # as DeepLabv2's prediction of val
            probs = predict_probs(model, image, tuple(cfg.deeplab.test_scales),
                                  cfg.deeplab.flip_test,
                                  views=cfg.deeplab.test_views).cpu().numpy()
            labels = probs.argmax(0).astype(np.uint8)
            if crf_params is not None:
                from cpfcte.method.crf import crf_labels
                from cpfcte.stages.deeplab_predict import crf_classes

                labels = crf_labels(image, *crf_classes(probs, crf_params), crf_params)
        save_label_png(out / "labels" / f"{path.stem}.png", labels, palette=True)
        (out / "overlays").mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "overlays" / f"{path.stem}.jpg") as tmp:
            Image.fromarray(overlay(image, labels, palette=palette)).save(tmp, format="JPEG", quality=90)
    report = {"run": str(folder.path), "stage": stage, "images": len(files),
              "out": str(out), "crf": crf_params.describe() if crf_params else None,
              "classes": list(classes)}
    if stage == "train":
        report.update(threshold=threshold, threshold_chosen=chosen, infer_size=size,
                      classes_kept=kept)
    write_json(out / "predict.json", report)
    written.finish()
    return report


def _same_stems(files: list[Path]) -> tuple[Path, Path] | None:
    """Two images whose outputs would collide (the same name but for the suffix)."""
    seen: dict[str, Path] = {}
    for f in files:
        if f.stem in seen:
            return seen[f.stem], f
        seen[f.stem] = f
    return None


def _classes(cfg) -> tuple[str, ...]:
    from cpfcte.data import classes_of

    return classes_of(cfg)
