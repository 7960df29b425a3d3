"""Stage 3, prediction: DeepLabv2 on the val images at three test-time levels, each scored on
its own (Tables 2 and 3; notes 15, 16): single scale; multi-scale (the MSC max over scales 1,
0.75, 0.5, as kazuto1011's test, or the softmax mean over ``test_scales`` × flip); then the
dense CRF (``cfg.test_crf()``: the reference recipe's parameters, or with
``deeplab.test_crf=pseudo`` those the pseudo labels were refined with), run by the same
crash-tolerant pool as the pseudo labels' CRF (``cpfcte.stages.crf_pool``)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cpfcte.machinery import numerics
from cpfcte.machinery.capacity import peak_memory
from cpfcte.machinery.config import Config
from cpfcte.machinery.errors import CpfcteError
from cpfcte.machinery.runfolder import RunFolder, releases_locks
from cpfcte.method.deeplabv2 import DeepLabV2, detect_backbone, msc_logits, unit_range
from cpfcte.stages.deeplab_train import load_deeplab, train_deeplab


@torch.no_grad()
def predict_probs(model: DeepLabV2, image: np.ndarray, scales=(1.0,), flip: bool = False, *,
                  single: bool = False, views: str = "mean", amp: bool = True):
    """Softmax probabilities (C, H, W) of an H×W×3 uint8 image. ``views="mean"``: the mean over
    ``scales`` (and horizontal flips, batched with their image) of the softmax of the logits
    upsampled bilinearly to H×W. ``views="msc_max"`` (kazuto1011's test: his ``MSC`` in eval
    mode): the element-wise max of the logits at scales 1, 0.75, 0.5 (``msc_logits``), upsampled
    to H×W, then the softmax; ``scales`` and ``flip`` are not used. With ``single``, also the
    single-scale probabilities (scale 1, not flipped): ``(probs, single)``. On CUDA the
    network runs under bf16 autocast with ``amp``; the softmax and the mean in float32."""
    device = model.device
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                        enabled=amp and device.type == "cuda"):
        return _predict_probs(model, image, scales, flip, single, views)


def _predict_probs(model, image, scales, flip, single, views):
    device = model.device
    h, w = image.shape[:2]
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].to(device)

    def probs_of(logits: torch.Tensor) -> torch.Tensor:
        return F.interpolate(logits.float(), size=(h, w), mode="bilinear",
                             align_corners=False).softmax(dim=1)

    if views == "msc_max":
        outs = msc_logits(model, x)
        probs = probs_of(outs[-1])[0]
        return (probs, probs_of(outs[0])[0]) if single else probs
    if views != "mean":
        raise CpfcteError(f"deeplab.test_views={views!r} is not mean or msc_max")
    total = torch.zeros((model.num_classes, h, w), device=device)
    n, one = 0, None
    for s in scales:
        xs = x if s == 1.0 else F.interpolate(unit_range(x), size=(max(1, round(h * s)),
                                                                   max(1, round(w * s))),
                                              mode="bilinear", align_corners=False)
        batch = torch.cat([xs, xs.flip(-1)]) if flip else xs
        logits = model(batch)
        if flip:
            logits = torch.cat([logits[:1], logits[1:].flip(-1)])
        probs = probs_of(logits)
        total += probs.sum(dim=0)
        n += len(probs)
        if s == 1.0:
            one = probs[0]
    if not single:
        return total / n
    if one is None:
        one = probs_of(model(x))[0]
    return total / n, one


def crf_classes(probs: np.ndarray, params) -> tuple[np.ndarray, np.ndarray]:
    """The maps the test-time CRF runs over and their classes, ``(probs, classes)``: every
    class (``crf.classes=all``, kazuto1011's), or those whose probability reaches 1e-3
    somewhere in the image, renormalised over them (``image``)."""
    if params.classes == "all":
        return probs, np.arange(len(probs))
    keep = np.flatnonzero(probs.reshape(len(probs), -1).max(1) >= 1e-3)
    sub = probs[keep]
    return sub / sub.sum(0, keepdims=True), keep


# the folder of each test-time level (config.DEEPLAB_TEST_LEVELS), each scored on its own
LEVEL_DIRS = {"single_scale": "pred_ss", "multi_scale": "pred", "crf": "pred_crf"}


def predict_split(model: DeepLabV2, voc, out_dir: Path, cfg: Config,
                  progress: bool = True) -> dict:
    """Write single-scale argmax predictions to ``out_dir/pred_ss``, multi-scale + flip ones to
    ``out_dir/pred`` and, with ``cfg.deeplab.crf``, CRF-refined ones (``cfg.test_crf()``) to
    ``out_dir/pred_crf``: the CRF runs over every class (the reference's; with
    ``crf.classes=image`` over the classes whose probability reaches 1e-3 somewhere in the
    image), in the pseudo labels' crash-tolerant pool (``crf_stage``; a failed
    image is an error naming it, the others are written). Images already written are
    skipped."""
    from cpfcte.machinery.guard import refuse_ground_truth
    from cpfcte.machinery.io import clean_partial, save_label_png
    from cpfcte.machinery.progress import progress_bar
    from cpfcte.stages.crf_pool import CRFJob, crf_stage, raise_on_failures

    use_crf, crf_params = cfg.deeplab.crf, cfg.test_crf()
    single, plain, refined = (out_dir / LEVEL_DIRS[k] for k in LEVEL_DIRS)
    for d in (single, plain, refined):
        refuse_ground_truth(d, "prediction folder")
        d.mkdir(parents=True, exist_ok=True)
        clean_partial(d)
    scales, flip = tuple(cfg.deeplab.test_scales), cfg.deeplab.flip_test

    def predictions() -> Iterator[CRFJob]:
        """Predict each image not yet written; yield its CRF job."""
        for i in progress_bar(range(len(voc)), desc="DeepLabv2 predict", disable=not progress,
                              leave=False):
            image_id = voc.ids[i]
            need_plain = not ((plain / f"{image_id}.png").exists()
                              and (single / f"{image_id}.png").exists())
            need_crf = use_crf and not (refined / f"{image_id}.png").exists()
            if not (need_plain or need_crf):
                continue
            image = np.asarray(voc.image(i), dtype=np.uint8)
            probs, one = predict_probs(model, image, scales, flip, single=True,
                                       views=cfg.deeplab.test_views, amp=cfg.deeplab.amp)
            probs = probs.cpu().numpy()
            if need_plain:
                save_label_png(single / f"{image_id}.png",
                               one.argmax(0).cpu().numpy().astype(np.uint8))
                save_label_png(plain / f"{image_id}.png", probs.argmax(0).astype(np.uint8))
            if need_crf:
                yield CRFJob(str(refined / f"{image_id}.png"), image,
                             *crf_classes(probs, crf_params))

    t0 = time.time()
    if use_crf:
        raise_on_failures(crf_stage(predictions(), crf_params, progress=False), refined)
    else:
        for _ in predictions():
            pass
    return {"seconds": round(time.time() - t0, 2), "single_dir": str(single),
            "pred_dir": str(plain), "crf_dir": str(refined) if use_crf else None}


@releases_locks
def deeplab_stage(cfg: Config, pseudo_dir: str | Path, run_dir: str | Path, *,
                  progress: bool = True) -> dict:
    """Train DeepLabv2 on the pseudo labels (a folder of PNGs or a pseudo-label run folder),
    predict the ``cfg.val_split`` images, score them, write ``metrics.json`` in ``run_dir``."""
    from cpfcte.data import open_split
    from cpfcte.method.metrics import score_or_none

    cfg = detect_backbone(cfg)
    folder = RunFolder(run_dir)
    if folder.from_bundle():            # a release bundle's DeepLabv2: trained, weights only
        summary = folder.summary()
    else:
        summary = train_deeplab(cfg, pseudo_dir, folder.path, progress=progress)
    model = load_deeplab(folder.path, cfg)
    voc = open_split(cfg, cfg.val_split)
    pred = predict_split(model, voc, folder.path / voc.split, cfg, progress=progress)
    gt = voc.gt_dir_or_none()                      # None: a dataset without masks

    def score(path: str) -> dict:
        return score_or_none(Path(path), gt, voc)

    levels = {"single_scale": score(pred["single_dir"]), "multi_scale": score(pred["pred_dir"])}
    if cfg.deeplab.crf:
        levels["crf"] = score(pred["crf_dir"])
    last = list(levels)[-1]
    labels = cfg.deeplab.level_labels()
    metrics = {"stage": "deeplab", "profile": cfg.profile, "dataset": cfg.dataset,
               "split": voc.split, "pseudo_dir": folder.record()["pseudo_dir"],
               "config_digest": summary["digest"], "parameters": summary["parameters"],
               "iterations": summary["iterations_done"], "backbone": cfg.deeplab.backbone,
               "test_scales": list(cfg.deeplab.test_scales), "flip": cfg.deeplab.flip_test,
               "pred_dir": pred["pred_dir"], "crf_dir": pred["crf_dir"],
               "single_dir": pred["single_dir"],
               "test_views": cfg.deeplab.test_views,
               "levels": {k: {"label": labels[k], "miou": v["miou"],
                              "iou": v["iou"]} for k, v in levels.items()},
               "no_crf": {k: levels["multi_scale"][k] for k in ("miou", "iou")},
               "timing": {"predict_seconds": pred["seconds"],
                          "peak_memory_mib": peak_memory(model.device)},
               "weights": cfg.init_stamp(),
               "numerics": numerics.describe(model.device),
               **levels[last],
               "level": f"segmentation (DeepLabv2, {labels[last]})"}
    if cfg.deeplab.crf:
        metrics["crf_params"] = cfg.test_crf().describe()
    folder.write_metrics(metrics)
    return metrics
