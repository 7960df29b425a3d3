"""DeepLabv2's training data (Sec. 4.2; note 16): the stream of (image, pseudo label) crops
and the sampler that cuts it into iterations, so that batch i depends on (seed, i) alone and a
resumed run equals an uninterrupted one; and the checks made before training starts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cpfcte.machinery.errors import CpfcteError


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
        from cpfcte.machinery.io import read_label_png

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


def check_pseudo_labels(label_dir: Path, voc) -> Path:
    from cpfcte.machinery.guard import refuse_ground_truth

    label_dir = refuse_ground_truth(Path(label_dir), "pseudo labels for DeepLab training")
    if not label_dir.is_dir():
        raise CpfcteError(f"{label_dir}: pseudo-label folder not found; make it with notebook "
                          f"03 (split={voc.split}) or `cpfcte pseudo --split {voc.split}`")
    missing = [i for i in voc.ids if not (label_dir / f"{i}.png").exists()]
    if missing:
        raise CpfcteError(f"{label_dir / (missing[0] + '.png')}: pseudo label missing "
                          f"({len(missing)} of {len(voc)} images of {voc.split}); rerun the "
                          "pseudo-label stage on that split")
    from cpfcte.machinery.guard import refuse_copy_of_ground_truth

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
