"""Stage 2: the baseline pseudo mask (BPM) of Sec. 3.4 (Eq. 10; note 7) and its dense-CRF
refinement (``cpfcte.crf``; note 8).

For each image: resize to infer_size × infer_size (the ViT's position embeddings are
interpolated by timm), Z = softmax over classes per patch, zero the classes absent from the
image label (background is always kept), ViT-PCM's normalisation (``bpm_norm=pcm``: each class
map over its maximum, then renormalised over the classes; ``none``: Eq. 10 as printed), bilinear
upsample to the original size, argmax; the CRF starts from the same normalised maps. The
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
from cpfcte.config import BPM_NORMS, Config, derive
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


def bpm_grid(probs: torch.Tensor, labels: torch.Tensor, norm: str = "pcm") -> torch.Tensor:
    """The BPM's maps on the patch grid, (B, C, h, w) → (B, C, h, w) (note 7): the classes
    absent from the image labels (B, C) zeroed, then with ``norm="pcm"`` ViT-PCM's
    ``merge_class_labels`` (its ``model.py``): each class map divided by its maximum over the
    image (background included), then each patch renormalised over the classes (0/0 → 0).
    ``norm="none"``: Eq. 10 as printed, the masked softmax alone. The BPM is their argmax after
    the upsampling; the CRF starts from the same maps."""
    masked = mask_absent_classes(probs, labels)
    if norm == "none":
        return masked
    if norm != "pcm":
        raise CpfcteError(f"bpm_norm {norm!r} is not pcm or none")
    peak = masked.amax(dim=(2, 3), keepdim=True)
    scaled = torch.where(peak > 0, masked / peak.clamp_min(1e-30), torch.zeros_like(masked))
    total = scaled.sum(dim=1, keepdim=True)
    return torch.where(total > 0, scaled / total.clamp_min(1e-30), torch.zeros_like(scaled))


def bpm_from_probs(probs: torch.Tensor, labels: torch.Tensor, size: tuple[int, int], *,
                   norm: str = "pcm", align_corners: bool = True) -> np.ndarray:
    """One image: patch-grid probabilities (C, h, w) → H×W label map (uint8): ``bpm_grid``,
    bilinear upsampling (corners aligned, as ViT-PCM's ``resize``; ``align_corners=False``:
    half-pixel centres, ``resize=pil``), argmax."""
    maps = bpm_grid(probs[None], labels[None].to(probs.device), norm)
    up = torch.nn.functional.interpolate(maps, size=size, mode="bilinear",
                                         align_corners=align_corners)
    return up[0].argmax(dim=0).to(torch.uint8).cpu().numpy()


def crf_start(probs: torch.Tensor, labels: torch.Tensor, size: tuple[int, int], *,
              norm: str = "pcm", align_corners: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Where the CRF starts for one image, as the pseudo-label stage's CRF does: the BPM's grid
    maps (``bpm_grid``) of the image's classes, upsampled to ``size`` and renormalised over
    them (``cpfcte.crf.upsampled_probs``), and those classes: ``(probs K×H×W, classes)``."""
    from cpfcte.crf import upsampled_probs

    present = torch.nonzero(labels > 0).flatten()
    maps = bpm_grid(probs[None], labels[None].to(probs.device), norm)[0][present]
    return (upsampled_probs(maps.cpu().numpy(), size, align_corners),
            present.cpu().numpy())


def aligned(cfg: Config) -> bool:
    """Whether a run's bilinear resizes align the corners (``resize=pcm``, ViT-PCM's resize)."""
    return cfg.resize == "pcm"


def resized_input(image: Image.Image, size: int, mode: str = "pcm") -> torch.Tensor:
    """An RGB image resized to ``size``×``size`` (``cpfcte.transforms.resize_image``): the
    model's (3, S, S) input at inference, uint8 (``pil``) or float32 in [0, 1] (``pcm``)."""
    from cpfcte.transforms import resize_image, to_input

    return to_input(resize_image(image, size, mode))


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


