"""The Contextual-Fusion BiLSTM (Sec. 3.3, Fig. 2; Eq. 3-6): BiLSTM_H along the rows of the
patch grid, BiLSTM_V along its columns, their states concatenated and projected by W_c; with
ViT-PCM's input dropout (note 21) and LSTM initialisation (note 3), in float32 outside autocast
(note 13)."""

from __future__ import annotations

import torch
from torch import nn

from cpfcte.machinery.config import LSTM_INITS
from cpfcte.machinery.errors import CpfcteError
from cpfcte.machinery.precision import strict_float32


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


def keras_lstm_init(lstm: nn.LSTM) -> None:
    """Keras's ``LSTM`` defaults, which ViT-PCM's HV-BiLSTM trains with (``model.py``
    ``HVBiLSTM``: ``LSTM(hidden_dim, dropout=dropout, return_sequences=True)``, no initialiser
    given): ``kernel_initializer='glorot_uniform'`` on the input weights,
    ``recurrent_initializer='orthogonal'`` on the recurrent ones, biases zero with
    ``unit_forget_bias=True`` (the forget gate's bias 1). Keras has one bias per gate; torch has
    two (``bias_ih``, ``bias_hh``), whose sum acts: the forget gate's part of ``bias_ih`` is 1,
    the rest 0. torch's gate order is i, f, g, o, as Keras's i, f, c, o. Glorot on torch's
    (4d, F) weight uses fan_in F and fan_out 4d, as on Keras's (F, 4d) kernel; orthogonal on
    (4d, d) gives the transpose of an orthogonal (d, 4d)."""
    hidden = lstm.hidden_size
    for name, param in lstm.named_parameters():
        with torch.no_grad():
            if name.startswith("weight_ih"):
                nn.init.xavier_uniform_(param)
            elif name.startswith("weight_hh"):
                nn.init.orthogonal_(param)
            elif name.startswith("bias"):
                param.zero_()
                if name.startswith("bias_ih"):
                    param[hidden:2 * hidden] = 1.0                     # the forget gate


class BiLSTM(nn.Module):
    """A bidirectional LSTM (Eq. 3-5) as two one-directional ones, so that each direction gets
    its own input-dropout mask, as each copy of a Keras ``Bidirectional(LSTM(dropout=p))``
    does. (N, L, F) → (N, L, 2d): [→h_i; ←h_i] at every position i."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0, init: str = "keras"):
        super().__init__()
        if init not in LSTM_INITS:
            raise CpfcteError(f"LSTM init must be one of {', '.join(LSTM_INITS)}, got {init!r}")
        self.forward_lstm = nn.LSTM(dim, hidden, batch_first=True)   # →LSTM, Eq. 3
        self.backward_lstm = nn.LSTM(dim, hidden, batch_first=True)  # ←LSTM, Eq. 4
        if init == "keras":                                          # note 3
            keras_lstm_init(self.forward_lstm)
            keras_lstm_init(self.backward_lstm)
        self.drop_forward = SequenceDropout(dropout)
        self.drop_backward = SequenceDropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in float32 outside autocast (note 13): under CUDA autocast cuDNN's LSTM would run in
        # float16 whatever the autocast dtype (ATen's AutocastRNN), without loss scaling; and
        # in IEEE float32, not the TF32 that cuDNN's RNNs default to
        with strict_float32(x.device.type):
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
    per sequence and direction (ViT-PCM's ``LSTM(dropout=0.2)``; note 21). ``init``: the
    LSTMs' initialisation, ``keras`` (ViT-PCM's: ``keras_lstm_init``) or ``torch`` (torch's
    defaults, U(±1/√d) everywhere); note 3."""

    def __init__(self, dim: int, hidden: int, mode: str = "hv", dropout: float = 0.0,
                 init: str = "keras"):
        super().__init__()
        if mode not in ("hv", "raster"):
            raise CpfcteError(f"CFBiLSTM mode must be hv or raster, got {mode!r}")
        self.mode = mode
        if mode == "hv":
            self.lstm_h = BiLSTM(dim, hidden, dropout, init)
            self.lstm_v = BiLSTM(dim, hidden, dropout, init)
            self.proj = nn.Linear(4 * hidden, dim)                     # W_c, b_c
        else:
            self.lstm = BiLSTM(dim, hidden, dropout, init)
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
