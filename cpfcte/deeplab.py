"""Stage 3: DeepLabv2 trained on the CRF-refined pseudo labels (Sec. 3.4, 4.2, Fig. 3;
Tables 2 and 3; notes 9, 14, 15, 16). Its settings are the ``cfg.deeplab`` section.

DeepLabv2 = a ResNet backbone from timm with output stride 8 (the last two stages dilated) and
ASPP: four parallel 3×3 convolutions with dilation 6/12/18/24 straight to class scores, whose
outputs are summed. Optional multi-scale input training (MSC: scales 1, 0.75, 0.5 and their
element-wise max, a loss on each). Training: SGD, lr 2.5e-4 on the backbone, ×10 on the ASPP
weights and ×20 on its biases (no weight decay on biases), momentum 0.9, weight decay 5e-4,
poly decay (power 0.9), batch 10, 20k iterations, random scale 0.5–1.5, crop 321, flip,
ignore 255; the backbone's BatchNorm is frozen (batch 10 is too small for batch statistics;
the toy profile, whose backbone starts random, trains it).
Batch ``i`` is drawn from (seed, i) alone, so a resumed run equals an uninterrupted one.
The MSC loss is the sum of its four terms, as in the reference recipe (``deeplab.msc_loss``).
Inference, each scored on its own: single scale; softmax averaged over scales × flips at the
image size; then the dense CRF (``cfg.test_crf()``: the reference recipe's parameters, or with
``deeplab.test_crf=pseudo`` those the pseudo labels were refined with; note 15), run by the
same crash-tolerant pool as the pseudo labels' CRF (``cpfcte.crf.crf_stage``). The run folder
follows ``cpfcte.runfolder``, as stage 1's does.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cpfcte import numerics
from cpfcte.capacity import check_cuda_batch
from cpfcte.config import Config
from cpfcte.errors import CpfcteError
from cpfcte.finite import FiniteGuard
from cpfcte.runfolder import CHECKPOINT, RunFolder, releases_locks


class ASPP(nn.Module):
    """DeepLabv2's atrous spatial pyramid pooling: one 3×3 conv per rate, outputs summed."""

    def __init__(self, in_channels: int, num_classes: int, rates=(6, 12, 18, 24)):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r, bias=True)
            for r in rates)
        for conv in self.branches:
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(branch(x) for branch in self.branches)


