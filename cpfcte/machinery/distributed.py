"""torchrun plumbing shared by stage 1 and DeepLabv2: the device, the process group, barriers,
gathers, and the checks before a multi-process run starts.

Under torchrun each process takes the GPU ``LOCAL_RANK`` *before* any collective runs: the
process group is created with ``device_id``, so NCCL binds each rank to its own GPU and no
barrier of rank r runs on GPU 0 (without it, every rank's first barrier may use device 0 and
hang). On CPUs the backend is gloo.
"""

from __future__ import annotations

import os

import torch

from cpfcte.machinery.errors import CpfcteError


def resolve_device(name: str) -> torch.device:
    """The run's device: ``auto`` is CUDA where there is one; a string torch cannot read, or
    CUDA on a machine without it, is refused with the fix."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CpfcteError(f"device={name!r} but CUDA is not available here; use device=cpu")
    try:
        return torch.device(name)
    except (RuntimeError, ValueError):
        raise CpfcteError(f"device={name!r} is not a device: use auto, cpu, cuda or cuda:N "
                          "(--set device=cpu)") from None


def dist_info(device: torch.device | None = None) -> tuple[int, int, int, torch.device | None]:
    """(world size, rank, local rank, device) under torchrun; (1, 0, 0, device) otherwise.
    On CUDA the device becomes ``cuda:LOCAL_RANK`` and is set current before the process group
    (NCCL, with ``device_id``) is created; on a CPU the group uses gloo."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 1, 0, 0, device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device is not None and device.type == "cuda"
    if cuda:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if cuda:
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return world, dist.get_rank(), local, device


def shutdown() -> None:
    """Destroy this process's process group, if it has one: at the end of every distributed
    entry point, on success and on error. A group left alive at exit may abort (gloo's threads:
    "terminate called without an active exception") or hang (NCCL)."""
    import sys

    if "torch.distributed" not in sys.modules:          # never imported: nothing to destroy
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def gather(t: torch.Tensor, world: int) -> torch.Tensor:
    """The rows of ``t`` from every rank (equal shares: the samplers drop the remainder)."""
    parts = [torch.empty_like(t) for _ in range(world)]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def check_nproc(nproc: int, device: str, batch: int, what: str) -> None:
    """Refuse, before anything starts, a process count that cannot run: < 1, more processes
    than GPUs on CUDA, or a global batch they cannot share equally."""
    if nproc < 1:
        raise CpfcteError(f"--nproc {nproc}: needs at least 1 process")
    if resolve_device(device).type == "cuda" and nproc > torch.cuda.device_count():
        raise CpfcteError(f"--nproc {nproc} asks for one GPU per process but this machine has "
                          f"{torch.cuda.device_count()}; use --nproc "
                          f"{torch.cuda.device_count()} or fewer")
    if batch % nproc:
        raise CpfcteError(f"{what}={batch} is not divisible by --nproc {nproc}: every process "
                          "takes an equal share of the global batch")
