"""Top-k pooling (Sec. 3.4, Eq. 8) and the poolings Table 5 sets beside it: Z (B, s, C) → p (B, C).

* ``gap``: global average pooling, p_c = mean_j Z_j^c
* ``gmp``: global max pooling, p_c = max_j Z_j^c
* ``topk``: top-k pooling, p_c = (1/k) Σ of the k largest Z_j^c over the s patches (Eq. 8)
"""

from __future__ import annotations

import torch

from cpfcte.machinery.errors import CpfcteError


def topk_pool(z: torch.Tensor, k: int) -> torch.Tensor:
    """Eq. 8: mean of the k most confident patches per class."""
    s = z.shape[1]
    if not 1 <= k <= s:
        raise CpfcteError(f"top-k pooling needs 1 ≤ k ≤ s; got k={k} with s={s} patches "
                          "(lower k or raise the input size)")
    return z.topk(k, dim=1).values.mean(dim=1)


def pool(z: torch.Tensor, mode: str = "topk", k: int = 4) -> torch.Tensor:
    if z.ndim != 3:
        raise CpfcteError(f"pooling expects Z of shape (B, s, C), got {tuple(z.shape)}")
    if mode == "gap":
        return z.mean(dim=1)
    if mode == "gmp":
        return z.amax(dim=1)
    if mode == "topk":
        return topk_pool(z, k)
    raise CpfcteError(f"unknown pooling {mode!r}: expected gap, gmp or topk")


def pooled_patches(mode: str, k: int, s: int) -> int:
    """How many of the s patches an image score is drawn from: k for top-k, 1 for max pooling
    (top-1), all s for average pooling."""
    if mode == "topk":
        return min(k, s)
    if mode == "gmp":
        return 1
    if mode == "gap":
        return s
    raise CpfcteError(f"unknown pooling {mode!r}: expected gap, gmp or topk")
