"""The multi-class entropy (MCE) loss of Eq. 9: binary cross-entropy over the C classes,
averaged over classes and over the batch, as Keras's ``BinaryCrossentropy`` computes it on
probabilities (ViT-PCM's ``compute_mce_loss``, ``model.py``). It is computed in float32 outside
autocast: BCE on probabilities is not autocast-safe (note 5)."""

from __future__ import annotations

import torch

from cpfcte.machinery.errors import CpfcteError

EPS = 1e-7          # Keras's backend epsilon


def mce_loss(p: torch.Tensor, y: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """L = -(1/C) Σ_c [y_c log p_c + (1 - y_c) log(1 - p_c)], mean over the batch.

    ``p`` (B, C) are pooled probabilities in [0, 1]; ``y`` (B, C) are the 0/1 image labels,
    background included. As Keras's ``binary_crossentropy`` on probabilities, p is clipped to
    [eps, 1 - eps] and eps is added inside each logarithm: log(p + eps), log(1 - p + eps)."""
    if p.shape != y.shape:
        raise CpfcteError(f"MCE loss: predictions {tuple(p.shape)} and labels "
                          f"{tuple(y.shape)} differ in shape")
    with torch.autocast(device_type=p.device.type, enabled=False):
        p = p.float().clamp(eps, 1.0 - eps)
        y = y.float()
        per_class = -(y * torch.log(p + eps) + (1.0 - y) * torch.log(1.0 - p + eps))
        return per_class.mean()
