"""The dense CRF (Sec. 3.4, Fig. 3; Table 1: 67.1 → 70.8; notes 8 and 15).

``dense_crf`` wraps pydensecrf (installed as ``pydensecrf2``, same ``import pydensecrf`` API):
the unary is -log of the probabilities, with a Gaussian (smoothness) kernel and a bilateral
(appearance) kernel, and mean-field inference for a fixed number of iterations. Its parameters
are a ``cpfcte.machinery.config.CRFConfig`` (``cfg.crf``), the one home of their defaults. The
patch-grid maps the pseudo-label stage saves for it are upsampled here (``upsampled_probs``, in
numpy, so that the CRF's worker processes need no torch). The process pool that runs it over a
folder is ``cpfcte.stages.crf_pool``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cpfcte.machinery.config import CRFConfig
from cpfcte.machinery.errors import CpfcteError


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CRFConfig = CRFConfig()) -> np.ndarray:
    """Refine ``probs`` (C×H×W, each pixel's column summing to 1) on ``image`` (H×W×3 uint8)
    with the CRF ``params``; returns refined C×H×W float32 probabilities."""
    import pydensecrf.densecrf as dcrf

    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise CpfcteError(f"dense_crf: image must be a uint8 array, got "
                          f"{getattr(image, 'dtype', type(image).__name__)}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise CpfcteError(f"dense_crf: image must be H×W×3, got shape {image.shape}")
    probs = np.asarray(probs)
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise CpfcteError(f"dense_crf: probabilities {probs.shape} do not match the image "
                          f"{image.shape[:2]} (expected C×H×W)")
    if not np.issubdtype(probs.dtype, np.floating):
        raise CpfcteError(f"dense_crf: probabilities must be floats, got {probs.dtype}")
    if params.iterations < 1:
        raise CpfcteError(f"dense_crf: iterations must be ≥ 1, got {params.iterations}")
    sums = probs.sum(axis=0)
    if probs.min() < -1e-6 or not np.allclose(sums, 1.0, atol=1e-3):
        raise CpfcteError("dense_crf: probabilities must be ≥ 0 and sum to 1 over classes at "
                          f"every pixel (sums range {sums.min():.4f}..{sums.max():.4f})")
    c, h, w = probs.shape
    unary = -np.log(np.clip(probs.astype(np.float32), np.float32(params.unary_clip),
                            1.0)).reshape(c, -1)
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.array(unary, dtype=np.float32, order="C"))
    d.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    d.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb,
                           rgbim=np.array(image, dtype=np.uint8, order="C"),
                           compat=params.bilateral_compat)
    q = np.asarray(d.inference(int(params.iterations)), dtype=np.float32)
    return q.reshape(c, h, w)


# ---------------------------------------------------------------------------------------------
# the BPM's grid maps on disk, and their upsampling


def save_grid_probs(path: Path, probs, labels) -> None:
    """Save the patch-grid probabilities (C, h, w) of the classes present in ``labels`` (C,)."""
    from cpfcte.machinery.io import atomic_path

    present = np.flatnonzero(np.asarray(labels) > 0)
    grid = np.asarray(probs)[present].astype(np.float16)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, probs=grid, classes=present.astype(np.int16))


def load_grid_probs(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path) as data:
            return data["probs"].astype(np.float32), data["classes"].astype(np.int64)
    except Exception as e:
        raise CpfcteError(f"{path}: cannot read saved probabilities ({e}); delete it and rerun "
                          "the pseudo-label stage") from None


def bilinear_resize(grid: np.ndarray, size: tuple[int, int],
                    align_corners: bool = False) -> np.ndarray:
    """(K, h, w) → (K, H, W), bilinear: with half-pixel centres, the same values as
    ``torch.nn.functional.interpolate(..., mode="bilinear", align_corners=False)``, or with
    ``align_corners`` those of ``align_corners=True`` (ViT-PCM's resize) (both tested), in
    numpy so that CRF workers need no torch."""

    def axis(n_out: int, n_in: int):
        if align_corners:
            step = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
            src = np.arange(n_out, dtype=np.float64) * step
        else:
            src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
            src = np.clip(src, 0, None)
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, (src - i0).astype(np.float32)

    y0, y1, wy = axis(size[0], grid.shape[1])
    x0, x1, wx = axis(size[1], grid.shape[2])
    rows = grid[:, y0] * (1 - wy)[None, :, None] + grid[:, y1] * wy[None, :, None]
    return rows[:, :, x0] * (1 - wx) + rows[:, :, x1] * wx


def crf_labels(image: np.ndarray, probs: np.ndarray, classes, params: CRFConfig) -> np.ndarray:
    """The label map of the CRF refinement of K×H×W ``probs`` whose maps are ``classes``."""
    return np.asarray(classes)[dense_crf(image, probs, params).argmax(axis=0)].astype(np.uint8)


def upsampled_probs(grid: np.ndarray, size: tuple[int, int],
                    align_corners: bool = False) -> np.ndarray:
    """Bilinear upsampling of (K, h, w) to (K, H, W) (as for the BPM), renormalised over K."""
    up = np.clip(bilinear_resize(grid.astype(np.float32), size, align_corners), 0, None)
    return up / np.clip(up.sum(axis=0, keepdims=True), 1e-8, None)


def crf_input(grid: np.ndarray, present, size: tuple[int, int], params: CRFConfig,
              num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """What the CRF starts from, for the BPM's patch-grid maps ``grid`` (K, h, w) of the image's
    classes ``present``: the maps upsampled to ``size`` as ``params.upsample`` says (ViT-PCM's
    CRF path: half-pixel centres) and renormalised over them; with ``params.classes == "all"``
    (the references) every one of the ``num_classes`` classes, the absent ones at probability 0.
    Returns ``(probs K'×H×W, the class of each map)``."""
    present = np.asarray(present, dtype=np.int64)
    probs = upsampled_probs(grid, size, params.upsample == "corners")
    if params.classes == "image":
        return probs, present
    if len(present) and num_classes <= present.max():
        raise CpfcteError(f"a CRF over all classes needs the number of classes (got "
                          f"{num_classes}, but the image has class {present.max()})")
    full = np.zeros((num_classes, *probs.shape[1:]), dtype=np.float32)
    full[present] = probs
    return full, np.arange(num_classes)