class ImageNetInput(nn.Module):
    """RGB images (uint8, or float in [0, 1]) → normalised with the backbone's mean and std
    (timm's pretrained configuration)."""

    def __init__(self, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def pad_rgb(self) -> tuple[int, ...]:
        """The RGB uint8 colour of the mean (crop padding becomes about 0)."""
        return tuple(int(round(255 * m)) for m in self.mean.flatten().tolist())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        return (x - self.mean) / self.std


def unit_range(x: torch.Tensor) -> torch.Tensor:
    """Images as floats in [0, 1], from uint8 (÷255) or already in [0, 1]: what every MSC
    branch and test-time scale is resized as (note 16)."""
    return x.float() / 255.0 if x.dtype == torch.uint8 else x


class DeepLabV2(nn.Module):
    """Backbone (features at stride 8) + ASPP. ``forward`` takes RGB images (uint8 or float in
    [0, 1]), converts them to the backbone's input convention (``preprocess``: ImageNet mean and
    std, or kazuto1011's Caffe BGR mean) and returns logits at 1/8 of the input size."""

    def __init__(self, backbone: nn.Module, num_classes: int, rates=(6, 12, 18, 24),
                 preprocess: nn.Module | None = None, freeze_bn: bool = True,
                 in_channels: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.freeze_bn = freeze_bn
        self.preprocess = preprocess if preprocess is not None else ImageNetInput()
        if in_channels is None:
            in_channels = backbone.feature_info.channels()[-1]
        self.aspp = ASPP(in_channels, num_classes, rates)
        self.num_classes = num_classes
        if freeze_bn:
            freeze_batchnorm(self.backbone)

    @property
    def device(self) -> torch.device:
        return self.aspp.branches[0].weight.device

    @property
    def pad_rgb(self) -> tuple[int, ...]:
        return self.preprocess.pad_rgb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(self.preprocess(x))
        return self.aspp(feats[-1] if isinstance(feats, (list, tuple)) else feats)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_bn:
            freeze_batchnorm(self.backbone)
        return self


def freeze_batchnorm(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)


MSC_SCALES = (0.75, 0.5)


def msc_logits(model: DeepLabV2, x: torch.Tensor, scales=MSC_SCALES) -> list[torch.Tensor]:
    """Multi-scale input training (MSC), as kazuto1011's ``MSC``: the logits at scale 1, at each
    extra scale (input resized to ⌊s·H⌋ × ⌊s·W⌋; logits at their own size) and the element-wise
    max of all of them at the scale-1 size (the extra scales upsampled bilinearly); a loss is
    taken on every one. Every branch sees the images on one value range: the smaller inputs are
    resized as floats in [0, 1] (``unit_range``), the range the model takes floats in."""
    base = model(x)
    h, w = x.shape[-2:]
    pyramid = [model(F.interpolate(unit_range(x), size=(int(h * s), int(w * s)),
                                   mode="bilinear", align_corners=False)) for s in scales]
    up = [F.interpolate(p, size=base.shape[-2:], mode="bilinear", align_corners=False)
          for p in pyramid]
    return [base, *pyramid, torch.stack([base, *up]).amax(dim=0)]


def msc_loss(outs: list[torch.Tensor], y: torch.Tensor, reduction: str = "sum",
             world: int = 1, size: str = "logits") -> torch.Tensor:
    """Cross-entropy (255 ignored, mean over labelled pixels) of each MSC output against the
    labels; summed over the outputs as in the reference recipe (kazuto1011/deeplab-pytorch), or
    their ``mean`` (a quarter of the step). ``size="logits"`` (the reference's ``resize_labels``):
    the labels are resized to each output's size, nearest neighbour with pixel centres (as PIL's
    ``NEAREST``); ``"labels"``: each output is upsampled bilinearly to the labels' size. Under
    torchrun (``world`` > 1) each mean is over the labelled pixels of the global batch (their
    counts all-reduced), scaled by ``world`` for DDP's gradient average: the same loss as one
    process, whatever each rank's share of 255 pixels."""
    pairs = []
    for o in outs:
        if size == "labels":
            pairs.append((F.interpolate(o.float(), size=y.shape[-2:], mode="bilinear",
                                        align_corners=False), y))
        elif tuple(o.shape[-2:]) == tuple(y.shape[-2:]):
            pairs.append((o.float(), y))
        else:
            small = F.interpolate(y[:, None].float(), size=o.shape[-2:], mode="nearest-exact")
            pairs.append((o.float(), small[:, 0].long()))
    if world == 1:
        terms = [F.cross_entropy(o, t, ignore_index=255) for o, t in pairs]
    else:
        counts = torch.stack([(t != 255).sum().float() for _, t in pairs])
        torch.distributed.all_reduce(counts)
        terms = [F.cross_entropy(o, t, ignore_index=255, reduction="sum") * world
                 / counts[i].clamp(min=1) for i, (o, t) in enumerate(pairs)]
    total = torch.stack(terms).sum()
    return total if reduction == "sum" else total / len(terms)


def build_deeplab(cfg: Config, num_classes: int) -> DeepLabV2:
    """DeepLabv2 with ``cfg.deeplab.backbone``: a timm ResNet (ImageNet weights through timm, or
    ``deeplab.init``), or ``caffe_resnet101``, kazuto1011's Caffe-style ResNet-101, which starts
    from ``deeplab.init`` (his COCO-pretrained checkpoints; ``cpfcte.caffe_resnet``)."""
    import timm

    from cpfcte import caffe_resnet

    dl = cfg.deeplab
    name = dl.backbone
    if name == caffe_resnet.NAME:
        if not (dl.init or cfg.random_init_ok):
            raise CpfcteError(f"deeplab.backbone={name} has no ImageNet weights through timm: "
                              "give deeplab.init=PATH, a kazuto1011/deeplab-pytorch checkpoint "
                              "(e.g. deeplabv1_resnet101-coco.pth, the COCO-pretrained init of "
                              "his VOC recipe)")
        model = DeepLabV2(caffe_resnet.CaffeResNet(**(dl.backbone_kwargs or {})), num_classes,
                          tuple(dl.rates), caffe_resnet.CaffeInput(), dl.freeze_bn,
                          in_channels=caffe_resnet.CaffeResNet.out_channels)
        if dl.init:
            load_init(model, init_path(dl.init))
        return model
    if not timm.is_model(name):
        raise CpfcteError(f"unknown DeepLab backbone {name!r}: use a timm ResNet name or "
                          f"{caffe_resnet.NAME}")
    use_hub = bool(dl.pretrained) and not dl.init
    if not (use_hub or dl.init or cfg.random_init_ok):
        raise CpfcteError(f"profile {cfg.profile!r} would train DeepLabv2 from random weights: "
                          "set deeplab.pretrained=true (ImageNet through timm) or "
                          "deeplab.init=PATH")
    if dl.init and is_kazuto_checkpoint(init_path(dl.init)):
        raise CpfcteError(f"{init_path(dl.init)}: a kazuto1011/deeplab-pytorch checkpoint, whose "
                          f"network is a Caffe-style ResNet-101, not {name!r}: set "
                          f"deeplab.backbone={caffe_resnet.NAME} to load it as it was trained")
    try:
        backbone = timm.create_model(name, features_only=True, out_indices=(4,),
                                     output_stride=8, pretrained=use_hub,
                                     **(dl.backbone_kwargs or {}))
    except Exception as e:
        if not use_hub:
            raise CpfcteError(f"cannot build DeepLab backbone {name!r}: {e}") from None
        raise CpfcteError(
            f"could not load the ImageNet weights of {name!r} through timm ({e}); on a machine "
            f"with internet run python -c \"import timm; timm.create_model('{name}', "
            "pretrained=True)\" to fill the cache, or pass deeplab.init=PATH") from None
    pcfg = getattr(backbone, "pretrained_cfg", {}) or {}
    model = DeepLabV2(backbone, num_classes, tuple(dl.rates),
                      ImageNetInput(tuple(pcfg.get("mean", (0.485, 0.456, 0.406))),
                                    tuple(pcfg.get("std", (0.229, 0.224, 0.225)))),
                      dl.freeze_bn)
    if dl.init:
        load_init(model, init_path(dl.init))
    return model


def detect_backbone(cfg: Config) -> Config:
    """The config with the DeepLab backbone its init file needs: a kazuto1011 checkpoint given
    with a timm backbone runs in his Caffe-style ResNet-101 (``caffe_resnet101``; note 16),
    said on stderr; the config recorded in the run folder names it. Other configs unchanged."""
    import sys

    from cpfcte import caffe_resnet
    from cpfcte.config import derive

    dl = cfg.deeplab
    if dl.init and dl.backbone != caffe_resnet.NAME and is_kazuto_checkpoint(init_path(dl.init)):
        print(f"{init_path(dl.init)}: a kazuto1011/deeplab-pytorch checkpoint: DeepLabv2 runs in "
              f"his Caffe-style ResNet-101 (deeplab.backbone={caffe_resnet.NAME}, not "
              f"{dl.backbone})", file=sys.stderr)
        return derive(cfg, {"deeplab.backbone": caffe_resnet.NAME, "deeplab.backbone_kwargs": {}})
    return cfg


def init_path(value: str) -> Path:
    """``deeplab.init`` as a file: absolute, relative to the working folder, or relative to the
    data folder (``CPFCTE_DATA``, where the batch's COCO-init run looks: ``models/...``)."""
    from cpfcte.paths import data_dir

    path = Path(value).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return data_dir() / path


def _read_state(path: Path) -> dict:
    if not path.is_file():
        raise CpfcteError(f"{path}: DeepLab init file not found; for the COCO-pretrained init "
                          "download deeplabv1_resnet101-coco.pth (kazuto1011/deeplab-pytorch, "
                          "README) and put it there, or set deeplab.init=PATH")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CpfcteError(f"{path}: cannot read ({e})") from None
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise CpfcteError(f"{path}: not a state dict")
    return state


def is_kazuto_checkpoint(path: Path) -> bool:
    """Whether a file holds kazuto1011-style keys (``layer2.block1.reduce...``)."""
    if not path.is_file():
        return False
    return any(".block" in k and (".reduce." in k or ".conv3x3." in k) for k in _read_state(path))


def load_init(model: DeepLabV2, path: Path) -> None:
    """Initialise from a local file: this project's own DeepLabv2 state dict (same backbone), or
    a kazuto1011/deeplab-pytorch checkpoint into the Caffe-style ResNet (``kazuto_key``). The
    ASPP is kept only when its class count matches; otherwise it starts fresh. A file that fits
    neither network is refused, naming it."""
    from cpfcte import caffe_resnet

    state = _read_state(path)
    own = model.state_dict()
    if not any(k in own for k in state):
        state = {m: v for k, v in state.items() if (m := caffe_resnet.kazuto_key(k)) is not None}
    if any(k.startswith("aspp.") and k in own and own[k].shape != v.shape
           for k, v in state.items()):
        state = {k: v for k, v in state.items() if not k.startswith("aspp.")}
    missing = [k for k in own if k not in state and not k.startswith("aspp.")
               and not k.endswith("num_batches_tracked")]
    bad = [k for k in state if k not in own or own[k].shape != state[k].shape]
    if missing or bad:
        kind = type(model.backbone).__name__
        raise CpfcteError(f"{path}: does not fit DeepLabv2 with backbone {kind}: "
                          f"{len(missing)} missing (e.g. {missing[:3]}), {len(bad)} unexpected "
                          f"or of another shape (e.g. {bad[:3]}); a kazuto1011 checkpoint needs "
                          f"deeplab.backbone={caffe_resnet.NAME}, this project's own needs the "
                          "backbone it was trained with")
    model.load_state_dict(state, strict=False)


def param_groups(model: DeepLabV2, lr: float, weight_decay: float) -> list[dict]:
    """Backbone at lr; ASPP weights at 10·lr; ASPP biases at 20·lr without weight decay."""
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    weights = [b.weight for b in model.aspp.branches]
    biases = [b.bias for b in model.aspp.branches]
    return [{"params": backbone, "lr": lr, "weight_decay": weight_decay, "lr_mult": 1.0},
            {"params": weights, "lr": 10 * lr, "weight_decay": weight_decay, "lr_mult": 10.0},
            {"params": biases, "lr": 20 * lr, "weight_decay": 0.0, "lr_mult": 20.0}]


def poly_lr(base_lr: float, iteration: int, max_iterations: int, power: float = 0.9) -> float:
    return base_lr * (1.0 - iteration / max_iterations) ** power


# ---------------------------------------------------------------------------------------------
# data


class PseudoLabelData(torch.utils.data.Dataset):
    """Sample ``k`` of the training stream: an image of ``voc`` with its pseudo label, rescaled
    by a random factor (one of ``choices``, as kazuto1011's ``SCALES``, or uniform in ``scale``
    when there are none), padded and randomly cropped to crop×crop, randomly flipped.
    Everything random comes from (seed, k), so batch i = samples i·B .. i·B+B-1 is
    reproducible."""

    def __init__(self, voc, label_dir: Path, crop: int, scale=(0.5, 1.5), flip: bool = True,
                 seed: int = 0, pad_rgb=(124, 116, 104), choices: tuple = ()):
        self.voc, self.label_dir, self.crop = voc, Path(label_dir), crop
        self.scale, self.flip, self.seed, self.pad_rgb = scale, flip, seed, pad_rgb
        self.choices = tuple(float(c) for c in choices)

    def __len__(self) -> int:  # the stream is indexed by sample number, not by image
        return 2**62

    def draw_scale(self, rng: np.random.Generator) -> float:
        if self.choices:
            return self.choices[int(rng.integers(len(self.choices)))]
        return float(rng.uniform(*self.scale))

    def __getitem__(self, k: int):
        from cpfcte.io import read_label_png

        rng = np.random.default_rng([self.seed, k])
        i = int(rng.integers(len(self.voc)))
        img = self.voc.image(i)
        label = read_label_png(self.label_dir / f"{self.voc.ids[i]}.png")
        if label.shape != (img.height, img.width):
            raise CpfcteError(f"{self.label_dir / (self.voc.ids[i] + '.png')}: pseudo label is "
                              f"{label.shape[::-1]}, image is {img.size}")
        s = self.draw_scale(rng)
        w, h = max(1, round(img.width * s)), max(1, round(img.height * s))
        img = np.asarray(img.resize((w, h), Image.BILINEAR), dtype=np.uint8)
        label = np.asarray(Image.fromarray(label).resize((w, h), Image.NEAREST))
        c = self.crop
        ph, pw = max(c - h, 0), max(c - w, 0)
        if ph or pw:
            img = np.pad(img, ((0, ph), (0, pw), (0, 0)), constant_values=0)
            img[h:, :] = self.pad_rgb
            img[:, w:] = self.pad_rgb
            label = np.pad(label, ((0, ph), (0, pw)), constant_values=255)
        y = int(rng.integers(img.shape[0] - c + 1))
        x = int(rng.integers(img.shape[1] - c + 1))
        img, label = img[y:y + c, x:x + c], label[y:y + c, x:x + c]
        if self.flip and rng.random() < 0.5:
            img, label = img[:, ::-1], label[:, ::-1]
        return (torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),
                torch.from_numpy(np.ascontiguousarray(label).astype(np.int64)))


class IterationSampler(torch.utils.data.Sampler):
    """The sample numbers of iterations ``start`` to ``stop`` - 1 of ``PseudoLabelData``'s
    stream, ``batch`` per iteration: a run resumed at iteration i draws exactly the samples an
    uninterrupted run draws from i on. Under torchrun, rank r of ``world`` takes the r-th equal
    slice of each iteration's samples, so N processes draw, step by step, the samples of one."""

    def __init__(self, start: int, stop: int, batch: int = 1, world: int = 1, rank: int = 0):
        self.start, self.stop, self.batch, self.world, self.rank = start, stop, batch, world, rank
        self.per = batch // world

    def __iter__(self):
        for it in range(self.start, self.stop):
            first = it * self.batch + self.rank * self.per
            yield from range(first, first + self.per)

    def __len__(self) -> int:
        return (self.stop - self.start) * self.per


# ---------------------------------------------------------------------------------------------
# training


def check_pseudo_labels(label_dir: Path, voc) -> Path:
    from cpfcte.guard import refuse_ground_truth

    label_dir = refuse_ground_truth(Path(label_dir), "pseudo labels for DeepLab training")
    if not label_dir.is_dir():
        raise CpfcteError(f"{label_dir}: pseudo-label folder not found; make it with notebook "
                          f"03 (split={voc.split}) or `cpfcte pseudo --split {voc.split}`")
    missing = [i for i in voc.ids if not (label_dir / f"{i}.png").exists()]
    if missing:
        raise CpfcteError(f"{label_dir / (missing[0] + '.png')}: pseudo label missing "
                          f"({len(missing)} of {len(voc)} images of {voc.split}); rerun the "
                          "pseudo-label stage on that split")
    from cpfcte.guard import refuse_copy_of_ground_truth

    refuse_copy_of_ground_truth(label_dir, voc.gt_dir_or_none(), voc.ids,
                                "pseudo labels for DeepLab training")
    return label_dir


def check_crop(voc, dl) -> None:
    """Refuse a crop that the training images cannot fill: when most of them are smaller than
    ``dl.crop`` on both sides even at the largest random scale, DeepLabv2 would learn mostly
    from padding. (Images smaller than the crop at scale 1 are padded with 255, as in the
    reference recipe.) Reads the image headers only."""
    small, example = 0, None
    for i, image_id in enumerate(voc.ids):
        w, h = voc.image_size(i)
        if max(w, h) * dl.largest_scale() < dl.crop:
            small += 1
            example = example or f"{image_id}: {w}×{h}"
    if small * 2 > len(voc):
        raise CpfcteError(f"deeplab.crop={dl.crop} exceeds the images: {small} of {len(voc)} "
                          f"{voc.split} images are smaller than {dl.crop} px on both sides even "
                          f"at scale {dl.largest_scale():g} (e.g. {example}); lower "
                          "deeplab.crop or raise the largest training scale")


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
    from cpfcte.progress import progress_bar
    from cpfcte.pseudo import pseudo_label_dir
    from cpfcte.distributed import barrier, dist_info, resolve_device
    from cpfcte.train import set_seed

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
               "processes": world}
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

    from cpfcte.io import read_json, write_json
    from cpfcte.runfolder import SUMMARY
    from cpfcte.distributed import check_nproc

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


