"""Learnable class tokens (Sec. 3.2, Eq. 2): T = {t_1..t_C} ∈ R^{C×H}, concatenated to each
patch embedding after the ViT. Note 1 says which token a patch gets, note 23 where the tokens
start."""

from __future__ import annotations

import math

import torch
from torch import nn

from cpfcte.machinery.errors import CpfcteError

# the tokens' start N(0, std²) (note 23): 1.0, the scale of the LayerNorm-ed patch features they
# are concatenated to (the default); 0.02, ViT's and MCTformer's class-token std, the start this
# project had before (its assignment never left uniform: the logits were ~1e-2)
PATCH_SCALE = 1.0
VIT_STD = 0.02


class ClassTokens(nn.Module):
    """Learnable class tokens T = {t_1..t_C} ∈ R^{C×H} (Sec. 3.2), concatenated to each patch
    after the ViT (Eq. 2): f_i = Concat(p_i, t(i)).

    The paper pairs each patch with "its corresponding class token" but never says which one
    (note 1). ``soft`` (default): t(i) = Σ_c a_ic t_c with a_i = softmax_c(q(p_i)·t_c / √H), a
    differentiable, patch-dependent choice. ``mean``: every patch gets the mean token. (The
    ablation without class tokens, Table 4, builds no ClassTokens.)

    The tokens start from N(0, ``init_std``²). At the default, 1.0, they have the scale of the
    patch features (the ViT's final LayerNorm gives them unit rms), so the two halves of F_in
    weigh alike and the logits q·t/√H start of order 1: the assignment can leave uniform. At
    0.02 (ViT's class-token std) the logits start near 1e-2 and stay there (note 23)."""

    def __init__(self, num_classes: int, embed_dim: int, token_dim: int, mode: str = "soft",
                 init_std: float = PATCH_SCALE):
        super().__init__()
        if mode not in ("soft", "mean"):
            raise CpfcteError(f"ClassTokens mode must be soft or mean, got {mode!r}")
        if not init_std > 0:
            raise CpfcteError(f"class-token init std must be > 0, got {init_std!r}")
        self.mode = mode
        self.token_dim = token_dim
        self.tokens = nn.Parameter(torch.randn(num_classes, token_dim) * init_std)
        self.query = nn.Linear(embed_dim, token_dim) if mode == "soft" else None

    def logits(self, p: torch.Tensor) -> torch.Tensor:
        """(B, s, C) the assignment's logits q(p_i)·t_c / √H (``soft`` mode)."""
        if self.query is None:
            raise CpfcteError("class tokens in mode 'mean' have no assignment")
        return self.query(p) @ self.tokens.t() / math.sqrt(self.token_dim)

    def assignment(self, p: torch.Tensor) -> torch.Tensor:
        """(B, s, C) soft assignment a of patches to class tokens (``soft`` mode)."""
        return self.logits(p).softmax(dim=-1)

    def patch_tokens(self, p: torch.Tensor) -> torch.Tensor:
        """(B, s, H): the token t(i) each patch is given."""
        b, s, _ = p.shape
        if self.mode == "soft":
            return self.assignment(p) @ self.tokens                    # (B, s, H)
        return self.tokens.mean(dim=0).expand(b, s, self.token_dim)    # (B, s, H)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return torch.cat([p, self.patch_tokens(p).to(p.dtype)], dim=-1)  # (B, s, e+H)
