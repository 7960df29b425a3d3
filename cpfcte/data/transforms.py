"""Stage-1 image transforms: the resize to the network's input size and the training
augmentation, each as ViT-PCM does them (deepplants/ViT-PCM ``dataloader.py``, ``utils.py``;
notes 12 and 22) or as this project did before (``resize=pil``, ``augment=hflip``).

* ``resize_image``: ``pcm`` resizes the image as floats, bilinearly with the corners aligned and
  no antialiasing (ViT-PCM's ``resize``: ``tf.compat.v1.image.resize(..., align_corners=True)``
  on the image cast to float32), and keeps the floats; ``pil`` is PIL's bilinear resize
  (antialiased when it shrinks), rounded to uint8.
* ``augment``: ``pcm`` is ViT-PCM's first training branch: ``color_transform`` (brightness
  ±0.2, contrast 0.5-2, saturation 0.5-1.5, hue ±0.1, each always drawn; greyscale with p 0.1)
  then ``affine_transform`` without its crop (left-right flip, up-down flip, transpose, p 0.5
  each). The image-level labels do not change under any of them. As in ViT-PCM the colour ops
  act on the 0-255 floats without clipping, so the brightness shift of at most 0.2 is
  0.2/255 of the range (ViT-PCM passes 0-255 images to ``tf.image.random_brightness``, whose
  delta is meant for [0, 1] images); we keep that, as the reference runs it. ``hflip``: a
  left-right flip with p 0.5; ``none``: nothing.

Every random draw comes from the generator passed in, so the augmentation of image i in epoch e
depends only on (seed, e, i), on any number of loader workers. ``augment_on: device`` draws
the same numbers in the loader and applies the colour ops to the batch on the GPU
(``apply_color_batch``): the loader then only decodes, resizes and flips.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from cpfcte.machinery.errors import CpfcteError

# tf.image.rgb_to_grayscale's weights
GRAY_WEIGHTS = np.array([0.2989, 0.5870, 0.1140], dtype=np.float32)
# ViT-PCM's color_transform defaults (utils.py) and its PROB_FLIP_LR / PROB_FLIP_UD / PROB_ROT90
BRIGHTNESS, CONTRAST, SATURATION, HUE, GRAY_P = 0.2, (0.5, 2.0), (0.5, 1.5), 0.1, 0.1
FLIP_LR_P, FLIP_UD_P, TRANSPOSE_P = 0.5, 0.5, 0.5


def resize_image(image: Image.Image, size: int, mode: str = "pcm") -> np.ndarray:
    """An RGB image resized to size×size: H×W×3, float32 0-255 (``pcm``) or uint8 (``pil``)."""
    if mode == "pil":
        return np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR),
                          dtype=np.uint8)
    if mode != "pcm":
        raise CpfcteError(f"resize mode {mode!r} is not pcm or pil")
    arr = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32).copy())
    out = torch.nn.functional.interpolate(arr.permute(2, 0, 1)[None], size=(size, size),
                                          mode="bilinear", align_corners=True)
    return out[0].permute(1, 2, 0).contiguous().numpy()


def to_input(arr: np.ndarray) -> torch.Tensor:
    """H×W×3 → the model's (3, H, W) input: uint8 stays uint8; floats on the 0-255 scale become
    float32 on the [0, 1] scale (the model takes either)."""
    chw = np.ascontiguousarray(arr.transpose(2, 0, 1))
    if chw.dtype == np.uint8:
        return torch.from_numpy(chw)
    return torch.from_numpy(chw.astype(np.float32) / np.float32(255.0))


# ---------------------------------------------------------------------------------------------
# colour, as TensorFlow's image ops do it on float images


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """H×W×3 float → hue in [0, 1), saturation, value (value = max channel), as TensorFlow's
    ``adjust_saturation``/``adjust_hue`` kernels convert."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(axis=-1)
    span = v - rgb.min(axis=-1)
    s = np.where(v > 0, span / np.where(v > 0, v, 1), 0).astype(np.float32)
    safe = np.where(span > 0, span, 1)
    h = np.where(r == v, (g - b) / (6 * safe),
                 np.where(g == v, (b - r) / (6 * safe) + 2 / 6, (r - g) / (6 * safe) + 4 / 6))
    h = np.where(span > 0, h, 0)
    h = np.where(h < 0, h + 1, h)
    return np.stack([h, s, v], axis=-1).astype(np.float32)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    c = s * v
    m = v - c
    dh = h * 6
    sector = np.clip(dh.astype(np.int64), 0, 5)
    x = c * (1 - np.abs(np.mod(dh, 2) - 1))
    z = np.zeros_like(c)
    # (r, g, b) - m by sector: (c,x,0) (x,c,0) (0,c,x) (0,x,c) (x,0,c) (c,0,x)
    table = np.stack([np.stack(t) for t in ((c, x, z), (x, c, z), (z, c, x), (z, x, c),
                                            (x, z, c), (c, z, x))])            # (6, 3, ...)
    rgb = np.take_along_axis(table, sector[None, None], axis=0)[0]             # (3, ...)
    return (np.moveaxis(rgb, 0, -1) + m[..., None]).astype(np.float32)


def color_params(rng: np.random.Generator) -> np.ndarray:
    """The five draws of ViT-PCM's ``color_transform``, in its order: brightness delta,
    contrast factor, saturation factor, hue shift, and whether to greyscale (1.0 or 0.0)."""
    brightness = rng.uniform(-BRIGHTNESS, BRIGHTNESS)
    contrast = rng.uniform(*CONTRAST)
    saturation = rng.uniform(*SATURATION)
    hue = rng.uniform(-HUE, HUE)
    gray = float(rng.random() <= GRAY_P)
    return np.array([brightness, contrast, saturation, hue, gray], dtype=np.float32)