def count_parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def load_deeplab(run_dir: str | Path, cfg: Config) -> DeepLabV2:
    """The trained DeepLabv2 of a run folder (on ``cfg.device``, in eval mode)."""
    from cpfcte.config import derive
    from cpfcte.data import classes_of
    from cpfcte.distributed import resolve_device

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


# ---------------------------------------------------------------------------------------------
# inference


@torch.no_grad()
@torch.no_grad()
def predict_probs(model: DeepLabV2, image: np.ndarray, scales=(1.0,), flip: bool = False, *,
                  single: bool = False, views: str = "mean", amp: bool = True):
    """Softmax probabilities (C, H, W) of an H×W×3 uint8 image. ``views="mean"``: the mean over
    ``scales`` (and horizontal flips, batched with their image) of the softmax of the logits
    upsampled bilinearly to H×W. ``views="msc_max"`` (kazuto1011's test: his ``MSC`` in eval
    mode): the element-wise max of the logits at scales 1, 0.75, 0.5 (``msc_logits``), upsampled
    to H×W, then the softmax; ``scales`` and ``flip`` are not used. With ``single``, also the
    single-scale probabilities (scale 1, not flipped): ``(probs, single)``. On CUDA the
    network runs under bf16 autocast with ``amp``; the softmax and the mean in float32."""
    device = model.device
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                        enabled=amp and device.type == "cuda"):
        return _predict_probs(model, image, scales, flip, single, views)


