import pytest
import torch

from cpfcte.errors import CpfcteError
from cpfcte.model import CFBiLSTM, ClassTokens
from cpfcte.train import make_model

VARIANTS = [(t, c) for t in ("none", "soft", "mean") for c in ("none", "hv", "raster")]


@pytest.mark.parametrize("tokens,context", VARIANTS)
def test_output_shapes_every_variant(tiny_cfg, tokens, context):
    cfg = tiny_cfg(class_tokens=tokens, cf_bilstm=context)
    model = make_model(cfg)
    out = model(torch.randint(0, 256, (2, 3, 32, 48), dtype=torch.uint8))
    assert out["grid"] == (4, 6)                       # prefix token dropped: s = h·w
    assert out["z"].shape == (2, 24, 11)               # (B, s, C), C = 10 toy classes + bg
    assert torch.allclose(out["z"].sum(-1), torch.ones(2, 24), atol=1e-5)  # softmax (Eq. 7)
    e = 32
    width = e + (8 if tokens != "none" else 0)
    assert model.classifier.fc.in_features == width    # Eq. 6/7 keep e+H


def test_projection_option_maps_back_to_e(tiny_cfg):
    model = make_model(tiny_cfg(project_tokens=True))
    assert model.classifier.fc.in_features == 32
    assert model.token_proj.in_features == 40


def test_the_patch_classifier_has_no_bias_and_starts_near_uniform(tiny_cfg):
    """Eq. 7 is Z = softmax(F W): no bias; W starts near zero (note 4), so every class starts
    with almost the same score 1/C on every patch."""
    model = make_model(tiny_cfg(class_tokens="none", cf_bilstm="none"))
    assert model.classifier.fc.bias is None
    z = model(torch.rand(2, 3, 32, 32))["z"]
    assert (z - 1 / z.shape[-1]).abs().max() < 0.01


def test_gradients_reach_class_tokens_and_both_lstms(tiny_cfg):
    model = make_model(tiny_cfg(class_tokens="soft", cf_bilstm="hv"))
    out = model(torch.rand(2, 3, 32, 32))
    (out["z"][..., 1:].sum()).backward()
    for name, param in [("class tokens", model.class_tokens.tokens),
                        ("token query", model.class_tokens.query.weight),
                        ("BiLSTM_H", model.cf_bilstm.lstm_h.weight_ih_l0),
                        ("BiLSTM_H backward", model.cf_bilstm.lstm_h.weight_ih_l0_reverse),
                        ("BiLSTM_V", model.cf_bilstm.lstm_v.weight_ih_l0),
                        ("BiLSTM_V backward", model.cf_bilstm.lstm_v.weight_ih_l0_reverse),
                        ("W_c", model.cf_bilstm.proj.weight),
                        ("ViT", model.backbone.patch_embed.proj.weight)]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_hv_context_follows_rows_and_columns():
    """BiLSTM_H mixes along rows and BiLSTM_V along columns: changing patch (r, c) changes the
    output of every patch in row r and column c, and of no other patch."""
    torch.manual_seed(0)
    lstm = CFBiLSTM(dim=6, hidden=5, mode="hv").eval()
    h, w = 4, 5
    f = torch.randn(1, h * w, 6)
    g = f.clone()
    r, c = 2, 1
    g[0, r * w + c] += 1.0
    with torch.no_grad():
        diff = (lstm(f, (h, w)) - lstm(g, (h, w))).abs().sum(-1).reshape(h, w) > 1e-6
    expected = torch.zeros(h, w, dtype=torch.bool)
    expected[r, :] = True
    expected[:, c] = True
    assert torch.equal(diff, expected)


def test_raster_context_reaches_the_whole_sequence():
    torch.manual_seed(0)
    lstm = CFBiLSTM(dim=6, hidden=5, mode="raster").eval()
    f = torch.randn(1, 12, 6)
    g = f.clone()
    g[0, 5] += 1.0
    with torch.no_grad():
        diff = (lstm(f, (3, 4)) - lstm(g, (3, 4))).abs().sum(-1)
    assert (diff > 1e-6).all()  # bidirectional: before and after the changed patch


def test_soft_class_tokens_are_convex_combinations():
    torch.manual_seed(0)
    ct = ClassTokens(num_classes=4, embed_dim=6, token_dim=3, mode="soft")
    p = torch.randn(2, 5, 6)
    a = ct.assignment(p)
    assert torch.allclose(a.sum(-1), torch.ones(2, 5))
    f = ct(p)
    assert torch.equal(f[..., :6], p)                       # Eq. 2: Concat(p_i, t(i))
    assert torch.allclose(f[..., 6:], a @ ct.tokens.detach(), atol=1e-6)


def test_mean_class_tokens_are_the_same_for_every_patch():
    ct = ClassTokens(num_classes=4, embed_dim=6, token_dim=3, mode="mean")
    f = ct(torch.randn(2, 5, 6))
    assert torch.allclose(f[..., 6:], ct.tokens.detach().mean(0).expand(2, 5, 3))


def test_inference_at_a_larger_size_interpolates_position_embeddings(tiny_cfg):
    model = make_model(tiny_cfg()).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 80, 80))
    assert out["grid"] == (10, 10) and out["z"].shape == (1, 100, 11)


def test_bad_image_sizes_are_refused(tiny_cfg):
    model = make_model(tiny_cfg())
    with pytest.raises(CpfcteError, match="not divisible by the patch size"):
        model(torch.rand(1, 3, 30, 32))
    with pytest.raises(CpfcteError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(3, 32, 32))


def test_non_toy_profile_never_initialises_randomly_in_silence(tmp_path):
    from cpfcte.config import load_config
    from cpfcte.model import build_backbone

    with pytest.raises(CpfcteError, match="randomly initialised"):
        load_config("voc", {"pretrained": False})
    cfg = load_config("voc", {"pretrained": False, "weights": str(tmp_path / "missing.pth")})
    with pytest.raises(CpfcteError, match="weights not found"):
        build_backbone(cfg)


def test_local_weights_that_do_not_fit_are_refused(tiny_cfg, tmp_path):
    from cpfcte.model import build_backbone

    path = tmp_path / "wrong.pth"
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, path)
    cfg = tiny_cfg(weights=str(path))
    with pytest.raises(CpfcteError, match="does not fit"):
        build_backbone(cfg)


def test_local_weights_round_trip(tiny_cfg, tmp_path):
    from cpfcte.model import build_backbone

    cfg = tiny_cfg()
    src = build_backbone(cfg)
    path = tmp_path / "vit.pth"
    torch.save(src.state_dict(), path)
    loaded = build_backbone(tiny_cfg(weights=str(path), seed=123))
    for k, v in src.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
