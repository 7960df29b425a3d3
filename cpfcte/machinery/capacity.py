"""Will the batch fit? Before a long GPU run starts, one training step at batch 1 and one at
batch 2 are measured (peak memory, forward + backward, no optimizer step), the peak at the
run's batch is extrapolated linearly (weights and buffers once, activations per image) and the
optimizer's state added; a batch that would not fit in the device's memory is refused with
the figure, instead of failing with an out-of-memory error after minutes of set-up. The
capacity is the device's *free* memory at that moment plus what this process already holds:
two runs sharing a GPU then cannot both pass on the total (run one batch job per GPU,
``JOBS=1``). On a CPU nothing is probed (the peak cannot be reset there; docs/scaling.md gives
measured CPU figures)."""

from __future__ import annotations

from typing import Callable

from cpfcte.machinery.errors import CpfcteError

HEADROOM = 0.95          # refuse above 95 % of the device's memory (fragmentation, workspaces)


def extrapolate(peak1: float, peak2: float, batch: int, extra: float = 0.0) -> float:
    """Bytes at ``batch`` from the peaks at 1 and 2 images (plus ``extra``: optimizer state)."""
    per_image = max(peak2 - peak1, 0.0)
    return peak1 + per_image * (batch - 1) + extra


def check_batch_fits(probe: Callable[[int], float], batch: int, capacity: float, what: str,
                     fix: str, extra: float = 0.0) -> float:
    """Raise when the extrapolated peak of ``batch`` exceeds ``HEADROOM`` × ``capacity`` bytes;
    returns the estimate. ``probe(n)`` is the peak of one step at ``n`` images."""
    need = extrapolate(probe(1), probe(2), batch, extra)
    if need > HEADROOM * capacity:
        raise CpfcteError(f"{what}: batch {batch} needs about {need / 2**30:.1f} GB "
                          f"(measured at batch 1 and 2, extrapolated), the device has "
                          f"{capacity / 2**30:.1f} GB; {fix}")
    return need


def cuda_probe(step: Callable[[int], None], device) -> Callable[[int], float]:
    """A probe measuring the peak memory of ``step(n)`` on a CUDA device."""
    import torch

    def probe(n: int) -> float:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        step(n)
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device))
    return probe


def optimizer_bytes(model, slots: int) -> float:
    """Bytes of an optimizer's state: ``slots`` float32 tensors per trainable parameter (Adam
    2, SGD with momentum 1)."""
    return float(sum(p.numel() for p in model.parameters() if p.requires_grad) * 4 * slots)


def cuda_capacity(device) -> float:
    """Bytes this process may use: the device's free memory plus what this process's allocator
    already holds (the model's weights, measured before the probe frees its cache)."""
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    return float(free + torch.cuda.memory_reserved(device))


def check_cuda_batch(model, device, batch: int, make_step: Callable[[int], None], what: str,
                     fix: str, slots: int) -> float | None:
    """On CUDA, probe ``make_step`` and refuse a batch that would not fit; None elsewhere."""
    import torch

    if device.type != "cuda":
        return None
    need = check_batch_fits(cuda_probe(make_step, device), batch, cuda_capacity(device), what,
                            fix, optimizer_bytes(model, slots))
    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    return need


def peak_memory(device=None) -> dict[str, float]:
    """What this process has held at most so far, in MiB: ``host`` (its resident set) and, on
    a CUDA device, ``cuda`` (the tensors PyTorch allocated). Recorded with each stage's
    results for the model-zoo file; a measurement, never part of a digest."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux, bytes on macOS
    out = {"host": round(rss / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)}
    if device is not None and getattr(device, "type", str(device)) == "cuda":
        import torch

        out["cuda"] = round(torch.cuda.max_memory_allocated(device) / (1 << 20), 1)
    return out
