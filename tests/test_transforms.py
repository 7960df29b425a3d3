"""Stage-1 transforms (cpfcte.data.transforms): ViT-PCM's resize and augmentation, and ours."""

import numpy as np
import pytest
import torch
from PIL import Image

from cpfcte.data import transforms as T
from cpfcte.machinery.errors import CpfcteError


class Draws:
    """A stand-in for numpy's Generator that returns the given draws in order."""

    def __init__(self, uniform=(), random=()):
        self.u, self.r = list(uniform), list(random)

    def uniform(self, lo, hi):
        value = self.u.pop(0)
        assert lo <= value <= hi
        return value

    def random(self):
        return self.r.pop(0)


def test_pcm_resize_aligns_the_corners_and_keeps_floats():
    img = Image.fromarray(np.array([[[0, 0, 0], [90, 90, 90]], [[30, 30, 30], [120, 120, 120]]],
                                   dtype=np.uint8))
    out = T.resize_image(img, 3, "pcm")
    assert out.dtype == np.float32 and out.shape == (3, 3, 3)
    # corners are the input's corners; the centre is the mean of the four: (0+90+30+120)/4
    assert out[0, 0, 0] == 0 and out[0, 2, 0] == 90 and out[2, 0, 0] == 30 and out[2, 2, 0] == 120
    assert out[1, 1, 0] == pytest.approx(60.0) and out[0, 1, 0] == pytest.approx(45.0)
    pil = T.resize_image(img, 3, "pil")
    assert pil.dtype == np.uint8 and pil.shape == (3, 3, 3)
    x = T.to_input(out)
    assert x.shape == (3, 3, 3) and x.dtype == torch.float32 and float(x.max()) == pytest.approx(120 / 255)
    assert T.to_input(pil).dtype == torch.uint8
    with pytest.raises(CpfcteError, match="resize mode"):
        T.resize_image(img, 3, "nearest")


def test_hsv_round_trip_and_known_values():
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [40, 40, 40]]], dtype=np.float32)
    hsv = T.rgb_to_hsv(rgb)
    assert np.allclose(hsv[0, :, 0], [0, 1 / 3, 2 / 3, 0])          # hue
    assert np.allclose(hsv[0, :, 1], [1, 1, 1, 0])                  # saturation
    assert np.allclose(hsv[0, :, 2], [255, 255, 255, 40])           # value: the max channel
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 255, (8, 9, 3)).astype(np.float32)
    assert np.allclose(T.hsv_to_rgb(T.rgb_to_hsv(img)), img, atol=1e-3)


def test_colour_transform_by_hand():
    """Brightness adds δ on the 0-255 scale, contrast scales about each channel's mean,
    saturation scales S (0: grey), hue shifts H, greyscale takes tf's weights."""
    img = np.array([[[200, 100, 50], [100, 50, 25]]], dtype=np.float32)
    # brightness +0.1, contrast 2, saturation 1, hue 0, no greyscale (draw 0.5 > 0.1)
    out = T.color_transform(img, Draws([0.1, 2.0, 1.0, 0.0], [0.5]))
    mean = img.mean(axis=(0, 1)) + 0.1
    expected = (img + 0.1 - mean) * 2 + mean
    assert np.allclose(out, expected, atol=1e-3)
    grey = np.array([[[250, 250, 250], [10, 10, 10]]], dtype=np.float32)
    wide = T.color_transform(grey, Draws([0.0, 2.0, 1.0, 0.0], [0.5]))
    assert np.allclose(wide[0, :, 0], [370, -110], atol=1e-3)       # not clipped, as ViT-PCM
    # saturation 0.5 halves S at the same value (max channel) and hue
    sat = T.color_transform(img, Draws([0.0, 1.0, 0.5, 0.0], [0.5]))
    hs, hi = T.rgb_to_hsv(sat), T.rgb_to_hsv(img)
    assert np.allclose(hs[..., 1], hi[..., 1] * 0.5, atol=1e-5)
    assert np.allclose(hs[..., 2], hi[..., 2], atol=1e-3)
    # a hue shift of +0.1 (36°) turns red (200, 0, 0) into (200, 120, 0); twice, (160, 200, 0)
    red = np.array([[[200, 0, 0]]], dtype=np.float32)
    once = T.color_transform(red, Draws([0.0, 1.0, 1.0, 0.1], [0.5]))
    assert np.allclose(once, [[[200, 120, 0]]], atol=1e-3)
    twice = T.color_transform(once, Draws([0.0, 1.0, 1.0, 0.1], [0.5]))
    assert np.allclose(twice, [[[160, 200, 0]]], atol=1e-3)
    # greyscale (draw 0.05 ≤ 0.1)
    out = T.color_transform(img, Draws([0.0, 1.0, 1.0, 0.0], [0.05]))
    g = img @ T.GRAY_WEIGHTS
    assert np.allclose(out, np.repeat(g[..., None], 3, -1), atol=1e-3)


def test_affine_transform_flips_and_transposes():
    x = np.arange(2 * 3 * 1).reshape(2, 3, 1)
    y = np.arange(9).reshape(3, 3, 1)
    assert np.array_equal(T.affine_transform(x, Draws(random=[0.4, 0.9, 0.9])), x[:, ::-1])
    assert np.array_equal(T.affine_transform(x, Draws(random=[0.9, 0.4, 0.9])), x[::-1])
    assert np.array_equal(T.affine_transform(y, Draws(random=[0.9, 0.9, 0.4])),
                          y.transpose(1, 0, 2))
    assert np.array_equal(T.affine_transform(x, Draws(random=[0.9, 0.9, 0.9])), x)
    assert np.array_equal(T.affine_transform(y, Draws(random=[0.1, 0.1, 0.1])),
                          y[::-1, ::-1].transpose(1, 0, 2))