def color_transform(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """ViT-PCM's ``color_transform`` on H×W×3 float32 (0-255, not clipped). Saturation and hue
    are applied in one HSV round trip (TensorFlow makes one for each; the saturation factor
    leaves hue and value unchanged and the hue shift leaves saturation and value, so the result
    is the same up to float rounding)."""
    return apply_color(x, color_params(rng))


def apply_color(x: np.ndarray, params: np.ndarray) -> np.ndarray:
    """``color_transform`` with its draws given (``color_params``)."""
    brightness, contrast, saturation, hue, gray = (np.float32(v) for v in params)
    x = x + brightness                                                    # random_brightness
    mean = x.mean(axis=(0, 1), keepdims=True)                             # random_contrast
    x = (x - mean) * contrast + mean
    hsv = rgb_to_hsv(x)                                                   # random_saturation
    hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 1)
    hsv[..., 0] = np.mod(hsv[..., 0] + hue, 1.0)                          # random_hue
    x = hsv_to_rgb(hsv)
    if gray:                                                              # greyscale
        x = np.repeat((x @ GRAY_WEIGHTS)[..., None], 3, axis=-1)
    return x.astype(np.float32)


def apply_color_batch(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """``apply_color`` on a batch where it lives (the GPU, for ``augment_on: device``):
    x is (B, 3, H, W) float on the 0-255 scale, params (B, 5) from ``color_params``. The same
    operations in the same order; the result agrees with ``apply_color`` up to float rounding
    (a mean summed in another order, a division fused otherwise)."""
    x = x.float()
    p = params.to(x.device, torch.float32)[:, :, None, None]             # (B, 5, 1, 1)
    brightness, contrast, saturation, hue, gray = (p[:, i:i + 1] for i in range(5))
    x = x + brightness
    mean = x.mean(dim=(2, 3), keepdim=True)
    x = (x - mean) * contrast + mean
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]                            # rgb_to_hsv
    v = x.amax(dim=1, keepdim=True)
    span = v - x.amin(dim=1, keepdim=True)
    s = torch.where(v > 0, span / torch.where(v > 0, v, torch.ones_like(v)),
                    torch.zeros_like(v))
    safe = torch.where(span > 0, span, torch.ones_like(span))
    h = torch.where(r == v, (g - b) / (6 * safe),
                    torch.where(g == v, (b - r) / (6 * safe) + 2 / 6,
                                (r - g) / (6 * safe) + 4 / 6))
    h = torch.where(span > 0, h, torch.zeros_like(h))
    h = torch.where(h < 0, h + 1, h)
    s = torch.clamp(s * saturation, 0, 1)
    h = torch.remainder(h + hue, 1.0)
    c = s * v                                                             # hsv_to_rgb
    m = v - c
    dh = h * 6
    sector = torch.clamp(dh.long(), 0, 5)
    xx = c * (1 - torch.abs(torch.remainder(dh, 2) - 1))
    z = torch.zeros_like(c)
    table = torch.stack([torch.cat(t, dim=1) for t in ((c, xx, z), (xx, c, z), (z, c, xx),
                                                        (z, xx, c), (xx, z, c), (c, z, xx))])
    rgb = torch.gather(table, 0, sector[None].expand(1, -1, 3, -1, -1))[0] + m
    weights = torch.as_tensor(GRAY_WEIGHTS, device=x.device)[None, :, None, None]
    grey = (rgb * weights).sum(dim=1, keepdim=True).expand_as(rgb)
    return torch.where(gray > 0, grey, rgb)


def affine_transform(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """ViT-PCM's ``affine_transform`` of its first branch (no crop): left-right flip, up-down
    flip, then transpose, each with p 0.5 (a square image stays square)."""
    if rng.random() <= FLIP_LR_P:
        x = x[:, ::-1]
    if rng.random() <= FLIP_UD_P:
        x = x[::-1]
    if rng.random() <= TRANSPOSE_P:
        x = x.transpose(1, 0, 2)
    return x


def augment(arr: np.ndarray, mode: str, rng: np.random.Generator,
            color: bool = True) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """One training image (H×W×3, uint8 or float 0-255) under ``mode``: pcm | hflip | none.
    With ``color=False`` (``augment_on: device``) ``pcm`` draws as it always does but returns
    the flipped, uncoloured image and the colour draws, for ``apply_color_batch``: the colour
    ops act on each pixel and on a mean over all of them, so they commute with the flips."""
    if mode == "none":
        return arr
    if mode == "hflip":
        return arr[:, ::-1] if rng.random() < 0.5 else arr
    if mode != "pcm":
        raise CpfcteError(f"augment mode {mode!r} is not pcm, hflip or none")
    if not color:
        params = color_params(rng)
        return affine_transform(arr.astype(np.float32), rng), params
    return affine_transform(color_transform(arr.astype(np.float32), rng), rng)


def aligned(cfg) -> bool:
    """Whether a run's bilinear resizes align the corners (``resize=pcm``, ViT-PCM's resize)."""
    return cfg.resize == "pcm"


def resized_input(image: Image.Image, size: int, mode: str = "pcm") -> torch.Tensor:
    """An RGB image resized to ``size``×``size`` (``cpfcte.data.transforms.resize_image``): the
    model's (3, S, S) input at inference, uint8 (``pil``) or float32 in [0, 1] (``pcm``)."""
    return to_input(resize_image(image, size, mode))
