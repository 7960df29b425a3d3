"""Where the method asks for float32, float32 it is (note 13).

``strict_float32(device_type)``: autocast off, and on CUDA the float32 kernels in IEEE precision
rather than TF32, for the duration of the block. Since torch 2.9 cuDNN's RNNs default to TF32
(``torch.backends.cudnn.rnn.fp32_precision == "tf32"``): an LSTM whose inputs are float32 would
still multiply with 10-bit mantissas on an Ampere or Hopper GPU. The block sets cuDNN's RNN and
cuBLAS's matmul precision to ``"ieee"`` and restores what was there; on a CPU it only turns
autocast off (TF32 does not exist there)."""

from __future__ import annotations

from contextlib import contextmanager

import torch

# the precision flags the block sets (torch ≥ 2.9); older releases: cudnn.allow_tf32
PRECISION_FLAGS = (("cudnn", "rnn"), ("cuda", "matmul"))


def _flag(path: tuple[str, str]):
    return getattr(getattr(torch.backends, path[0], None), path[1], None)


@contextmanager
def strict_float32(device_type: str):
    with torch.autocast(device_type=device_type, enabled=False):
        if device_type != "cuda":
            yield
            return
        saved = []
        for path in PRECISION_FLAGS:
            holder = _flag(path)
            if holder is not None and hasattr(holder, "fp32_precision"):
                saved.append((holder, holder.fp32_precision))
                holder.fp32_precision = "ieee"
        legacy = None
        if not saved:                              # torch < 2.9
            legacy = torch.backends.cudnn.allow_tf32
            torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            for holder, value in saved:
                holder.fp32_precision = value
            if legacy is not None:
                torch.backends.cudnn.allow_tf32 = legacy


def rnn_precision() -> str:
    """cuDNN's RNN float32 precision in effect now (``ieee``, ``tf32``, or ``allow_tf32=…`` on
    older torch): what the device micro-checks report."""
    holder = _flag(("cudnn", "rnn"))
    if holder is not None and hasattr(holder, "fp32_precision"):
        return str(holder.fp32_precision)
    return f"allow_tf32={torch.backends.cudnn.allow_tf32}"
