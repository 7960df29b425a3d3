import math

import pytest
import torch

from cpfcte.machinery.errors import CpfcteError
from cpfcte.method.mce_loss import mce_loss
from cpfcte.method.topk_pooling import pool, topk_pool


def test_topk_pooling_by_hand():
    # one image, s = 5 patches, C = 2 classes
    z = torch.tensor([[[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6], [0.5, 0.5]]])
    assert torch.allclose(topk_pool(z, 2), torch.tensor([[(0.9 + 0.7) / 2, (0.8 + 0.6) / 2]]))
    assert torch.allclose(pool(z, "topk", 1), pool(z, "gmp"))
    assert torch.allclose(pool(z, "topk", 5), pool(z, "gap"))
    assert torch.allclose(pool(z, "gap"), torch.tensor([[0.54, 0.46]]))
    assert torch.allclose(pool(z, "gmp"), torch.tensor([[0.9, 0.8]]))


def test_top1_pooling_is_max_pooling_in_value_and_gradient():
    """Fig. 4's k = 1 point reads Table 5's max-pooling runs: the two train the same network."""
    z = torch.rand(3, 7, 4, generator=torch.Generator().manual_seed(0))
    grads = []
    for mode, k in (("topk", 1), ("gmp", 4)):
        x = z.clone().requires_grad_(True)
        out = pool(x, mode, k)
        out.backward(torch.arange(12.0).view(3, 4))
        grads.append((out.detach(), x.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_topk_with_k_larger_than_patches_is_refused():
    with pytest.raises(CpfcteError, match="1 ≤ k ≤ s"):
        topk_pool(torch.rand(1, 3, 2), 4)
    with pytest.raises(CpfcteError, match="unknown pooling"):
        pool(torch.rand(1, 3, 2), "median")


def test_mce_loss_by_hand():
    p = torch.tensor([[0.9, 0.2], [0.5, 0.5]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    expected = (-(math.log(0.9) + math.log(0.8)) / 2 + -(math.log(0.5) + math.log(0.5)) / 2) / 2
    assert mce_loss(p, y).item() == pytest.approx(expected, rel=1e-6)


def test_mce_loss_is_keras_binary_crossentropy_at_the_extremes():
    """Keras's binary_crossentropy on probabilities (ViT-PCM's loss): p clipped to
    [1e-7, 1 - 1e-7], then log(p + 1e-7) and log(1 - p + 1e-7); by hand, in float32."""
    eps = torch.tensor(1e-7, dtype=torch.float32)
    p = torch.tensor([[1.0, 0.0]])
    y = torch.tensor([[0.0, 1.0]])
    hi = torch.clamp(torch.tensor(1.0), eps, 1 - eps)
    lo = torch.clamp(torch.tensor(0.0), eps, 1 - eps)
    expected = -(torch.log(1 - hi + eps) + torch.log(lo + eps)) / 2
    assert mce_loss(p, y).item() == pytest.approx(expected.item(), rel=1e-6)
    assert 15.3 < expected.item() < 15.5          # -log(2e-7) ≈ 15.42: capped, not infinite


def test_mce_loss_is_float32_and_finite_at_the_extremes():
    p = torch.tensor([[1.0, 0.0]], dtype=torch.bfloat16, requires_grad=True)
    loss = mce_loss(p, torch.tensor([[0.0, 1.0]]))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(p.grad.float()).all()


def test_mce_loss_shape_mismatch_is_refused():
    with pytest.raises(CpfcteError, match="differ in shape"):
        mce_loss(torch.rand(2, 3), torch.rand(2, 4))
