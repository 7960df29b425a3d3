"""The patch classifier (Eq. 7): Z = softmax(F W), one bias-free linear layer; ViT-PCM's
initialisation and L2 penalty (note 4)."""

from __future__ import annotations

import torch
from torch import nn


class PatchClassifier(nn.Module):
    """One linear layer W ∈ R^{(e+H)×C}, without bias as in Eq. 7 (Z = softmax(F W)), and a
    softmax over classes. W starts from N(0, ``init_std``²): 0.05, as ViT-PCM's patch
    classifier (``RandomNormal(stddev=0.05)`` in its ``model.py``), which also carries an L2
    penalty of 0.01 on W (``l2_penalty``, added to the loss by ``cpfcte.stages.train``; note 4)."""

    def __init__(self, dim: int, num_classes: int, init_std: float = 0.05):
        super().__init__()
        self.fc = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.fc.weight, std=init_std)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(f)  # logits; Z = softmax(logits, -1)

    def l2_penalty(self) -> torch.Tensor:
        """ΣW², in float32 (Keras's ``L2(λ)`` regulariser is λ·ΣW²)."""
        return self.fc.weight.float().pow(2).sum()
