"""The Contextual-Fusion BiLSTM (Sec. 3.3, Fig. 2; Eq. 3-6): BiLSTM_H along the rows of the
patch grid, BiLSTM_V along its columns, their states concatenated and projected by W_c; with
ViT-PCM's input dropout (note 21) and in float32 outside autocast (note 13)."""

from __future__ import annotations

import torch
from torch import nn

from cpfcte.machinery.errors import CpfcteError


class SequenceDropout(nn.Module):
    """Dropout on an LSTM's inputs with one mask per sequence, the same at every step: what a
    Keras ``LSTM(dropout=p)`` does to its inputs (ViT-PCM's HV-BiLSTM; note 21). Input
    (N, L, F); identity in eval mode or with p = 0."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty((x.shape[0], 1, x.shape[2]), device=x.device, dtype=x.dtype)
        return x * keep.bernoulli_(1.0 - self.p).div_(1.0 - self.p)


class BiLSTM(nn.Module):
    """A bidirectional LSTM (Eq. 3-5) as two one-directional ones, so that each direction gets
    its own input-dropout mask, as each copy of a Keras ``Bidirectional(LSTM(dropout=p))``
    does. (N, L, F) → (N, L, 2d): [→h_i; ←h_i] at every position i."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.forward_lstm = nn.LSTM(dim, hidden, batch_first=True)   # →LSTM, Eq. 3
        self.backward_lstm = nn.LSTM(dim, hidden, batch_first=True)  # ←LSTM, Eq. 4
        self.drop_forward = SequenceDropout(dropout)
        self.drop_backward = SequenceDropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in float32 outside autocast (note 13): under CUDA autocast cuDNN's LSTM would run in
        # float16 whatever the autocast dtype (ATen's AutocastRNN), without loss scaling
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            ahead, _ = self.forward_lstm(self.drop_forward(x))
            back, _ = self.backward_lstm(self.drop_backward(x).flip(1))
            return torch.cat([ahead, back.flip(1)], dim=-1)          # Eq. 5


class CFBiLSTM(nn.Module):
    """Contextual-Fusion BiLSTM (Sec. 3.3, Fig. 2; Eq. 3–6).

    ``hv`` (default, Fig. 2): BiLSTM_H runs along each row of the h×w patch grid and BiLSTM_V
    along each column; their forward and backward states are concatenated and W_c maps them back
    to the input width (Eq. 6). ``raster``: one BiLSTM over the row-major sequence of s patches,
    as the text of Sec. 3.3 reads (note 3). ``dropout`` acts on the BiLSTMs' inputs, one mask
    per sequence and direction (ViT-PCM's ``LSTM(dropout=0.2)``; note 21)."""

    def __init__(self, dim: int, hidden: int, mode: str = "hv", dropout: float = 0.0):
        super().__init__()
        if mode not in ("hv", "raster"):
            raise CpfcteError(f"CFBiLSTM mode must be hv or raster, got {mode!r}")
        self.mode = mode
        if mode == "hv":
            self.lstm_h = BiLSTM(dim, hidden, dropout)
            self.lstm_v = BiLSTM(dim, hidden, dropout)
            self.proj = nn.Linear(4 * hidden, dim)                     # W_c, b_c
        else:
            self.lstm = BiLSTM(dim, hidden, dropout)
            self.proj = nn.Linear(2 * hidden, dim)

    def forward(self, f: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, s, dim = f.shape
        h, w = grid
        if h * w != s:
            raise CpfcteError(f"CF-BiLSTM: grid {h}×{w} does not hold {s} patches")
        if self.mode == "raster":
            return self.proj(self.lstm(f))                             # (B, s, 2d) → (B, s, dim)
        x = f.reshape(b, h, w, dim)
        rows = self.lstm_h(x.reshape(b * h, w, dim))                   # (B·h, w, 2d)
        cols = self.lstm_v(x.transpose(1, 2).reshape(b * w, h, dim))   # (B·w, h, 2d)
        rows = rows.reshape(b, h, w, -1)
        cols = cols.reshape(b, w, h, -1).transpose(1, 2)
        fused = torch.cat([rows, cols], dim=-1).reshape(b, s, -1)     # (B, s, 4d)
        return self.proj(fused)                                        # (B, s, dim)