def test_augment_modes():
    img = np.random.default_rng(1).integers(0, 255, (4, 4, 3)).astype(np.uint8)
    assert T.augment(img, "none", Draws()) is img
    assert np.array_equal(T.augment(img, "hflip", Draws(random=[0.2])), img[:, ::-1])
    assert np.array_equal(T.augment(img, "hflip", Draws(random=[0.7])), img)
    out = T.augment(img, "pcm", np.random.default_rng(0))
    assert out.dtype == np.float32 and out.shape == img.shape
    with pytest.raises(CpfcteError, match="augment mode"):
        T.augment(img, "mixup", Draws())


def test_training_images_keep_their_labels_and_draws_depend_on_seed_epoch_index(toy_root):
    from cpfcte.data import TOY_CLASSES
    from cpfcte.data.voc import VOCDataset
    from cpfcte.stages.train import ClassificationData

    voc = VOCDataset(toy_root, "train", TOY_CLASSES)
    data = ClassificationData(voc, 32, "pcm", seed=0, resize="pcm")
    plain = ClassificationData(voc, 32, "none", seed=0, resize="pcm")
    x, y = data[2]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32)
    assert torch.equal(y, torch.from_numpy(voc.labels(2)))          # labels untouched
    assert torch.equal(plain[2][1], y)
    assert not torch.allclose(x, plain[2][0])
    assert torch.equal(data[2][0], x)                               # (seed, epoch, index)
    data.set_epoch(1)
    assert not torch.equal(data[2][0], x)
    other = ClassificationData(voc, 32, "pcm", seed=1, resize="pcm")
    assert not torch.equal(other[2][0], x)


def test_colour_on_the_batch_agrees_with_the_loaders_numpy_colour():
    rng = np.random.default_rng(0)
    images = (rng.random((6, 20, 24, 3)) * 255).astype(np.float32)
    params = np.stack([T.color_params(np.random.default_rng(i)) for i in range(6)])
    params[0, 4], params[1, 4] = 1.0, 0.0                       # one greyscaled, one not
    want = np.stack([T.apply_color(im, p) for im, p in zip(images, params)])
    got = T.apply_color_batch(torch.from_numpy(images).permute(0, 3, 1, 2),
                              torch.from_numpy(params)).permute(0, 2, 3, 1).numpy()
    assert np.abs(got - want).max() < 2e-3                      # 0-255 scale: rounding only
    assert np.allclose(got[0, ..., 0], got[0, ..., 1]) and np.allclose(got[0, ..., 1],
                                                                       got[0, ..., 2])
    assert not np.allclose(got[1, ..., 0], got[1, ..., 1])
    # each image its own draws: a batch of one gives the same image
    one = T.apply_color_batch(torch.from_numpy(images[3:4]).permute(0, 3, 1, 2),
                              torch.from_numpy(params[3:4]))
    assert torch.allclose(one[0].permute(1, 2, 0), torch.from_numpy(got[3]), atol=1e-4)


def test_colour_draws_are_those_of_color_transform_in_its_order():
    p = T.color_params(Draws(uniform=[0.1, 1.5, 0.7, -0.05], random=[0.05]))
    assert np.allclose(p, [0.1, 1.5, 0.7, -0.05, 1.0])
    assert T.color_params(Draws(uniform=[0, 1, 1, 0], random=[0.5]))[4] == 0.0
    x = (np.random.default_rng(1).random((8, 8, 3)) * 255).astype(np.float32)
    assert np.array_equal(T.color_transform(x, np.random.default_rng(5)),
                          T.apply_color(x, T.color_params(np.random.default_rng(5))))


def test_colour_on_device_gives_the_loaders_training_image(toy_root):
    """augment_on=device: the loader returns the flipped image and the draws of (seed, epoch,
    index); the colour applied to the batch gives the loader's own augmented image."""
    from cpfcte.data import TOY_CLASSES
    from cpfcte.data.voc import VOCDataset
    from cpfcte.stages.train import ClassificationData, device_batch

    voc = VOCDataset(toy_root, "train", TOY_CLASSES)
    loader = ClassificationData(voc, 32, "pcm", seed=0, resize="pcm")
    device = ClassificationData(voc, 32, "pcm", seed=0, resize="pcm", augment_on="device")
    for data in (loader, device):
        data.set_epoch(3)
    items = [device[i] for i in range(4)]
    assert all(len(item) == 3 and item[2].shape == (5,) for item in items)
    batch = [torch.stack([item[j] for item in items]) for j in range(3)]
    x, y = device_batch(batch, torch.device("cpu"))
    want = torch.stack([loader[i][0] for i in range(4)])
    assert x.shape == want.shape and (x - want).abs().max() < 1e-5
    assert torch.equal(y, torch.stack([loader[i][1] for i in range(4)]))
    # hflip and none have no colour: the device setting changes nothing there
    plain = ClassificationData(voc, 32, "hflip", seed=0, resize="pcm", augment_on="device")
    assert len(plain[0]) == 2
