"""Learnable class tokens (Sec. 3.2, Eq. 2): T = {t_1..t_C} ∈ R^{C×H}, concatenated to each
patch embedding after the ViT. Note 1 says which token a patch gets."""

from __future__ import annotations

import math

import torch
from torch import nn

from cpfcte.machinery.errors import CpfcteError


class ClassTokens(nn.Module):
    """Learnable class tokens T = {t_1..t_C} ∈ R^{C×H} (Sec. 3.2), concatenated to each patch
    after the ViT (Eq. 2): f_i = Concat(p_i, t(i)).

    The paper pairs each patch with "its corresponding class token" but never says which one
    (note 1). ``soft`` (default): t(i) = Σ_c softmax_c(q(p_i)·t_c / √H) t_c, a
    differentiable, patch-dependent choice. ``mean``: every patch gets the mean token. ``none``
    is the ablation without class tokens (Table 4)."""

    def __init__(self, num_classes: int, embed_dim: int, token_dim: int, mode: str = "soft"):
        super().__init__()
        if mode not in ("soft", "mean"):
            raise CpfcteError(f"ClassTokens mode must be soft or mean, got {mode!r}")
        self.mode = mode
        self.token_dim = token_dim
        self.tokens = nn.Parameter(torch.randn(num_classes, token_dim) * 0.02)
        self.query = nn.Linear(embed_dim, token_dim) if mode == "soft" else None

    def assignment(self, p: torch.Tensor) -> torch.Tensor:
        """(B, s, C) soft assignment of patches to class tokens (``soft`` mode)."""
        assert self.query is not None
        scores = self.query(p) @ self.tokens.t() / math.sqrt(self.token_dim)
        return scores.softmax(dim=-1)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        b, s, _ = p.shape
        if self.mode == "soft":
            t = self.assignment(p) @ self.tokens                       # (B, s, H)
        else:
            t = self.tokens.mean(dim=0).expand(b, s, self.token_dim)   # (B, s, H)
        return torch.cat([p, t.to(p.dtype)], dim=-1)                   # (B, s, e+H)
