"""Stage 2: the baseline pseudo mask (BPM) of Sec. 3.4 (Eq. 10; note 7) and its dense-CRF
refinement (``cpfcte.method.crf``; note 8).

For each image: resize to infer_size × infer_size (the ViT's position embeddings are
interpolated by timm), Z = softmax over classes per patch, zero the classes absent from the
image label (background is always kept), ViT-PCM's normalisation (``bpm_norm=pcm``: each class
map over its maximum, then renormalised over the classes; ``none``: Eq. 10 as printed), bilinear
upsample to the original size, argmax; the CRF starts from the same normalised maps. The
masks are written as palette PNGs, atomically, and images already done are skipped, so a killed
run resumes where it stopped. The stage runs with a ``Config`` derived from the training run's
(``cpfcte.machinery.runfolder.run_config``) and records it in its own run folder, from which DeepLabv2's
config is derived in turn (note 15).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from cpfcte.data.transforms import resized_input
from cpfcte.data.voc import VOCDataset
from cpfcte.machinery import numerics
from cpfcte.machinery.capacity import peak_memory
from cpfcte.machinery.config import BPM_NORMS, Config, derive
from cpfcte.machinery.guard import refuse_ground_truth
from cpfcte.machinery.io import save_label_png
from cpfcte.machinery.runfolder import RunFolder, releases_locks
from cpfcte.method.bpm import bpm_from_probs, bpm_grid, infer_size_for, patch_probs  # noqa: F401
from cpfcte.method.metrics import score_or_none
from cpfcte.method.network import CPFCTE
from cpfcte.stages.crf_pool import raise_on_failures
from cpfcte.stages.evidence import ClassEvidence
from cpfcte.stages.pseudo_runs import training_split_labels

BASELINES = ("background", "uniform")


class InferenceImages(torch.utils.data.Dataset):
    """The images of a split, decoded and resized for inference in DataLoader workers: item
    j is (j, the model's input, (H, W) of the image). Decoding and resizing are deterministic,
    so the inputs are the same bits with 0 or N workers."""

    def __init__(self, voc: VOCDataset, indices: list[int], size: int, mode: str):
        self.voc, self.indices, self.size, self.mode = voc, indices, size, mode

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int):
        img = self.voc.image(self.indices[j])
        return j, resized_input(img, self.size, self.mode), torch.tensor([img.height, img.width])


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
                       norm: str = "pcm", resize: str = "pcm", workers: int = 0,
                       variants: dict[str, tuple[Path, Path | None]] | None = None,
                       amp: bool = True, evidence: ClassEvidence | None = None,
                       progress: bool = True) -> dict:
    """Write the BPM (``norm``) of every image of ``voc`` to ``out_dir/<id>.png`` and, with
    ``probs_dir``, the BPM's grid maps the CRF stage starts from (``<id>.npz``, only the
    classes of the image label); skip the images whose outputs are all present.
    ``variants`` {norm: (bpm folder, probs folder or None)} adds BPMs of other normalisations
    from the same forward pass (Table 1 shows both). ``workers`` DataLoader workers decode and
    resize the images. ``evidence`` (``cpfcte.stages.evidence``) takes each image's patch
    probabilities from the same pass; an image it still lacks is predicted again."""
    from cpfcte.machinery.io import clean_partial
    from cpfcte.machinery.progress import progress_bar
    from cpfcte.method.crf import save_grid_probs

    outputs = {norm: (Path(out_dir), Path(probs_dir) if probs_dir is not None else None)}
    outputs.update(variants or {})
    for bpm_dir, grid_dir in outputs.values():
        for folder in (bpm_dir, grid_dir):
            if folder is not None:
                refuse_ground_truth(folder).mkdir(parents=True, exist_ok=True)
                clean_partial(folder)

    def done(i: int) -> bool:
        return all((b / f"{voc.ids[i]}.png").exists() and
                   (g is None or (g / f"{voc.ids[i]}.npz").exists())
                   for b, g in outputs.values())

    device = next(model.parameters()).device
    todo = [i for i in range(len(voc))
            if not done(i) or (evidence is not None and evidence.wants(i))]
    t0 = time.time()
    bar = progress_bar(total=len(todo), desc=f"pseudo labels @{infer_size}", disable=not progress,
                       leave=False)
    loader = torch.utils.data.DataLoader(
        InferenceImages(voc, todo, infer_size, resize), batch_size=batch_size,
        num_workers=workers, pin_memory=device.type == "cuda")
    align = resize == "pcm"
    for js, x, sizes in loader:
        probs = patch_probs(model, x.to(device, non_blocking=True), amp)
        for b, (j, (h, w)) in enumerate(zip(js.tolist(), sizes.tolist())):
            i = todo[j]
            labels = torch.from_numpy(voc.labels(i)).to(device)
            if evidence is not None:
                evidence.add(i, probs[b].cpu().numpy())
            for variant, (bpm_dir, grid_dir) in outputs.items():
                if grid_dir is not None:
                    maps = bpm_grid(probs[b][None], labels[None], variant)[0]
                    save_grid_probs(grid_dir / f"{voc.ids[i]}.npz", maps.cpu().numpy(),
                                    labels.cpu().numpy())
                save_label_png(bpm_dir / f"{voc.ids[i]}.png",
                               bpm_from_probs(probs[b], labels, (h, w), norm=variant,
                                              align_corners=align))
        bar.update(len(js))
    bar.close()
    if evidence is not None:
        evidence.save()
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


@releases_locks
def pseudo_stage(cfg: Config, train_run: str | Path, run_dir: str | Path, *, crf: bool = True,
                 baselines: bool = True, both_norms: bool = False,
                 progress: bool = True) -> dict:
    """Make the BPMs of the ``cfg.pseudo_split`` images with the model of ``train_run`` and
    (with ``crf``) their dense-CRF refinement (``cfg.crf``), score both, and write
    ``metrics.json`` in ``run_dir``. ``cfg`` is the training run's config or one derived from
    it (other inference size, split, BPM normalisation, CRF settings, device); it is recorded
    in ``run_dir``. With ``both_norms`` the BPM of the other normalisation (``bpm_norm``) is
    made too, with its CRF, and scored under ``metrics["other_norm"]`` (Table 1's rows)."""
    from cpfcte.data import open_split
    from cpfcte.method.metrics import evaluate_dirs
    from cpfcte.stages.train import load_trained

    numerics.apply(cfg)
    model, cfg = load_trained(train_run, cfg)
    folder = RunFolder(run_dir).start(
        "pseudo", cfg, {"training": cfg.digest(), "crf": cfg.crf.parameters(),
                        "bpm_norm": cfg.bpm_norm, "both_norms": both_norms},
        train_run=str(train_run))
    patch = model.patch_size[0]
    size = infer_size_for(cfg, patch)
    split = cfg.pseudo_split
    voc = open_split(cfg, split)
    bpm_dir = folder.path / f"bpm_{split}_{size}"
    probs_dir = folder.path / f"probs_{split}_{size}" if crf else None
    other = next(n for n in BPM_NORMS if n != cfg.bpm_norm)
    variants = ({other: (folder.path / f"bpm_{other}_{split}_{size}",
                         folder.path / f"probs_{other}_{split}_{size}" if crf else None)}
                if both_norms else {})
    gt = voc.gt_dir_or_none()                      # None: a dataset without masks
    evidence = (ClassEvidence(voc, cfg.pooling, cfg.k, folder.path / f"evidence_{split}_{size}.json")
                if gt is not None else None)
    timing = make_pseudo_labels(model, voc, bpm_dir, infer_size=size, probs_dir=probs_dir,
                                batch_size=cfg.infer_batch, norm=cfg.bpm_norm,
                                resize=cfg.resize, workers=cfg.infer_workers,
                                variants=variants, amp=cfg.amp, evidence=evidence,
                                progress=progress)
    scores = score_or_none(bpm_dir, gt, voc)
    metrics = {
        "stage": "pseudo_labels", "level": "pseudo-label (BPM, no CRF)", "profile": cfg.profile,
        "dataset": cfg.dataset, "split": split, "train_run": str(Path(train_run)),
        "config_digest": cfg.digest(), "infer_size": size, "patches_per_side": size // patch,
        "bpm_norm": cfg.bpm_norm, "bpm_dir": str(bpm_dir), **scores, "timing": timing,
        "numerics": numerics.describe(next(model.parameters()).device),
    }
    if evidence is not None:                       # where each class's image score comes from
        metrics["evidence"] = evidence.rows()
    if crf:
        metrics["crf"] = crf_refine(voc, probs_dir, folder.path / f"crf_{split}_{size}", gt,
                                    cfg, progress=progress)
    for norm, (other_bpm, other_probs) in variants.items():
        metrics["other_norm"] = {"bpm_norm": norm, "bpm_dir": str(other_bpm),
                                 **score_or_none(other_bpm, gt, voc)}
        if crf:
            metrics["other_norm"]["crf"] = crf_refine(
                voc, other_probs, folder.path / f"crf_{norm}_{split}_{size}", gt, cfg,
                progress=progress)
    if baselines and gt is not None:
        metrics["baselines"] = {
            kind: evaluate_dirs(path, gt, len(voc.classes), ids=voc.ids)["miou"]
            for kind, path in write_baselines(voc, folder.path / "baselines").items()}
    metrics["timing"]["peak_memory_mib"] = peak_memory(next(model.parameters()).device)
    folder.write_metrics(metrics)
    return metrics


def crf_refine(voc: VOCDataset, probs_dir: Path, out_dir: Path, gt: Path | None, cfg: Config,
               progress: bool = True) -> dict:
    """The CRF stage over a split; scored against ``gt``. A failed image is an error naming
    it (after every other image was written, so a rerun only redoes the failures)."""
    from cpfcte.stages.crf_pool import CRFJob, crf_stage

    jobs = [CRFJob(str(out_dir / f"{image_id}.png"), str(voc.image_path(i)),
                   str(probs_dir / f"{image_id}.npz"), num_classes=len(voc.classes))
            for i, image_id in enumerate(voc.ids)]
    run = crf_stage(jobs, cfg.crf, progress=progress)
    raise_on_failures(run, out_dir)
    scores = score_or_none(out_dir, gt, voc)
    return {"level": "pseudo-label (BPM + dense CRF)", "crf_dir": str(out_dir),
            "params": cfg.crf.parameters(), "params_text": cfg.crf.describe(), **scores,
            "timing": {k: v for k, v in run.items() if k != "failed"}}


def ensure_pseudo_labels(profile: str, pseudo_run: str | Path, train_run: str | Path,
                         progress: bool = True) -> Path:
    """The pseudo-label run that DeepLabv2 learns from: ``pseudo_run`` when it holds the CRF
    pseudo labels of its training split, else made now from ``train_run`` (trained first when
    needed) on that run's training split."""
    from cpfcte.stages.train import ensure_trained

    folder = RunFolder(pseudo_run)
    if (folder.path / "config.json").is_file() and training_split_labels(folder):
        return folder.path
    train_dir = ensure_trained(profile, train_run, progress=progress)
    trained = RunFolder(train_dir).config()
    pseudo_stage(derive(trained, {"pseudo_split": trained.train_split}), train_dir, folder.path,
                 baselines=False, progress=progress)
    return folder.path
