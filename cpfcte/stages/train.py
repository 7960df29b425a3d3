"""Stage 1: train CPF-CTE on image-level labels (Sec. 4.2; notes 6, 12, 13).

Adam with the paper's two-stage learning rate (``lr_warmup`` for ``warmup_epochs`` epochs, then
``lr``; a fresh Adam at the change, as ViT-PCM), the backbone optionally frozen during the first
stage, bf16 autocast on CUDA for the ViT, the head and the MCE loss in float32. After every epoch
the class tokens' mechanism is measured (``cpfcte.method.diagnostics``; note 23) and logged. The run folder follows ``cpfcte.machinery.runfolder``: a checkpoint is written atomically
after every epoch; calling ``train`` again on the same run folder resumes from it (or returns at
once when training is complete), and the result equals that of an uninterrupted run: the data
order and the flips of epoch ``e`` depend only on (seed, e).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cpfcte.data import classes_of, open_split
from cpfcte.data.voc import VOCDataset
from cpfcte.machinery import numerics
from cpfcte.machinery.capacity import check_cuda_batch, peak_memory
from cpfcte.machinery.config import Config, derive
from cpfcte.machinery.distributed import barrier, check_nproc, dist_info, gather, resolve_device
from cpfcte.machinery.errors import CpfcteError
from cpfcte.machinery.finite import FiniteGuard, NonFiniteError
from cpfcte.machinery.io import read_json, write_json
from cpfcte.machinery.runfolder import CHECKPOINT, CONFIG, SUMMARY, RunFolder, releases_locks
from cpfcte.method.bpm import infer_size_for
from cpfcte.method.diagnostics import class_token_diagnostics
from cpfcte.method.diagnostics import describe as describe_mechanisms
from cpfcte.method.mce_loss import mce_loss
from cpfcte.method.metrics import label_map
from cpfcte.method.network import CPFCTE, build_model
from cpfcte.method.topk_pooling import pool


class ClassificationData(Dataset):
    """Images resized to S×S (``cpfcte.data.transforms.resize_image``) and augmented
    (``cpfcte.data.transforms.augment``), as the model's (3, S, S) input, with their image-level
    label vectors. When all the resized images fit in ``CACHE_BYTES`` (the toy: 29 MB), each
    is decoded and resized once per run. Image i's augmentation in epoch e is drawn from
    (seed, e, i) alone. An item's key is the image index (in the epoch of ``set_epoch``) or an
    (epoch, index) pair, as ``EpochShard`` yields them: loader workers that live across epochs
    (``persistent_workers``) then know the epoch without being told. With ``augment_on=device``
    (and ``augment=pcm``) an item is (image, labels, colour draws): the loader flips, and the
    training step applies the colour ops to the batch on its device (``apply_color_batch``)."""

    CACHE_BYTES = 256 * 2**20

    def __init__(self, voc: VOCDataset, size: int, augment: str, seed: int,
                 resize: str = "pcm", augment_on: str = "loader"):
        self.voc, self.size, self.augment, self.seed, self.resize = voc, size, augment, seed, resize
        self.color_on_device = augment_on == "device" and augment == "pcm"
        self.labels = voc.label_matrix()
        self.epoch = 0
        itemsize = 1 if resize == "pil" else 4
        self.cache: dict[int, np.ndarray] | None = (
            {} if len(voc) * size * size * 3 * itemsize <= self.CACHE_BYTES else None)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.voc)

    def __getitem__(self, key):
        from cpfcte.data.transforms import augment, resize_image, to_input

        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        arr = self.cache.get(index) if self.cache is not None else None
        if arr is None:
            arr = resize_image(self.voc.image(index), self.size, self.resize)
            if self.cache is not None:
                self.cache[index] = arr
        rng = np.random.default_rng([self.seed, epoch, index])
        labels = torch.from_numpy(self.labels[index])
        if self.color_on_device:
            arr, params = augment(arr, self.augment, rng, color=False)
            return to_input(arr), labels, torch.from_numpy(params)
        return to_input(augment(arr, self.augment, rng)), labels


def device_batch(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader batch on ``device``: (images, labels), with the colour ops applied there when
    the loader left them to it (``augment_on: device``; the images come on the [0, 1] scale,
    the colour ops work on 0-255 as ViT-PCM's do)."""
    from cpfcte.data.transforms import apply_color_batch

    x = batch[0].to(device, non_blocking=True)
    y = batch[1].to(device, non_blocking=True)
    if len(batch) == 3:
        x = apply_color_batch(x * 255.0, batch[2].to(device, non_blocking=True)) / 255.0
    return x, y


