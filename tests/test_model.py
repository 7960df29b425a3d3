import pytest
import torch

from cpfcte.machinery.errors import CpfcteError
from cpfcte.method.cf_bilstm import CFBiLSTM
from cpfcte.method.class_tokens import ClassTokens
from cpfcte.stages.train import make_model

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


def test_the_patch_classifier_has_no_bias_and_starts_from_its_init_std():
    """Eq. 7 is Z = softmax(F W): no bias; W starts from N(0, 0.05²), ViT-PCM's
    RandomNormal(stddev=0.05) (note 4), or from the std asked for."""
    from cpfcte.method.patch_classifier import PatchClassifier

    torch.manual_seed(0)
    head = PatchClassifier(400, 50)
    assert head.fc.bias is None
    assert abs(float(head.fc.weight.detach().std()) - 0.05) < 0.002
    assert abs(float(head.fc.weight.detach().mean())) < 0.002
    small = PatchClassifier(400, 50, init_std=1e-3)
    assert abs(float(small.fc.weight.detach().std()) - 1e-3) < 5e-5
    z = small(torch.randn(2, 7, 400)).softmax(-1)
    assert (z - 1 / 50).abs().max() < 0.01                  # near uniform at the old std


def test_the_l2_penalty_is_the_sum_of_squares_and_its_gradient_two_w():
    from cpfcte.method.patch_classifier import PatchClassifier

    head = PatchClassifier(3, 2)
    with torch.no_grad():
        head.fc.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]))
    penalty = head.l2_penalty()
    assert float(penalty.detach()) == 1 + 4 + 0.25 + 0 + 9 + 1  # ΣW² by hand: 15.25
    (0.01 * penalty).backward()
    assert torch.allclose(head.fc.weight.grad, 0.02 * head.fc.weight.detach())


def test_gradients_reach_class_tokens_and_both_lstms(tiny_cfg):
    model = make_model(tiny_cfg(class_tokens="soft", cf_bilstm="hv"))
    out = model(torch.rand(2, 3, 32, 32))
    (out["z"][..., 1:].sum()).backward()
    for name, param in [("class tokens", model.class_tokens.tokens),
                        ("token query", model.class_tokens.query.weight),
                        ("BiLSTM_H", model.cf_bilstm.lstm_h.forward_lstm.weight_ih_l0),
                        ("BiLSTM_H backward", model.cf_bilstm.lstm_h.backward_lstm.weight_ih_l0),
                        ("BiLSTM_V", model.cf_bilstm.lstm_v.forward_lstm.weight_ih_l0),
                        ("BiLSTM_V backward", model.cf_bilstm.lstm_v.backward_lstm.weight_ih_l0),
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


def test_the_bilstm_equals_torch_bidirectional_lstm_with_the_same_weights():
    """Two one-directional LSTMs, the second over the reversed sequence, are one
    bidirectional LSTM (Eq. 3-5): same weights, same outputs."""
    from cpfcte.method.cf_bilstm import BiLSTM

    torch.manual_seed(0)
    ours = BiLSTM(6, 5).eval()
    ref = torch.nn.LSTM(6, 5, batch_first=True, bidirectional=True)
    with torch.no_grad():
        for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            getattr(ref, name).copy_(getattr(ours.forward_lstm, name))
            getattr(ref, name + "_reverse").copy_(getattr(ours.backward_lstm, name))
        x = torch.randn(3, 7, 6)
        assert torch.allclose(ours(x), ref(x)[0], atol=1e-6)


def test_lstm_input_dropout_keeps_one_mask_per_sequence_and_direction():
    """Keras's LSTM(dropout=p): one input mask per sequence, the same at every step, scaled
    by 1/(1-p); each direction of a BiLSTM draws its own; nothing in eval mode."""
    from cpfcte.method.cf_bilstm import BiLSTM, SequenceDropout

    torch.manual_seed(0)
    drop = SequenceDropout(0.5).train()
    out = drop(torch.ones(64, 9, 16))
    assert set(out.unique().tolist()) == {0.0, 2.0}
    assert torch.equal(out, out[:, :1].expand_as(out))          # constant along the sequence
    assert 0.3 < float((out == 0).float().mean()) < 0.7
    assert torch.equal(drop.eval()(torch.ones(2, 3, 4)), torch.ones(2, 3, 4))
    seen = {}
    lstm = BiLSTM(16, 4, dropout=0.5).train()
    for name in ("drop_forward", "drop_backward"):
        getattr(lstm, name).register_forward_hook(lambda m, i, o, n=name: seen.update({n: o}))
    lstm(torch.ones(8, 5, 16))
    assert not torch.equal(seen["drop_forward"], seen["drop_backward"])


def test_dropout_acts_in_training_and_not_in_eval(tiny_cfg):
    model = make_model(tiny_cfg(dropout=0.2, lstm_dropout=0.2))
    x = torch.rand(2, 3, 32, 32)
    torch.manual_seed(1)
    a = model.train()(x)["z"]
    b = model(x)["z"]
    assert not torch.allclose(a, b)
    model.eval()
    assert torch.equal(model(x)["z"], model(x)["z"])
    assert model.drop_context.p == 0.2 and model.drop_classifier.p == 0.2
    assert make_model(tiny_cfg(cf_bilstm="none")).drop_context is None


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
    from cpfcte.machinery.config import load_config
    from cpfcte.method.network import build_backbone

    with pytest.raises(CpfcteError, match="randomly initialised"):
        load_config("voc", {"pretrained": False})
    cfg = load_config("voc", {"pretrained": False, "weights": str(tmp_path / "missing.pth")})
    with pytest.raises(CpfcteError, match="weights not found"):
        build_backbone(cfg)


def test_local_weights_that_do_not_fit_are_refused(tiny_cfg, tmp_path):
    from cpfcte.method.network import build_backbone

    path = tmp_path / "wrong.pth"
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, path)
    cfg = tiny_cfg(weights=str(path))
    with pytest.raises(CpfcteError, match="does not fit"):
        build_backbone(cfg)


def test_local_weights_round_trip(tiny_cfg, tmp_path):
    from cpfcte.method.network import build_backbone

    cfg = tiny_cfg()
    src = build_backbone(cfg)
    path = tmp_path / "vit.pth"
    torch.save(src.state_dict(), path)
    loaded = build_backbone(tiny_cfg(weights=str(path), seed=123))
    for k, v in src.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_the_bilstms_run_in_float32_under_autocast():
    """Under autocast (bf16 here on the CPU; on CUDA cuDNN's LSTM would otherwise run in
    float16), both LSTMs of a BiLSTM take and give float32 (note 13)."""
    from cpfcte.method.cf_bilstm import BiLSTM

    lstm = BiLSTM(6, 5)
    seen = []
    for sub in (lstm.forward_lstm, lstm.backward_lstm):
        sub.register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, o[0].dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = torch.nn.Linear(4, 6)(torch.randn(3, 7, 4))          # bf16 under autocast
        assert x.dtype == torch.bfloat16
        out = lstm(x)
    assert out.dtype == torch.float32
    assert seen == [(torch.float32, torch.float32)] * 2
