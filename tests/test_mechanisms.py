"""The paper's mechanisms do something, and stage 1 measures it (note 23): the class tokens'
assignment leaves its uniform start, the diagnostics give known answers, every epoch records
them; ViT-PCM's LSTM initialisation and its fresh Adam at the phase change (notes 3, 6); the
head in float32 (note 13)."""

import math

import pytest
import torch

from cpfcte.method.class_tokens import PATCH_SCALE, VIT_STD, ClassTokens
from cpfcte.method.diagnostics import ALIVE_MAX_WEIGHT, class_token_diagnostics
from cpfcte.method.mce_loss import mce_loss
from cpfcte.method.patch_classifier import PatchClassifier
from cpfcte.method.topk_pooling import pool
from cpfcte.stages.train import make_model, train


def separable_patches(n=64, s=16, e=32, classes=4, seed=0):
    """Images of s patches: half of each image's patches near the prototype of its one
    foreground class, half near the background's; labels: background + that class."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(classes, e, generator=g)
    y = torch.zeros(n, classes)
    y[:, 0] = 1
    which = torch.zeros(n, s, dtype=torch.long)
    for i in range(n):
        c = 1 + i % (classes - 1)
        y[i, c] = 1
        which[i, : s // 2] = c
    return protos[which] + 0.1 * torch.randn(n, s, e, generator=g), y


def mean_largest_weight_after_training(init_std: float, steps: int = 100) -> tuple[float, float]:
    """Class tokens (H = 16) + the patch classifier trained with top-k pooling and the MCE loss
    at the paper's warm-up learning rate: (mean largest assignment weight before, after)."""
    torch.manual_seed(0)
    x, y = separable_patches()
    classes = y.shape[1]
    tokens = ClassTokens(classes, x.shape[-1], 16, "soft", init_std)
    classifier = PatchClassifier(x.shape[-1] + 16, classes)
    opt = torch.optim.Adam([*tokens.parameters(), *classifier.parameters()], lr=1e-3, eps=1e-7)
    with torch.no_grad():
        before = float(tokens.assignment(x).amax(-1).mean())
    for _ in range(steps):
        z = classifier(tokens(x)).softmax(-1)
        loss = mce_loss(pool(z, "topk", 2), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return before, float(tokens.assignment(x).amax(-1).mean())


def test_the_class_tokens_assignment_leaves_uniform_from_the_patch_scale_start():
    classes = 4
    before, after = mean_largest_weight_after_training(PATCH_SCALE)
    assert after >= ALIVE_MAX_WEIGHT / classes and after > before + 0.2, (before, after)


def test_from_the_old_start_the_assignment_stays_near_uniform():
    """The control: tokens at ViT's std 0.02 give logits of ~1e-2, and 100 steps leave the
    assignment near 1/C: the defect note 23 records."""
    classes = 4
    before, after = mean_largest_weight_after_training(VIT_STD)
    assert before < 1.1 / classes and after < ALIVE_MAX_WEIGHT / classes, (before, after)


def test_the_patch_scale_start_gives_logits_of_order_one_at_the_voc_widths():
    """e = 768 patch features of unit rms (after the ViT's LayerNorm), H = 256 (note 11)."""
    torch.manual_seed(0)
    p = torch.nn.functional.layer_norm(torch.randn(2, 50, 768), (768,))
    new = ClassTokens(21, 768, 256, "soft", PATCH_SCALE).logits(p).std()
    old = ClassTokens(21, 768, 256, "soft", VIT_STD).logits(p).std()
    assert 0.3 < new < 3.0 and old < 0.03, (new, old)


def _images(tiny_cfg, n=6):
    cfg = tiny_cfg()
    x = torch.rand(n, 3, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(n, 11)
    y[:, 0] = 1
    y[torch.arange(n), 1 + torch.arange(n) % 10] = 1
    return x, y


def test_diagnostics_of_near_uniform_tokens_read_uniform(tiny_cfg):
    x, y = _images(tiny_cfg)
    d = class_token_diagnostics(make_model(tiny_cfg(token_init_std=1e-4)), x, y, k=2)
    assert d["entropy"] > 0.9999 and abs(d["max_weight"] - 1 / 11) < 1e-3
    assert d["swap_changed"] == 0.0 and not d["alive"]
    assert set(d) >= {"entropy", "max_weight", "logit_std", "swap_changed", "swap_max_dz",
                      "token_rms", "patch_rms", "label_map", "alive"}


def test_mean_tokens_never_change_a_label_and_no_tokens_measure_only_the_patches(tiny_cfg):
    x, y = _images(tiny_cfg)
    mean = class_token_diagnostics(make_model(tiny_cfg(class_tokens="mean")), x, y, k=2)
    assert mean["swap_changed"] == 0.0 and mean["swap_max_dz"] == 0.0 and not mean["alive"]
    assert "entropy" not in mean
    none = class_token_diagnostics(make_model(tiny_cfg(class_tokens="none")), x, y, k=2)
    assert none["class_tokens"] == "none" and "swap_changed" not in none
    assert math.isfinite(none["patch_rms"])


def test_the_swap_is_measured_on_the_bpm_labels(tiny_cfg):
    """A model whose tokens decide the classifier: with the classifier's weights on the token
    half only, Z depends on t(i) alone, and the mean-token swap changes labels."""
    x, y = _images(tiny_cfg)
    y[:, 1:] = 1                                       # every class allowed in the BPM
    model = make_model(tiny_cfg(token_init_std=3.0, cf_bilstm="none"))
    with torch.no_grad():
        e = model.backbone.embed_dim
        model.classifier.fc.weight[:, :e] = 0
        model.classifier.fc.weight[:, e:] *= 50
    d = class_token_diagnostics(model, x, y, k=2)
    assert d["swap_changed"] > 0.05 and d["swap_max_dz"] > 0.1


def test_diagnostics_leave_the_model_in_its_mode(tiny_cfg):
    x, y = _images(tiny_cfg)
    model = make_model(tiny_cfg()).train()
    class_token_diagnostics(model, x, y, k=2)
    assert model.training


def test_every_epoch_records_the_mechanisms_and_the_log_says_them(tiny_cfg, tmp_path):
    summary = train(tiny_cfg(diagnostic_images=5), tmp_path / "r", progress=False)
    for record in summary["history"]:
        m = record["mechanisms"]
        assert m["images"] == 5 and 0 <= m["entropy"] <= 1 and 0 <= m["swap_changed"] <= 1
    assert summary["mechanisms"] == summary["history"][-1]["mechanisms"]
    assert "mean-token swap changes" in (tmp_path / "r" / "log.txt").read_text()
    off = train(tiny_cfg(diagnostic_images=0), tmp_path / "off", progress=False)
    assert "mechanisms" not in off["history"][0] and off["mechanisms"] is None


@pytest.mark.parametrize("fresh", [True, False])
def test_a_fresh_adam_at_the_phase_change(tiny_cfg, tmp_path, fresh):
    """ViT-PCM compiles a new Adam after unfreeze() (main.py): the head's Adam state then
    counts only the steps since the warm-up ended; with one Adam it counts them all."""
    from cpfcte.data import open_split

    cfg = tiny_cfg(optimizer_per_phase=fresh, epochs=3, warmup_epochs=1)
    train(cfg, tmp_path / "r", progress=False)
    n = len(open_split(cfg, cfg.train_split))
    per_epoch = n // cfg.batch_size if n > cfg.batch_size else 1
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["optimizer"]
    steps = max(int(s["step"]) for s in state["state"].values())
    assert steps == per_epoch * (2 if fresh else 3), (steps, per_epoch)


def test_keras_lstm_init_is_vit_pcms():
    """glorot_uniform input kernel, orthogonal recurrent kernel, forget-gate bias 1 (Keras's
    unit_forget_bias), every other bias 0; torch's own init is kept as a switch."""
    from cpfcte.method.cf_bilstm import BiLSTM

    torch.manual_seed(0)
    lstm = BiLSTM(40, 8, init="keras").forward_lstm
    d = 8
    assert torch.equal(lstm.bias_ih_l0[d:2 * d], torch.ones(d))
    assert torch.count_nonzero(lstm.bias_ih_l0) == d and torch.count_nonzero(lstm.bias_hh_l0) == 0
    w = lstm.weight_hh_l0                                   # (4d, d): orthonormal columns
    assert torch.allclose(w.t() @ w, torch.eye(d), atol=1e-5)
    limit = math.sqrt(6 / (40 + 4 * d))
    assert lstm.weight_ih_l0.abs().max() <= limit
    assert abs(lstm.weight_ih_l0.var().item() - limit ** 2 / 3) < 0.2 * limit ** 2 / 3
    default = BiLSTM(40, 8, init="torch").forward_lstm
    assert torch.count_nonzero(default.bias_hh_l0) == 4 * d


def test_the_whole_head_runs_in_float32_under_autocast(tiny_cfg):
    """The ViT under bf16 autocast, the class tokens, the CF-BiLSTM with W_c and the classifier
    in float32 (note 13)."""
    model = make_model(tiny_cfg()).eval()
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen[name] = (inputs[0].dtype, output.dtype)
        return hook

    for name in ("class_tokens", "cf_bilstm", "classifier"):
        getattr(model, name).register_forward_hook(record(name))
    model.cf_bilstm.proj.register_forward_hook(record("W_c"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(2, 3, 32, 32))
    assert all(v == (torch.float32, torch.float32) for v in seen.values()), seen
    assert len(seen) == 4 and out["logits"].dtype == torch.float32


def test_strict_float32_sets_ieee_for_cudnn_rnns_and_restores_it():
    """cuDNN's RNNs default to TF32 (torch ≥ 2.9): inside the block the flag reads ieee, after
    it what was there (read without a GPU: the flag is a process setting)."""
    from cpfcte.machinery.precision import rnn_precision, strict_float32

    before = rnn_precision()
    with strict_float32("cuda"):
        assert rnn_precision() in ("ieee", "allow_tf32=False")
    assert rnn_precision() == before
    with strict_float32("cpu"):
        assert rnn_precision() == before
