"""Stage 3, training: DeepLabv2 on the CRF-refined pseudo labels (Sec. 3.4, 4.2; notes 9, 14,
16). The run folder follows ``cpfcte.machinery.runfolder``, as stage 1's does: an atomic
checkpoint every ``deeplab.ckpt_every`` iterations, and calling ``train_deeplab`` again resumes
from it; under torchrun each process draws its slice of every iteration's batch."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from cpfcte.machinery import numerics
from cpfcte.machinery.capacity import check_cuda_batch, peak_memory
from cpfcte.machinery.config import Config
from cpfcte.machinery.errors import CpfcteError
from cpfcte.machinery.finite import FiniteGuard
from cpfcte.machinery.runfolder import CHECKPOINT, RunFolder, releases_locks
from cpfcte.method.deeplabv2 import (
    DeepLabV2,
    build_deeplab,
    count_parameters,
    detect_backbone,
    msc_logits,
    msc_loss,
    param_groups,
    poly_lr,
)
from cpfcte.stages.deeplab_data import (
    IterationSampler,
    PseudoLabelData,
    check_crop,
    check_pseudo_labels,
)


@releases_locks
def train_deeplab(cfg: Config, pseudo_dir: str | Path, run_dir: str | Path, *,
                  max_iterations: int | None = None, progress: bool = True) -> dict:
    """Train (or resume) DeepLabv2 on the pseudo labels in ``pseudo_dir`` (a folder of PNGs,
    or a pseudo-label run folder) into ``run_dir``.

    Under torchrun (``cpfcte deeplab train --nproc N``) each process draws its slice of every
    iteration's batch (``IterationSampler``), the loss is normalised over the global batch
    (``msc_loss``), DDP averages the gradients, and rank 0 alone writes the run folder: the
    weights equal one process's up to float summation order (tests/test_ddp.py). BatchNorm is
    frozen in the paper's recipe; where it trains (the toy), each rank's statistics are its
    own (SyncBatchNorm on CUDA)."""
    from cpfcte.data import open_split
    from cpfcte.machinery.distributed import barrier, dist_info, resolve_device
    from cpfcte.machinery.numerics import set_seed
    from cpfcte.machinery.progress import progress_bar
    from cpfcte.stages.pseudo_runs import pseudo_label_dir

    if max_iterations is not None and max_iterations < 0:
        raise CpfcteError(f"--max-iterations {max_iterations}: must be ≥ 0")
    numerics.apply(cfg)
    cfg = detect_backbone(cfg)
    dl = cfg.deeplab
    device = resolve_device(cfg.device)               # a CUDA option on a CPU fails here, first
    world, rank, local, device = dist_info(device)    # each rank on its GPU before any barrier
    if dl.batch % world:
        raise CpfcteError(f"deeplab.batch={dl.batch} is not divisible by {world} processes")
    labels = pseudo_label_dir(pseudo_dir)
    voc = open_split(cfg, cfg.train_split)
    pseudo_dir = check_pseudo_labels(labels, voc)
    check_crop(voc, dl)
    digest = cfg.deeplab_digest()
    if rank == 0:
        folder = RunFolder(run_dir).start("deeplab", cfg, cfg.deeplab_fields(),
                                          pseudo_dir=str(pseudo_dir))
    barrier(world)
    folder = RunFolder(run_dir)
    if device.type == "cuda":                         # fixed crops: let cuDNN pick its kernels
        torch.backends.cudnn.benchmark = True
    progress = progress and rank == 0
    set_seed(cfg.seed)
    model = build_deeplab(cfg, len(voc.classes)).to(device)
    optimizer = torch.optim.SGD(param_groups(model, dl.lr, dl.weight_decay),
                                lr=dl.lr, momentum=dl.momentum)
    start, history = 0, []
    state = folder.load_checkpoint(digest)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = state["iteration"], state["history"]
    total = dl.iterations
    stop = total if max_iterations is None else min(total, start + max_iterations)
    data = PseudoLabelData(voc, pseudo_dir, dl.crop, (dl.scale_min, dl.scale_max), True,
                           cfg.seed, model.pad_rgb, tuple(dl.scale_choices))
    per_rank = dl.batch // world
    loader = torch.utils.data.DataLoader(
        data, batch_size=per_rank,
        sampler=IterationSampler(start, stop, dl.batch, world, rank),
        num_workers=dl.workers, pin_memory=device.type == "cuda")
    use_amp = dl.amp and device.type == "cuda"

    def probe_step(n: int) -> None:                   # one step's memory, for check_cuda_batch
        x = torch.randint(0, 255, (n, 3, dl.crop, dl.crop), device=device, dtype=torch.uint8)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            outs = msc_logits(model, x) if dl.msc else [model(x)]
        sum(o.float().sum() for o in outs).backward()

    check_cuda_batch(model, device, per_rank, probe_step,
                     f"DeepLabv2 ({dl.backbone}, crop {dl.crop}{', MSC' if dl.msc else ''})",
                     "lower deeplab.batch, or share it over GPUs with --nproc", slots=1)
    wrapped = model
    if world > 1:
        if device.type == "cuda" and not dl.freeze_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[local] if device.type == "cuda" else None)
    model.train()
    t0, running = time.time(), torch.zeros((), device=device)
    bar = progress_bar(total=stop - start, desc="DeepLabv2", disable=not progress, leave=False)
    guard = FiniteGuard(device, str(folder.path), "iteration", cfg.skip_nonfinite, world)
    it = start
    for x, y in loader:
        lr = poly_lr(dl.lr, it, total, dl.poly_power)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            outs = msc_logits(wrapped, x) if dl.msc else [wrapped(x)]
        loss = msc_loss(outs, y, dl.msc_loss, world, dl.loss_size)
        optimizer.zero_grad(set_to_none=True)
        if guard.step(loss, it):
            loss.backward()
            optimizer.step()
            running += loss.detach()
        it += 1
        bar.update(1)
        if it % dl.ckpt_every == 0 or it == stop:
            guard.check(model, f"iterations up to {it}", world)
            n = it - (history[-1]["iteration"] if history else start) - guard.skipped
            if world > 1:                              # the global batch's mean loss
                torch.distributed.all_reduce(running)
                running /= world
            history.append({"iteration": it, "lr": lr, "loss": float(running) / max(n, 1),
                            "seconds": round(time.time() - t0, 2)})
            if guard.skipped:
                history[-1]["skipped_nonfinite"], guard.skipped = guard.skipped, 0
            running.zero_()
            if rank == 0:
                folder.save_checkpoint({"model": model.state_dict(),
                                        "optimizer": optimizer.state_dict(), "iteration": it,
                                        "history": history, "digest": digest})
                folder.append_log(history[-1])
            barrier(world)
    bar.close()
    summary = {"iterations_done": it, "iterations": total, "complete": it >= total,
               "history": history, "parameters": count_parameters(model), "digest": digest,
               "processes": world, "peak_memory_mib": peak_memory(device)}
    if rank == 0:
        folder.write_summary(summary)
    barrier(world)
    return summary


def train_deeplab_distributed(cfg: Config, pseudo_dir: str | Path, run_dir: str | Path,
                              nproc: int) -> dict:
    """``train_deeplab`` in ``nproc`` processes through torchrun (one GPU each; gloo on
    CPUs); returns rank 0's summary."""
    import subprocess
    import sys

    from cpfcte.machinery.distributed import check_nproc
    from cpfcte.machinery.io import read_json, write_json
    from cpfcte.machinery.runfolder import SUMMARY

    check_nproc(nproc, cfg.device, cfg.deeplab.batch, "deeplab.batch")
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    launch = run_dir / "launch_config.json"
    write_json(launch, cfg.to_dict())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "cpfcte", "deeplab", "train", "--from-config",
           str(launch), f"--pseudo={Path(pseudo_dir).resolve()}"]   # the run: launch's folder
    done = subprocess.run(cmd)
    if done.returncode != 0:
        raise CpfcteError(f"distributed DeepLabv2 training in {run_dir} failed (torchrun exit "
                          f"{done.returncode}); see its output above and {run_dir / 'log.txt'}")
    return read_json(run_dir / SUMMARY)