def _predict_probs(model, image, scales, flip, single, views):
    device = model.device
    h, w = image.shape[:2]
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].to(device)

    def probs_of(logits: torch.Tensor) -> torch.Tensor:
        return F.interpolate(logits.float(), size=(h, w), mode="bilinear",
                             align_corners=False).softmax(dim=1)

    if views == "msc_max":
        outs = msc_logits(model, x)
        probs = probs_of(outs[-1])[0]
        return (probs, probs_of(outs[0])[0]) if single else probs
    if views != "mean":
        raise CpfcteError(f"deeplab.test_views={views!r} is not mean or msc_max")
    total = torch.zeros((model.num_classes, h, w), device=device)
    n, one = 0, None
    for s in scales:
        xs = x if s == 1.0 else F.interpolate(unit_range(x), size=(max(1, round(h * s)),
                                                                   max(1, round(w * s))),
                                              mode="bilinear", align_corners=False)
        batch = torch.cat([xs, xs.flip(-1)]) if flip else xs
        logits = model(batch)
        if flip:
            logits = torch.cat([logits[:1], logits[1:].flip(-1)])
        probs = probs_of(logits)
        total += probs.sum(dim=0)
        n += len(probs)
        if s == 1.0:
            one = probs[0]
    if not single:
        return total / n
    if one is None:
        one = probs_of(model(x))[0]
    return total / n, one