@torch.no_grad()
def patch_probs(model: CPFCTE, images: torch.Tensor, amp: bool = True) -> torch.Tensor:
    """Images (B, 3, S, S) → Z as maps (B, C, h, w), float32. On CUDA the network runs under
    bf16 autocast with ``amp`` (the softmax, and everything after it, in float32; note 13)."""
    cuda = images.device.type == "cuda"
    with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16,
                        enabled=amp and cuda):
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
                       norm: str = "pcm", resize: str = "pcm", workers: int = 0,
                       variants: dict[str, tuple[Path, Path | None]] | None = None,
                       amp: bool = True, progress: bool = True) -> dict:
    """Write the BPM (``norm``) of every image of ``voc`` to ``out_dir/<id>.png`` and, with
    ``probs_dir``, the BPM's grid maps the CRF stage starts from (``<id>.npz``, only the
    classes of the image label); skip the images whose outputs are all present.
    ``variants`` {norm: (bpm folder, probs folder or None)} adds BPMs of other normalisations
    from the same forward pass (Table 1 shows both). ``workers`` DataLoader workers decode and
    resize the images."""
    from cpfcte.crf import save_grid_probs
    from cpfcte.io import clean_partial
    from cpfcte.progress import progress_bar

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
    todo = [i for i in range(len(voc)) if not done(i)]
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
                 baselines: bool = True, both_norms: bool = False,
                 progress: bool = True) -> dict:
    """Make the BPMs of the ``cfg.pseudo_split`` images with the model of ``train_run`` and
    (with ``crf``) their dense-CRF refinement (``cfg.crf``), score both, and write
    ``metrics.json`` in ``run_dir``. ``cfg`` is the training run's config or one derived from
    it (other inference size, split, BPM normalisation, CRF settings, device); it is recorded
    in ``run_dir``. With ``both_norms`` the BPM of the other normalisation (``bpm_norm``) is
    made too, with its CRF, and scored under ``metrics["other_norm"]`` (Table 1's rows)."""
    from cpfcte.data import open_split
    from cpfcte.metrics import evaluate_dirs
    from cpfcte.train import load_trained

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
    timing = make_pseudo_labels(model, voc, bpm_dir, infer_size=size, probs_dir=probs_dir,
                                batch_size=cfg.infer_batch, norm=cfg.bpm_norm,
                                resize=cfg.resize, workers=cfg.infer_workers,
                                variants=variants, amp=cfg.amp, progress=progress)
    gt = voc.gt_dir_or_none()                      # None: a dataset without masks
    scores = score_or_none(bpm_dir, gt, voc)
    metrics = {
        "stage": "pseudo_labels", "level": "pseudo-label (BPM, no CRF)", "profile": cfg.profile,
        "dataset": cfg.dataset, "split": split, "train_run": str(Path(train_run)),
        "config_digest": cfg.digest(), "infer_size": size, "patches_per_side": size // patch,
        "bpm_norm": cfg.bpm_norm, "bpm_dir": str(bpm_dir), **scores, "timing": timing,
        "numerics": numerics.describe(next(model.parameters()).device),
    }
    if gt is not None:                             # where each class's image score comes from
        from cpfcte.explore import class_evidence

        metrics["evidence"] = class_evidence(model, cfg, voc)
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
    folder.write_metrics(metrics)
    return metrics


def score_or_none(pred_dir: Path, gt: Path | None, voc: VOCDataset) -> dict:
    """The scores of a folder of label PNGs against the split's masks, or ``no_masks`` (and no
    mIoU) for a dataset without them."""
    from cpfcte.metrics import evaluate_dirs

    if gt is None:
        return {"miou": None, "iou": None, "no_masks": True, "images": len(voc)}
    return evaluate_dirs(pred_dir, gt, len(voc.classes), ids=voc.ids, classes=voc.classes)


def crf_refine(voc: VOCDataset, probs_dir: Path, out_dir: Path, gt: Path | None, cfg: Config,
               progress: bool = True) -> dict:
    """The CRF stage over a split; scored against ``gt``. A failed image is an error naming
    it (after every other image was written, so a rerun only redoes the failures)."""
    from cpfcte.crf import CRFJob, crf_stage

    jobs = [CRFJob(str(out_dir / f"{image_id}.png"), str(voc.image_path(i)),
                   str(probs_dir / f"{image_id}.npz"), align_corners=aligned(cfg))
            for i, image_id in enumerate(voc.ids)]
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
