"""The method on one image, step by step (notebook 09): every tensor between the image and the
pseudo label, from one forward pass of a trained stage-1 run at the inference size, as the
pseudo-label stage makes it.

    image ──resize──► x (1, 3, S, S)
      ──ViT──► P (s, e)                      patch tokens (Sec. 3.1)
      ──class tokens──► A (s, C), F_in (s, e+H)      the assignment and Eq. 2 (note 1)
      ──CF-BiLSTM──► F_out (s, e+H)          Eqs. 3-6
      ──patch classifier──► Z (s, C)         Eq. 7
      ──top-k──► the k patches per class, p (C,)     Eq. 8
      ──BPM──► (H, W)                        Eq. 10 (note 7)
      ──dense CRF──► (H, W)                  note 8

The BPM is masked by the image's labels: a dataset image's own (as the pseudo-label stage),
or, for a photo of yours, the classes whose p exceeds ``threshold`` (as ``cpfcte predict``).
``cpfcte.plots`` draws each step (``walk_*``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cpfcte.machinery.errors import CpfcteError


@dataclass
class Walk:
    """One image through the method. Token arrays are (s, ·) with s = h·w patches in raster
    order; ``labels`` is the multi-hot (C,) the BPM is masked with."""

    name: str
    classes: tuple[str, ...]
    image: np.ndarray                  # (H, W, 3) uint8, the image as stored
    x: np.ndarray                      # (S, S, 3) uint8, the network's input
    grid: tuple[int, int]              # (h, w) patches
    patch_tokens: np.ndarray           # P (s, e)
    assignment: np.ndarray | None      # A (s, C) of the soft class tokens, else None
    f_in: np.ndarray                   # F_in (s, e+H)
    f_out: np.ndarray | None           # F_out (s, e+H), None without the CF-BiLSTM
    z: np.ndarray                      # Z (s, C)
    k: int                             # patches per class the pooling draws from
    topk: np.ndarray                   # (C, k) patch indices, best first
    p: np.ndarray                      # (C,)
    labels: np.ndarray                 # (C,) multi-hot, background included
    labels_from: str                   # "image-level labels" or "p > threshold"
    bpm: np.ndarray                    # (H, W) uint8
    crf: np.ndarray | None             # (H, W) uint8
    settings: dict = field(default_factory=dict)

    def present(self) -> list[int]:
        return [int(c) for c in np.flatnonzero(self.labels)]

    def verdict(self) -> str:
        """One line on which classes label the BPM, and why: the image's labels, or for a
        photo the classes p kept, or that none passed (the BPM is then all background)."""
        kept = [self.classes[c] for c in self.present() if c > 0]
        if self.labels_from == "image-level labels":
            return f"{self.name}: its image-level labels: {', '.join(kept) or 'background only'}"
        t = self.settings.get("threshold")
        best = int(np.argmax(self.p[1:])) + 1
        if not kept:
            return (f"{self.name}: no class passes p > {t} (the highest is "
                    f"{self.classes[best]}, p = {self.p[best]:.2f}), so the BPM is all "
                    f"background: the model sees none of its {len(self.classes) - 1} classes "
                    f"here")
        return f"{self.name}: p > {t} keeps {', '.join(kept)}"

    def shapes(self) -> str:
        """A Markdown table: each step, where the paper defines it, and its shape."""
        s, (h, w) = self.z.shape[0], self.grid
        rows = [("image", "—", self.image.shape), ("x, the input", "Sec. 4.1", self.x.shape),
                ("P, patch tokens", "Sec. 3.1", self.patch_tokens.shape)]
        if self.assignment is not None:
            rows.append(("A, class-token assignment", "Eq. 2, note 1", self.assignment.shape))
        rows += [("F_in", "Eq. 2", self.f_in.shape)]
        if self.f_out is not None:
            rows.append(("F_out, CF-BiLSTM", "Eqs. 3–6", self.f_out.shape))
        rows += [("Z, patch class probabilities", "Eq. 7", self.z.shape),
                 (f"top-k patches (k = {self.k})", "Eq. 8", self.topk.shape),
                 ("p, image scores", "Eq. 8", self.p.shape),
                 ("BPM", "Eq. 10, note 7", self.bpm.shape)]
        if self.crf is not None:
            rows.append(("BPM + dense CRF", "note 8", self.crf.shape))
        head = (f"{self.name}: s = {s} patches ({h} × {w}), C = {len(self.classes)} classes; "
                f"labels from {self.labels_from}: "
                f"{', '.join(self.classes[c] for c in self.present())}\n\n")
        return head + "| step | paper | shape |\n|---|---|---|\n" + "\n".join(
            f"| {a} | {b} | {' × '.join(str(d) for d in shape)} |" for a, b, shape in rows)


@torch.no_grad()
def walk(run: str | Path, *, split: str | None = None, index: int = 0,
         photo: str | Path | None = None, threshold: float | str = "auto",
         crf: bool = True) -> Walk:
    """Image ``index`` of ``split`` (default: the pseudo-label split) or ``photo`` (a file of
    yours) through the trained stage-1 run ``run``; a photo's classes are those whose p
    exceeds ``threshold`` (``auto``: the run's calibrated one, ``cpfcte.stages.threshold``)."""
    from cpfcte.data import open_split
    from cpfcte.machinery.io import read_image
    from cpfcte.stages.threshold import resolve_threshold
    from cpfcte.stages.train import load_trained

    model, cfg = load_trained(run)
    if photo is not None:
        threshold, chosen = resolve_threshold(run, threshold, progress=False)
        w = walk_image(model, cfg, read_image(photo), None, Path(photo).name,
                       threshold=threshold, crf=crf)
        w.settings["threshold"] = threshold
        w.settings["threshold_chosen"] = chosen
        return w
    data = open_split(cfg, split or cfg.pseudo_split)
    if not 0 <= index < len(data):
        raise CpfcteError(f"index {index}: split {data.split!r} has {len(data)} images "
                          f"(0 to {len(data) - 1})")
    return walk_image(model, cfg, data.image(index), data.labels(index), data.ids[index],
                      crf=crf)


def walk_run(profile: str, train_run: str, *, index: int = 0, photo: str | Path | None = None,
             threshold: float | str = "auto") -> Walk:
    """Notebook 09's walk: the run ``train_run`` of ``profile`` (trained first when missing,
    said in one line), one line on what the model is, the walk, and one line on which classes
    label the BPM (``Walk.verdict``) and, for a photo, how the threshold was chosen."""
    from cpfcte.machinery.paths import run_path
    from cpfcte.stages.train import ensure_trained

    run = ensure_trained(profile, run_path(profile, train_run), describe=True)
    w = walk(run, index=index, photo=photo, threshold=threshold)
    print(w.verdict())
    if photo is not None:
        print(f"threshold {w.settings['threshold']}: {w.settings['threshold_chosen']}")
    return w


@torch.no_grad()
def walk_image(model, cfg, rgb, labels: np.ndarray | None, name: str, *,
               threshold: float = 0.5, crf: bool = True) -> Walk:
    """One image (PIL or (H, W, 3) uint8) through ``model``: the BPM masked by ``labels`` (C,)
    or, without them, by the classes whose p exceeds ``threshold``. The explorer (notebook
    08) shows the same walk."""
    from cpfcte.data import classes_of
    from cpfcte.data.transforms import aligned, resized_input
    from cpfcte.method.bpm import bpm_from_probs, crf_start, inference_outputs
    from cpfcte.method.crf import crf_labels
    from cpfcte.method.topk_pooling import pool, pooled_patches
    from cpfcte.stages.predict import image_classes
    from cpfcte.stages.pseudo_labels import infer_size_for

    size = infer_size_for(cfg, model.patch_size[0])
    device = next(model.parameters()).device
    x = resized_input(rgb, size, cfg.resize)[None].to(device)
    out = inference_outputs(model, x, intermediates=True)
    (h, w), z = out["grid"], out["z"][0].float()                      # z: (s, C)
    p = pool(z[None], cfg.pooling, cfg.k)[0]
    k = pooled_patches(cfg.pooling, cfg.k, z.shape[0])
    multi_hot = (torch.from_numpy(labels).to(device) if labels is not None
                 else image_classes(p, threshold))
    grid = z.T.reshape(z.shape[1], h, w)                               # (C, h, w)
    image = np.asarray(rgb, dtype=np.uint8)
    size_hw = image.shape[:2]
    bpm = bpm_from_probs(grid, multi_hot, size_hw, norm=cfg.bpm_norm, align_corners=aligned(cfg))
    refined = None
    if crf:
        probs, present = crf_start(grid, multi_hot, size_hw, norm=cfg.bpm_norm,
                                   params=cfg.crf)
        refined = crf_labels(image, probs, present, cfg.crf)
    ct = model.class_tokens
    assignment = ct.assignment(out["p"]).float()[0] if ct is not None and ct.mode == "soft" else None
    xs = x[0].float() * (1 if x.dtype == torch.uint8 else 255)          # uint8 or [0, 1]
    numpy = lambda t: t[0].float().cpu().numpy()  # noqa: E731
    return Walk(
        name=name, classes=classes_of(cfg), image=image,
        x=xs.permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).cpu().numpy(),
        grid=(h, w), patch_tokens=numpy(out["p"]),
        assignment=None if assignment is None else assignment.cpu().numpy(),
        f_in=numpy(out["f_in"]), f_out=numpy(out["f_out"]) if model.cf_bilstm else None,
        z=z.cpu().numpy(), k=k, topk=z.topk(k, dim=0).indices.T.cpu().numpy(),
        p=p.cpu().numpy(), labels=multi_hot.cpu().numpy().astype(np.uint8),
        labels_from="image-level labels" if labels is not None else f"p > {threshold}",
        bpm=bpm, crf=refined,
        settings={"infer_size": size, "pooling": cfg.pooling, "bpm_norm": cfg.bpm_norm,
                  "class_tokens": cfg.class_tokens, "cf_bilstm": cfg.cf_bilstm})