def load_deeplab(run_dir: str | Path, cfg: Config) -> DeepLabV2:
    """The trained DeepLabv2 of a run folder (on ``cfg.device``, in eval mode)."""
    from cpfcte.data import classes_of
    from cpfcte.machinery.config import derive
    from cpfcte.machinery.distributed import resolve_device

    folder = RunFolder(run_dir)
    state = folder.load_checkpoint(cfg.deeplab_digest())
    if state is None:
        raise CpfcteError(f"{folder.path}: no {CHECKPOINT}; train DeepLabv2 first")
    if state["iteration"] < cfg.deeplab.iterations:
        holder = folder.holder()
        if holder:
            raise CpfcteError(f"{folder.path}: still training (iteration {state['iteration']} "
                              f"of {cfg.deeplab.iterations}; process {holder.get('pid')} on "
                              f"{holder.get('host')}); wait for it to finish")
        raise CpfcteError(f"{folder.path / CHECKPOINT}: stopped at iteration "
                          f"{state['iteration']} of {cfg.deeplab.iterations}; resume training "
                          "first")
    arch = derive(cfg, {"deeplab.pretrained": False, "deeplab.init": None,
                        "random_init_ok": True})
    model = build_deeplab(arch, len(classes_of(cfg)))
    model.load_state_dict(state["model"])
    return model.to(resolve_device(cfg.device)).eval()
