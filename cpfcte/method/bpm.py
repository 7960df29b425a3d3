"""The baseline pseudo mask (BPM; Sec. 3.4, Eq. 10; note 7): the patch probabilities Z of the
image's classes, ViT-PCM's normalisation (each class map over its maximum, renormalised over
the classes; ``norm="none"``: Eq. 10 as printed), upsampled bilinearly to the image, argmax;
and the same maps upsampled as the dense CRF's start (``crf_start``).

    Z (C, h, w) ──mask absent classes──► ──normalise (pcm)──► maps (C, h, w)
         ──bilinear to H×W──► argmax ──► BPM (H, W)                        Eq. 10
    maps ──upsampled (cfg.crf.upsample), over cfg.crf.classes──► the CRF's probabilities
"""

from __future__ import annotations

import numpy as np
import torch

from cpfcte.machinery.errors import CpfcteError


@torch.no_grad()
def inference_outputs(model, images: torch.Tensor, amp: bool = True, **forward) -> dict:
    """The network's outputs on images (B, 3, S, S) as inference makes them: on CUDA under bf16
    autocast with ``amp`` (the softmax, and everything after it, in float32; note 13).
    ``forward`` goes to the model (``intermediates=True``: the walk-through)."""
    cuda = images.device.type == "cuda"
    with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16,
                        enabled=amp and cuda):
        return model(images, **forward)


def patch_probs(model, images: torch.Tensor, amp: bool = True) -> torch.Tensor:
    """Images (B, 3, S, S) → Z as maps (B, C, h, w), float32 (``inference_outputs``)."""
    out = inference_outputs(model, images, amp)
    z, (h, w) = out["z"], out["grid"]
    return z.float().transpose(1, 2).reshape(z.shape[0], z.shape[2], h, w)


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
              norm: str = "pcm", params=None) -> tuple[np.ndarray, np.ndarray]:
    """Where the CRF starts for one image, as the pseudo-label stage's CRF does: the BPM's grid
    maps (``bpm_grid``) of the image's classes, upsampled to ``size`` and renormalised, over
    the classes ``params`` (a ``CRFConfig``) says (``cpfcte.method.crf.crf_input``):
    ``(probs K×H×W, classes)``."""
    from cpfcte.machinery.config import CRFConfig
    from cpfcte.method.crf import crf_input

    present = torch.nonzero(labels > 0).flatten()
    maps = bpm_grid(probs[None], labels[None].to(probs.device), norm)[0][present]
    return crf_input(maps.cpu().numpy(), present.cpu().numpy(), size, params or CRFConfig(),
                     probs.shape[0])


def infer_size_for(cfg, patch: int) -> int:
    """The inference size: ``infer_scale`` × the training size rounded to whole patches (Fig. 5
    sweeps patches per side: 24..72 for ViT-B/16 at 384) when it is set, else ``infer_size``."""
    if cfg.infer_scale:
        size = max(1, round(cfg.img_size * float(cfg.infer_scale) / patch)) * patch
    else:
        size = int(cfg.infer_size)
    if size % patch:
        raise CpfcteError(f"infer_size={size} is not a multiple of the patch size {patch}; "
                          f"give a multiple, e.g. infer_size={max(1, round(size / patch)) * patch}")
    return size