def crf_classes(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The classes the test-time CRF runs over (probability ≥ 1e-3 somewhere in the image) and
    their probabilities renormalised over them: ``(probs, classes)``."""
    keep = np.flatnonzero(probs.reshape(len(probs), -1).max(1) >= 1e-3)
    sub = probs[keep]
    return sub / sub.sum(0, keepdims=True), keep


# the folder of each test-time level (config.DEEPLAB_TEST_LEVELS), each scored on its own
LEVEL_DIRS = {"single_scale": "pred_ss", "multi_scale": "pred", "crf": "pred_crf"}


def predict_split(model: DeepLabV2, voc, out_dir: Path, cfg: Config,
                  progress: bool = True) -> dict:
    """Write single-scale argmax predictions to ``out_dir/pred_ss``, multi-scale + flip ones to
    ``out_dir/pred`` and, with ``cfg.deeplab.crf``, CRF-refined ones (``cfg.test_crf()``) to
    ``out_dir/pred_crf``: the CRF runs over the classes whose probability reaches 1e-3
    somewhere in the image, in the pseudo labels' crash-tolerant pool (``crf_stage``; a failed
    image is an error naming it, the others are written). Images already written are
    skipped."""
    from cpfcte.crf import CRFJob, crf_stage
    from cpfcte.guard import refuse_ground_truth
    from cpfcte.io import clean_partial, save_label_png
    from cpfcte.progress import progress_bar
    from cpfcte.pseudo import raise_on_failures

    use_crf = cfg.deeplab.crf
    single, plain, refined = (out_dir / LEVEL_DIRS[k] for k in LEVEL_DIRS)
    for d in (single, plain, refined):
        refuse_ground_truth(d, "prediction folder")
        d.mkdir(parents=True, exist_ok=True)
        clean_partial(d)
    scales, flip = tuple(cfg.deeplab.test_scales), cfg.deeplab.flip_test

    def predictions() -> Iterator[CRFJob]:
        """Predict each image not yet written; yield its CRF job."""
        for i in progress_bar(range(len(voc)), desc="DeepLabv2 predict", disable=not progress,
                              leave=False):
            image_id = voc.ids[i]
            need_plain = not ((plain / f"{image_id}.png").exists()
                              and (single / f"{image_id}.png").exists())
            need_crf = use_crf and not (refined / f"{image_id}.png").exists()
            if not (need_plain or need_crf):
                continue
            image = np.asarray(voc.image(i), dtype=np.uint8)
            probs, one = predict_probs(model, image, scales, flip, single=True,
                                       views=cfg.deeplab.test_views, amp=cfg.deeplab.amp)
            probs = probs.cpu().numpy()
            if need_plain:
                save_label_png(single / f"{image_id}.png",
                               one.argmax(0).cpu().numpy().astype(np.uint8))
                save_label_png(plain / f"{image_id}.png", probs.argmax(0).astype(np.uint8))
            if need_crf:
                sub, keep = crf_classes(probs)
                yield CRFJob(str(refined / f"{image_id}.png"), image, sub, keep)

    t0 = time.time()
    if use_crf:
        raise_on_failures(crf_stage(predictions(), cfg.test_crf(), progress=False), refined)
    else:
        for _ in predictions():
            pass
    return {"seconds": round(time.time() - t0, 2), "single_dir": str(single),
            "pred_dir": str(plain), "crf_dir": str(refined) if use_crf else None}


@releases_locks
def deeplab_stage(cfg: Config, pseudo_dir: str | Path, run_dir: str | Path, *,
                  progress: bool = True) -> dict:
    """Train DeepLabv2 on the pseudo labels (a folder of PNGs or a pseudo-label run folder),
    predict the ``cfg.val_split`` images, score them, write ``metrics.json`` in ``run_dir``."""
    from cpfcte.data import open_split
    from cpfcte.pseudo import score_or_none

    cfg = detect_backbone(cfg)
    folder = RunFolder(run_dir)
    summary = train_deeplab(cfg, pseudo_dir, folder.path, progress=progress)
    model = load_deeplab(folder.path, cfg)
    voc = open_split(cfg, cfg.val_split)
    pred = predict_split(model, voc, folder.path / voc.split, cfg, progress=progress)
    gt = voc.gt_dir_or_none()                      # None: a dataset without masks

    def score(path: str) -> dict:
        return score_or_none(Path(path), gt, voc)

    levels = {"single_scale": score(pred["single_dir"]), "multi_scale": score(pred["pred_dir"])}
    if cfg.deeplab.crf:
        levels["crf"] = score(pred["crf_dir"])
    last = list(levels)[-1]
    labels = cfg.deeplab.level_labels()
    metrics = {"stage": "deeplab", "profile": cfg.profile, "dataset": cfg.dataset,
               "split": voc.split, "pseudo_dir": folder.record()["pseudo_dir"],
               "config_digest": summary["digest"], "parameters": summary["parameters"],
               "iterations": summary["iterations_done"], "backbone": cfg.deeplab.backbone,
               "test_scales": list(cfg.deeplab.test_scales), "flip": cfg.deeplab.flip_test,
               "pred_dir": pred["pred_dir"], "crf_dir": pred["crf_dir"],
               "single_dir": pred["single_dir"],
               "test_views": cfg.deeplab.test_views,
               "levels": {k: {"label": labels[k], "miou": v["miou"],
                              "iou": v["iou"]} for k, v in levels.items()},
               "no_crf": {k: levels["multi_scale"][k] for k in ("miou", "iou")},
               "timing": {"predict_seconds": pred["seconds"]},
               "weights": cfg.init_stamp(),
               "numerics": numerics.describe(model.device),
               **levels[last],
               "level": f"segmentation (DeepLabv2, {labels[last]})"}
    if cfg.deeplab.crf:
        metrics["crf_params"] = cfg.test_crf().describe()
    folder.write_metrics(metrics)
    return metrics
