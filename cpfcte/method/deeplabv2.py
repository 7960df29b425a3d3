"""DeepLabv2 (Sec. 3.4, 4.2, Fig. 3; Tables 2 and 3; notes 9, 14, 16): the network, its input
convention, multi-scale input training (MSC) and its loss, its initialisation, its optimiser's
groups and schedule. The settings are the ``cfg.deeplab`` section. Training and prediction are
the stages ``cpfcte.stages.deeplab_train`` and ``cpfcte.stages.deeplab_predict``.

DeepLabv2 = a ResNet backbone with output stride 8 (the last two stages dilated): timm's, or
kazuto1011's Caffe-style ResNet-101 for his COCO-pretrained checkpoints
(``cpfcte.method.caffe_resnet``); and ASPP: four parallel 3×3 convolutions with dilation
6/12/18/24 straight to class scores, whose outputs are summed. MSC: the logits at scales 1,
0.75, 0.5 and their element-wise max, a loss on each, summed (``deeplab.msc_loss``). SGD, lr
2.5e-4 on the backbone, ×10 on the ASPP weights and ×20 on its biases (no weight decay on
biases), poly decay (power 0.9); the backbone's BatchNorm is frozen (batch 10 is too small for
batch statistics; the toy profile, whose backbone starts random, trains it).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cpfcte.machinery.config import Config
from cpfcte.machinery.errors import CpfcteError


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
    from ``deeplab.init`` (his COCO-pretrained checkpoints; ``cpfcte.method.caffe_resnet``)."""
    import timm

    from cpfcte.method import caffe_resnet

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

    from cpfcte.machinery.config import derive
    from cpfcte.method import caffe_resnet

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
    from cpfcte.machinery.paths import data_dir

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
    from cpfcte.method import caffe_resnet

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


def count_parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))