class EpochShard(torch.utils.data.Sampler):
    """The images of one epoch for one process: the epoch's permutation (``randperm`` seeded by
    seed·100003 + epoch), cut into global batches of
    ``batch``; rank r of ``world`` takes the r-th equal slice of each. N processes thus see,
    step by step, the same images as one process with the same global batch (the DDP parity
    test), and a run's data order does not depend on N. ``drop_last`` drops a final partial
    batch; without it, a partial batch is split in equal slices (its remainder dropped when
    N > 1). With ``keyed`` it yields (epoch, index) pairs (``ClassificationData``'s keys);
    ``set_epoch`` moves one sampler, and so one loader, to the next epoch."""

    def __init__(self, n: int, batch: int, world: int, rank: int, seed: int, epoch: int,
                 drop_last: bool = True, keyed: bool = False):
        self.n, self.batch, self.world, self.rank = n, batch, world, rank
        self.seed, self.epoch, self.drop_last, self.keyed = seed, epoch, drop_last, keyed

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _chunks(self) -> list[tuple[int, int]]:
        full = self.n // self.batch
        bounds = [(i * self.batch, (i + 1) * self.batch) for i in range(full)]
        if not self.drop_last and self.n % self.batch:
            bounds.append((full * self.batch, self.n))
        return bounds

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=gen).tolist()
        for lo, hi in self._chunks():
            per = (hi - lo) // self.world
            part = perm[lo + self.rank * per: lo + (self.rank + 1) * per]
            yield from ((self.epoch, i) for i in part) if self.keyed else part

    def __len__(self) -> int:
        return sum((hi - lo) // self.world for lo, hi in self._chunks())


def make_model(cfg: Config) -> CPFCTE:
    numerics.set_seed(cfg.seed)
    return build_model(cfg, len(classes_of(cfg)))


def optimiser_for(model: CPFCTE, cfg: Config, lr: float) -> torch.optim.Adam:
    """Adam over every parameter (a frozen one has no gradient and is not stepped), with Keras's
    epsilon (``adam_eps``, 1e-7: ViT-PCM's ``Adam(learning_rate=...)``; note 6)."""
    return torch.optim.Adam(model.parameters(), lr=lr, eps=cfg.adam_eps,
                            weight_decay=cfg.weight_decay)


def diagnostic_batch(data: "ClassificationData", n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The images the mechanisms are measured on after every epoch: ``n`` spread evenly over
    the training split, resized as in training and not augmented (n, 3, S, S), and their image
    labels (n, C)."""
    from cpfcte.data.transforms import resized_input

    idx = np.unique(np.linspace(0, len(data) - 1, min(n, len(data))).round().astype(int))
    x = torch.stack([resized_input(data.voc.image(int(i)), data.size, data.resize)
                     for i in idx])
    return x, torch.from_numpy(data.labels[idx])


PHASES = ("warm-up", "main")


def set_phase(model: CPFCTE, cfg: Config, phase: str) -> None:
    """Which parameters train in a phase (note 6). The head (class tokens, CF-BiLSTM,
    classifier) always trains. In the warm-up (the ``lr_warmup`` epochs) the ViT is frozen with
    ``freeze_backbone_warmup``. Otherwise the ViT trains its last ``unfreeze_blocks``
    transformer blocks and its final norm (ViT-PCM's ``unfreeze``, ``NUM_BLOCK_UNFREEZE: 5``:
    the patch and position embeddings, the class token and the first blocks stay frozen), or
    all of itself with ``unfreeze_blocks=None``."""
    backbone = model.backbone
    model.requires_grad_(True)
    if phase == "warm-up" and cfg.freeze_backbone_warmup:
        backbone.requires_grad_(False)
        return
    if cfg.unfreeze_blocks is None:
        return
    blocks = list(getattr(backbone, "blocks", []))
    n = int(cfg.unfreeze_blocks)
    if n > len(blocks):
        raise CpfcteError(f"unfreeze_blocks={n}, but backbone {cfg.backbone!r} has "
                          f"{len(blocks)} blocks; use at most {len(blocks)}, or null for all")
    backbone.requires_grad_(False)
    for block in blocks[len(blocks) - n:]:
        block.requires_grad_(True)
    backbone.norm.requires_grad_(True)


def trainable_parameters(model: CPFCTE, cfg: Config) -> dict[str, int]:
    """{phase: the number of parameters that train in it}, for the phases the run has (the
    warm-up only with ``warmup_epochs`` > 0), in order."""
    phases = [ph for ph in PHASES if ph == "main" or cfg.warmup_epochs > 0]
    out = {}
    for phase in phases:
        set_phase(model, cfg, phase)
        out[phase] = int(sum(p.numel() for p in model.parameters() if p.requires_grad))
    model.requires_grad_(True)
    return out


def train_step(wrapped: torch.nn.Module, model: CPFCTE, cfg: Config, optimizer, guard: FiniteGuard,
               x: torch.Tensor, y: torch.Tensor, step: int, sums: torch.Tensor,
               use_amp: bool) -> torch.Tensor | None:
    """One optimiser step of stage 1 on a batch already on the device: the forward pass under
    bf16 autocast (with ``use_amp``), top-k pooling, the MCE loss in float32 plus ViT-PCM's L2
    on the classifier, backward, Adam. ``sums`` (loss·n, correct labels, n, MCE·n) is updated in
    place on the device: nothing is read back to the host, so the step never waits for the
    GPU. Returns the image scores p (detached), or None for a step the guard skipped."""
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=use_amp):
        out = wrapped(x)
    p = pool(out["z"].float(), cfg.pooling, cfg.k)
    mce = mce_loss(p, y)
    loss = mce                                         # + ViT-PCM's L2 on the classifier
    if cfg.classifier_l2:
        loss = loss + cfg.classifier_l2 * model.classifier.l2_penalty()
    optimizer.zero_grad(set_to_none=True)
    if not guard.step(loss, step):
        return None
    loss.backward()
    optimizer.step()
    n = len(x)
    sums[0].add_(loss.detach() * n)
    sums[1].add_(((p.detach() > 0.5) == (y > 0.5)).float().mean(dim=1).sum())
    sums[2].add_(n)
    sums[3].add_(mce.detach() * n)
    return p.detach().float()


def state_digest(model: torch.nn.Module) -> str:
    """A hash of every parameter and buffer: equal on every rank after a DDP run."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode() + v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@releases_locks
def train(cfg: Config, run_dir: str | Path, *, max_epochs: int | None = None,
          resume: bool = True, progress: bool = True) -> dict:
    """Train (or resume) into ``run_dir``; returns the summary also written to
    ``train_summary.json``. ``max_epochs`` stops this call after that many epochs (as a killed
    run would; the next call resumes). With ``resume=False`` a run folder that already holds an
    unfinished checkpoint is an error instead of being continued.

    Under torchrun (``cpfcte train --nproc N``) each process trains on its ``EpochShard``
    share with batch_size / N images per step (the global batch stays ``batch_size``); DDP keeps
    the replicas identical; rank 0 alone writes the config, checkpoints and logs; every rank
    writes ``rank<r>.digest``, the hash of its final weights."""
    from cpfcte.machinery.progress import progress_bar

    if max_epochs is not None and max_epochs < 0:
        raise CpfcteError(f"--max-epochs {max_epochs}: must be ≥ 0 (0: set up the run folder only)")
    numerics.apply(cfg)
    device = resolve_device(cfg.device)               # a CUDA option on a CPU fails here, first
    world, rank, local, device = dist_info(device)    # each rank on its GPU before any barrier
    if cfg.batch_size % world:
        raise CpfcteError(f"batch_size={cfg.batch_size} is not divisible by {world} processes")
    folder = RunFolder(run_dir)
    if rank == 0:
        from cpfcte.data import dataset_root, fingerprint
        from cpfcte.data.toy import ensure_toy

        ensure_toy(cfg, progress=progress)        # the project's toy data, made if missing

        if (folder.path / CONFIG).is_file():
            refuse_other_classes(folder, cfg)
        # the classes it learns and the data it learns them from: a later stage on a dataset
        # whose class list changed is refused (load_trained)
        folder.start("train", cfg, cfg.training_fields(), classes=list(classes_of(cfg)),
                     dataset_fingerprint=fingerprint(dataset_root(cfg)))
    barrier(world)
    logger = folder.logger() if rank == 0 else logging.getLogger("cpfcte.quiet")
    progress = progress and rank == 0
    data = ClassificationData(open_split(cfg, cfg.train_split), cfg.img_size, cfg.augment,
                              cfg.seed, cfg.resize, cfg.augment_on)

    model = make_model(cfg).to(device)
    infer_size_for(cfg, model.patch_size[0])   # an inference size the patches cannot tile:
    optimizer = optimiser_for(model, cfg, cfg.lr_warmup)   # refused now, not after training
    optimizer_phase = None                            # the phase the optimizer's state is of
    start_epoch, history = 0, []
    state = folder.load_checkpoint(cfg.digest())
    if state is not None:
        if not resume and state["epoch"] < cfg.epochs:
            raise CpfcteError(f"{folder.path}: holds a checkpoint at epoch {state['epoch']} of "
                              f"{cfg.epochs}; pass --resume to continue it, or choose another "
                              "run name")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"], state["history"]
        optimizer_phase = history[-1]["phase"] if history else None
        logger.info("resumed from %s at epoch %d", folder.path / CHECKPOINT, start_epoch)
    diag_x, diag_y = (diagnostic_batch(data, cfg.diagnostic_images)
                      if cfg.diagnostic_images and rank == 0 else (None, None))
    end_epoch = cfg.epochs if max_epochs is None else min(cfg.epochs, start_epoch + max_epochs)
    use_amp = cfg.amp and device.type == "cuda"
    per_rank = cfg.batch_size // world

    def probe_step(n: int) -> None:                   # one step's memory, for check_cuda_batch
        x = torch.randint(0, 255, (n, 3, cfg.img_size, cfg.img_size), device=device,
                          dtype=torch.uint8)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = model(x)
        pool(out["z"].float(), cfg.pooling, cfg.k).sum().backward()

    check_cuda_batch(model, device, per_rank, probe_step,
                     f"stage 1 ({cfg.backbone} at {cfg.img_size}×{cfg.img_size})",
                     "lower batch_size, or share it over GPUs with --nproc", slots=2)
    wrapped, wrapped_phase = model, None
    trainable = trainable_parameters(model, cfg)
    # one loader for the run: its workers live across epochs (persistent_workers), the sampler
    # moves to each epoch and its keys carry the epoch to them; its own generator, so that the
    # loader's worker seed is not drawn from the global RNG (the dropout masks' stream)
    sampler = EpochShard(len(data), cfg.batch_size, world, rank, cfg.seed, start_epoch,
                         drop_last=len(data) > cfg.batch_size, keyed=True)
    loader = DataLoader(data, batch_size=per_rank, sampler=sampler, num_workers=cfg.workers,
                        pin_memory=device.type == "cuda", persistent_workers=cfg.workers > 0,
                        generator=torch.Generator().manual_seed(cfg.seed * 100_003))
    guard = FiniteGuard(device, str(folder.path), "step", cfg.skip_nonfinite, world)

    if start_epoch >= end_epoch:                      # complete: no bar of work not done
        logger.info("%s: %d of %d epochs done, nothing to train", folder.path, start_epoch,
                    cfg.epochs)
    epochs_bar = progress_bar(total=cfg.epochs, initial=start_epoch, desc="training",
                              unit="epoch", disable=not progress or start_epoch >= end_epoch)
    for epoch in range(start_epoch, end_epoch):
        warm = epoch < cfg.warmup_epochs
        phase = PHASES[0] if warm else PHASES[1]
        frozen = bool(warm and cfg.freeze_backbone_warmup)
        if cfg.optimizer_per_phase and optimizer_phase not in (None, phase):
            # a fresh Adam at the phase change, as ViT-PCM compiles one after unfreeze()
            optimizer = optimiser_for(model, cfg, cfg.lr)
            logger.info("epoch %d: phase %s, a fresh Adam (optimizer_per_phase)", epoch + 1,
                        phase)
        optimizer_phase = phase
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_warmup if warm else cfg.lr
        set_phase(model, cfg, phase)
        if world > 1 and wrapped_phase != phase:  # DDP fixes its parameter set when built
            wrapped = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[local] if device.type == "cuda" else None)
            wrapped_phase = phase
        model.train()
        # the dropout masks of epoch e come from (seed, e, rank) alone: a resumed run draws
        # those an uninterrupted one draws (each rank its own)
        torch.manual_seed((cfg.seed * 100_003 + epoch) * 1_009 + rank)
        sampler.set_epoch(epoch)
        t0 = time.time()
        sums = torch.zeros(4, device=device)           # loss·n, correct, n, mce·n
        scores, truths = [], []                        # image-level p and y, for the mAP
        bar = progress_bar(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                           disable=not progress, leave=False)
        for step, batch in enumerate(bar):
            x, y = device_batch(batch, device)
            p = train_step(wrapped, model, cfg, optimizer, guard, x, y, step, sums, use_amp)
            if p is not None:
                scores.append(p)
                truths.append(y.float())
        guard.check(model, f"epoch {epoch + 1}", world)
        if not scores:
            raise NonFiniteError(f"{folder.path}: every step of epoch {epoch + 1} had a "
                                 "non-finite loss and was skipped; lower the learning rate")
        scores, truths = torch.cat(scores), torch.cat(truths)
        if world > 1:
            torch.distributed.all_reduce(sums)
            scores, truths = gather(scores, world), gather(truths, world)
        total, correct, seen, mce_total = sums.tolist()
        record = {"epoch": epoch + 1, "lr": cfg.lr_warmup if warm else cfg.lr,
                  "phase": phase, "backbone_frozen": frozen, "loss": total / seen,
                  "mce": mce_total / seen,
                  "label_accuracy": correct / seen,
                  "label_map": label_map(scores.cpu().numpy(), truths.cpu().numpy()),
                  "seconds": round(time.time() - t0, 3)}
        if guard.skipped:
            record["skipped_nonfinite"], guard.skipped = guard.skipped, 0
        if diag_x is not None:                         # what the mechanisms do (note 23)
            record["mechanisms"] = class_token_diagnostics(
                model, diag_x.to(device), diag_y.to(device), pooling=cfg.pooling, k=cfg.k,
                norm=cfg.bpm_norm, batch=per_rank)
            logger.info("epoch %d: %s", epoch + 1, describe_mechanisms(record["mechanisms"]))
        history.append(record)
        if rank == 0:
            folder.save_checkpoint({"model": model.state_dict(),
                                    "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                                    "history": history, "digest": cfg.digest()})
            epochs_bar.update(1)
            epochs_bar.set_postfix(loss=f"{record['loss']:.4f}",
                                   acc=f"{record['label_accuracy']:.3f}")
            logger.info(json.dumps(record))
            folder.append_log(record)
        barrier(world)

    epochs_bar.close()
    summary = {"epochs_done": len(history), "epochs": cfg.epochs,
               "complete": len(history) >= cfg.epochs, "history": history,
               "digest": cfg.digest(), "device": str(device), "processes": world,
               "trainable_parameters": trainable,
               "mechanisms": next((r["mechanisms"] for r in reversed(history)
                                   if "mechanisms" in r), None),
               "numerics": numerics.describe(device), "peak_memory_mib": peak_memory(device)}
    if world > 1:
        (folder.path / f"rank{rank}.digest").write_text(state_digest(model) + "\n")
    if rank == 0:
        folder.write_summary(summary)
    barrier(world)
    return summary


def train_distributed(cfg: Config, run_dir: str | Path, nproc: int) -> dict:
    """Run ``train`` in ``nproc`` processes through torchrun (one GPU each where there are
    several; gloo on CPUs) and return rank 0's summary. Multi-node: call torchrun yourself with
    its rendezvous options on ``python -m cpfcte train --from-config ...`` (docs/scaling.md)."""
    import subprocess
    import sys

    check_nproc(nproc, cfg.device, cfg.batch_size, "batch_size")

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    launch = run_dir / "launch_config.json"
    write_json(launch, cfg.to_dict())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "cpfcte", "train", "--from-config",
           str(launch.resolve()), "--resume"]  # the run folder: the launch config's folder
    done = subprocess.run(cmd)
    if done.returncode != 0:
        raise CpfcteError(f"distributed training in {run_dir} failed (torchrun exit "
                          f"{done.returncode}); see its output above and {run_dir / 'log.txt'}")
    return read_json(run_dir / SUMMARY)


def refuse_other_classes(folder: RunFolder, cfg: Config) -> None:
    """Refuse a run whose dataset's class list is not the one it was trained on (recorded in
    its config.json since runs record it), naming both lists."""
    trained_on = folder.record().get("classes")
    now = list(classes_of(cfg))
    if trained_on is not None and now != list(trained_on):
        raise CpfcteError(f"{folder.path}: trained on the classes {list(trained_on)}, but its "
                          f"dataset ({cfg.data_root}) now has {now}; a model knows only the "
                          "classes it was trained on: train a new run on this dataset, or "
                          "prepare the dataset with its old classes")


def load_trained(run_dir: str | Path, cfg: Config | None = None,
                 device: str | None = None) -> tuple[CPFCTE, Config]:
    """The trained model of a run folder, in eval mode, and the config it runs with: the run's
    own, or ``cfg`` (a config derived from it, e.g. with other inference or CRF settings),
    which must describe the same trained network. ``device`` defaults to ``cfg.device``."""
    folder = RunFolder(run_dir)
    saved = folder.config()
    if folder.stage != "train":
        raise CpfcteError(f"{folder.path}: holds a {folder.stage} run, not a training run")
    cfg = cfg or saved
    if cfg.digest() != saved.digest():
        changed = sorted(k for k, v in cfg.training_fields().items()
                         if saved.training_fields().get(k) != v)
        raise CpfcteError(f"{folder.path}: the config given differs from the trained run's in "
                          f"{', '.join(changed)}; those fields shape the network, so they can "
                          "only change by training another run")
    refuse_other_classes(folder, cfg)
    state = folder.load_checkpoint(cfg.digest())
    resume = f"cpfcte train --from-config {folder.path / CONFIG} --resume"
    if state is None:
        holder = folder.holder()
        if holder:
            raise CpfcteError(f"{folder.path}: still training, before its first checkpoint "
                              f"(process {holder.get('pid')} on {holder.get('host')}); wait "
                              "for it to finish")
        raise CpfcteError(f"{folder.path}: no {CHECKPOINT}: its training never finished an "
                          f"epoch; train it ({resume})")
    if state["epoch"] < cfg.epochs:
        holder = folder.holder()
        if holder:
            raise CpfcteError(f"{folder.path}: still training (epoch {state['epoch']} of "
                              f"{cfg.epochs} done; process {holder.get('pid')} on "
                              f"{holder.get('host')}); wait for it to finish")
        raise CpfcteError(f"{folder.path / CHECKPOINT}: training stopped at epoch "
                          f"{state['epoch']} of {cfg.epochs}; resume it ({resume}) before "
                          "using it")
    # the architecture only: weights come from the checkpoint, never from the hub
    model = make_model(derive(cfg, {"pretrained": False, "weights": None, "random_init_ok": True}))
    model.load_state_dict(state["model"])
    return model.to(resolve_device(device or cfg.device)).eval(), cfg


def ensure_trained(profile: str, run_dir: str | Path, overrides: dict | None = None,
                   progress: bool = True, describe: bool = False) -> Path:
    """Make sure ``run_dir`` holds a complete training run: train it (profile + overrides) when
    it has no config yet, resume it when it stopped early, do nothing when it is complete. One
    line says which, first; the toy dataset is generated if it is missing. ``describe``: then
    one line on what the model is (``describe_model``)."""
    path = _ensure_trained(profile, run_dir, overrides, progress)
    if describe:
        print(describe_model(path), flush=True)
    return path


def describe_model(run_dir: str | Path) -> str:
    """One line on what a stage-1 run is: profile, backbone, weights, what it was trained on
    and the classes it knows (all a photo can be labelled with)."""
    folder = RunFolder(run_dir)
    cfg = folder.config()
    classes = classes_of(cfg)[1:]
    kw = cfg.backbone_kwargs or {}
    size = (f" ({kw['depth']} blocks, width {kw['embed_dim']})"
            if "depth" in kw and "embed_dim" in kw else "")
    start = ("pretrained" if cfg.pretrained or cfg.weights else "trained from scratch")
    names = ", ".join(classes[:12]) + (f", … ({len(classes)} in all)" if len(classes) > 12
                                       else "")
    toy = (" The toy model knows only these synthetic colour-and-shape classes: on a photo it "
           "can only answer with them, and no paper-scale model ships with the project."
           if cfg.dataset in ("toy", "toy_coco") else "")
    return (f"{folder.path.name}: a {cfg.profile}-profile stage-1 run, {cfg.backbone}{size}, "
            f"{start}, trained {cfg.epochs} epochs on {cfg.dataset} {cfg.train_split}; it "
            f"knows {len(classes)} classes and background: {names}.{toy}")


def _ensure_trained(profile: str, run_dir: str | Path, overrides: dict | None,
                    progress: bool) -> Path:
    from cpfcte.machinery.config import load_config

    folder = RunFolder(run_dir)
    exists = (folder.path / CONFIG).exists()
    cfg = folder.config() if exists else load_config(profile, overrides)
    if exists and (folder.path / SUMMARY).is_file() and folder.summary().get("complete"):
        print(f"using the trained run {folder.path} ({cfg.epochs} epochs, {cfg.profile} "
              f"profile): nothing to train", flush=True)
        return folder.path
    resume = " (resuming its checkpoint)" if (folder.path / CHECKPOINT).exists() else ""
    print(f"training stage 1 into {folder.path}{resume}: {cfg.profile} profile, "
          f"{cfg.backbone}, {cfg.epochs} epochs"
          + (", about half a minute on the toy" if cfg.dataset == "toy" else ""), flush=True)
    train(cfg, folder.path, progress=progress)
    return folder.path
