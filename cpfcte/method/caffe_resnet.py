"""The Caffe-style ResNet-101 of DeepLabv2 as kazuto1011/deeplab-pytorch builds it
(``libs/models/resnet.py``, ``libs/models/deeplabv2.py``; note 16), so that its COCO-pretrained
checkpoints compute here what they compute there.

It differs from torchvision's and timm's ResNet-101 in four ways, each of which changes the
output of the same weights:

* the stride of a downsampling block sits on its first 1×1 convolution (``reduce``), not on
  the 3×3;
* the stem's max-pool rounds up (``ceil_mode=True``);
* at output stride 8, every block of the dilated stages has the stage's full dilation (2, then
  4); timm and torchvision give a stage's first block the previous stage's;
* the input is BGR in 0-255 minus the Caffe mean (B 104.008, G 116.669, R 122.675), not divided
  by a standard deviation (``CaffeInput``, applied inside the model: the pipeline still hands
  it RGB uint8 images).

Module names follow kazuto1011's (``layer1.conv1.conv``, ``layer2.block1.reduce.bn``,
``...shortcut.conv``), so a checkpoint's keys map by prefix alone (``kazuto_key``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NAME = "caffe_resnet101"
# kazuto1011/deeplab-pytorch configs/voc12.yaml, IMAGE.MEAN
CAFFE_MEAN_BGR = (104.008, 116.669, 122.675)
BLOCKS = (3, 4, 23, 3)                       # ResNet-101


class ConvBnReLU(nn.Sequential):
    """Convolution (no bias), BatchNorm (eps 1e-5; momentum 0.001, Caffe's moving-average
    fraction 0.999) and, optionally, ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, padding: int,
                 dilation: int, relu: bool = True):
        super().__init__()
        self.add_module("conv", nn.Conv2d(cin, cout, kernel, stride, padding, dilation,
                                          bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout, eps=1e-5, momentum=1 - 0.999))
        if relu:
            self.add_module("relu", nn.ReLU())


class Bottleneck(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dilation: int, downsample: bool):
        super().__init__()
        mid = cout // 4
        self.reduce = ConvBnReLU(cin, mid, 1, stride, 0, 1)           # the stride is here
        self.conv3x3 = ConvBnReLU(mid, mid, 3, 1, dilation, dilation)
        self.increase = ConvBnReLU(mid, cout, 1, 1, 0, 1, relu=False)
        self.shortcut = ConvBnReLU(cin, cout, 1, stride, 0, 1, relu=False) if downsample \
            else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.increase(self.conv3x3(self.reduce(x))) + self.shortcut(x))


class ResLayer(nn.Sequential):
    """``n`` bottlenecks, the first one downsampling; every one with ``dilation``."""

    def __init__(self, n: int, cin: int, cout: int, stride: int, dilation: int):
        super().__init__()
        for i in range(n):
            self.add_module(f"block{i + 1}", Bottleneck(cin if i == 0 else cout, cout,
                                                        stride if i == 0 else 1, dilation,
                                                        i == 0))


class Stem(nn.Sequential):
    def __init__(self, cout: int = 64):
        super().__init__()
        self.add_module("conv1", ConvBnReLU(3, cout, 7, 2, 3, 1))
        self.add_module("pool", nn.MaxPool2d(3, 2, 1, ceil_mode=True))


class CaffeResNet(nn.Sequential):
    """kazuto1011's DeepLabv2 backbone: output stride 8 (layer4 dilated 2, layer5 dilated 4),
    2048 channels out. Input: the Caffe convention (``CaffeInput``)."""

    out_channels = 2048

    def __init__(self, blocks=BLOCKS):
        super().__init__()
        ch = [64 * 2 ** p for p in range(6)]
        self.add_module("layer1", Stem(ch[0]))
        self.add_module("layer2", ResLayer(blocks[0], ch[0], ch[2], 1, 1))
        self.add_module("layer3", ResLayer(blocks[1], ch[2], ch[3], 2, 1))
        self.add_module("layer4", ResLayer(blocks[2], ch[3], ch[4], 1, 2))
        self.add_module("layer5", ResLayer(blocks[3], ch[4], ch[5], 1, 4))


class CaffeInput(nn.Module):
    """RGB images (uint8, or float in [0, 1]) → BGR, 0-255, minus the Caffe mean."""

    def __init__(self, mean_bgr=CAFFE_MEAN_BGR):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean_bgr).view(1, 3, 1, 1), persistent=False)

    @property
    def pad_rgb(self) -> tuple[int, ...]:
        """The RGB uint8 colour that becomes 0 after the mean subtraction (crop padding)."""
        return tuple(int(round(v)) for v in self.mean.flatten().tolist()[::-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() if x.dtype == torch.uint8 else x.float() * 255.0
        return x.flip(1) - self.mean


def kazuto_key(key: str) -> str | None:
    """A kazuto1011/deeplab-pytorch checkpoint key → ours, None for one we do not load (the
    ``fc`` of the DeepLabv1 COCO init, pooling and head layers). Covers the prefixes of its MSC
    wrapper (``base.``, ``scale.`` in older versions), DataParallel's ``module.``, the older
    ``proj`` for ``shortcut`` and ``aspp.stages.cN`` for ``aspp.cN``."""
    parts = key.split(".")
    while parts and parts[0] in ("module", "base", "scale"):
        parts = parts[1:]
    if not parts:
        return None
    if parts[0] == "aspp":
        rest = parts[2:] if len(parts) > 1 and parts[1] == "stages" else parts[1:]
        if len(rest) == 2 and rest[0].startswith("c") and rest[0][1:].isdigit():
            return f"aspp.branches.{rest[0][1:]}.{rest[1]}"
        return None
    if not parts[0].startswith("layer"):
        return None
    parts = ["shortcut" if p == "proj" else p for p in parts]
    return "backbone." + ".".join(parts)


def write_checkpoint(path, n_classes: int = 91, seed: int = 0):
    """Write a DeepLabv2 init in kazuto1011/deeplab-pytorch's format at ``path``
    (``deeplabv1_resnet101-coco.pth``'s layout): this Caffe-style ResNet-101 under his key names
    (``layer1.conv1.conv.weight`` ... ``layer5.block3.increase.bn.*``) with the 91-class ``fc``
    head of his converted COCO init, random weights and BatchNorm statistics: the fixture of
    the smoke and the tests, never a result. Returns ``path``."""
    from pathlib import Path

    torch.manual_seed(seed)
    net = CaffeResNet()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    fc = torch.nn.Conv2d(2048, n_classes, 1)
    state.update({"fc.weight": fc.weight.detach(), "fc.bias": fc.bias.detach()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path
