import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cpfcte.machinery.errors import CpfcteError
from cpfcte.machinery.runfolder import CHECKPOINT
from cpfcte.method.caffe_resnet import kazuto_key
from cpfcte.method.deeplabv2 import ASPP, build_deeplab, msc_logits, param_groups, poly_lr
from cpfcte.stages.deeplab_predict import predict_probs
from cpfcte.stages.deeplab_train import train_deeplab

TINY = dict(backbone="resnet10t", backbone_kwargs={"channels": [8, 8, 16, 16]}, pretrained=False,
            crop=32, batch=2, iterations=4, ckpt_every=2, workers=0, msc=False, freeze_bn=False,
            test_scales=[0.75, 1.0])
TINY_DL = {"deeplab": TINY}


def dl(**changes):
    """The tiny DeepLabv2 section with ``changes``."""
    return {"deeplab": {**TINY, **changes}}


def test_output_stride_8(tiny_cfg):
    model = build_deeplab(tiny_cfg(**TINY_DL), 11)
    assert model(torch.rand(2, 3, 64, 96)).shape == (2, 11, 8, 12)


def test_aspp_sums_four_dilated_branches():
    torch.manual_seed(0)
    aspp = ASPP(5, 3, rates=(6, 12, 18, 24))
    assert [b.dilation for b in aspp.branches] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    x = torch.randn(1, 5, 30, 30)
    by_hand = sum(F.conv2d(x, b.weight, b.bias, padding=r, dilation=r)
                  for b, r in zip(aspp.branches, (6, 12, 18, 24)))
    assert torch.allclose(aspp(x), by_hand, atol=1e-6) and aspp(x).shape == (1, 3, 30, 30)


def test_parameter_groups_get_10x_and_20x(tiny_cfg):
    model = build_deeplab(tiny_cfg(**TINY_DL), 11)
    groups = param_groups(model, 2.5e-4, 5e-4)
    assert [g["lr"] for g in groups] == [2.5e-4, 2.5e-3, 5e-3]
    assert [g["weight_decay"] for g in groups] == [5e-4, 5e-4, 0.0]
    assert all(p.ndim == 4 for p in groups[1]["params"]) and all(p.ndim == 1 for p in groups[2]["params"])
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(ids) == len(set(ids)) and set(ids) == trainable


def test_poly_schedule_known_values():
    assert poly_lr(1e-3, 0, 100) == pytest.approx(1e-3)
    assert poly_lr(1e-3, 50, 100) == pytest.approx(1e-3 * 0.5 ** 0.9)
    assert poly_lr(1e-3, 90, 100) == pytest.approx(1e-3 * 0.1 ** 0.9)
    assert poly_lr(1e-3, 100, 100) == 0.0


def test_frozen_batchnorm_stays_frozen(tiny_cfg):
    model = build_deeplab(tiny_cfg(**dl(freeze_bn=True)), 11).train()
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert all(not p.requires_grad for m in bns for p in m.parameters())


def test_msc_returns_each_scale_and_their_max(tiny_cfg):
    """As kazuto1011's MSC: logits at scale 1 and at ⌊0.75·321⌋ = 240 and ⌊0.5·321⌋ = 160
    (their own sizes), and the max of all three at the scale-1 size."""
    model = build_deeplab(tiny_cfg(**TINY_DL), 11).eval()
    outs = msc_logits(model, torch.rand(1, 3, 321, 321))
    assert [tuple(o.shape[-2:]) for o in outs] == [(41, 41), (30, 30), (20, 20), (41, 41)]
    up = [F.interpolate(o, size=(41, 41), mode="bilinear", align_corners=False)
          for o in outs[1:3]]
    assert torch.equal(outs[3], torch.stack([outs[0], *up]).amax(0))


def test_the_loss_resizes_the_labels_to_each_output_or_the_outputs_to_the_labels():
    """loss_size=logits (kazuto1011's resize_labels): nearest with pixel centres, as PIL's
    NEAREST; labels: each output upsampled to the labels. Both sum the terms."""
    from PIL import Image

    from cpfcte.method.deeplabv2 import msc_loss

    torch.manual_seed(0)
    y = torch.randint(0, 3, (2, 9, 9))
    y[0, 0, :4] = 255
    small = torch.randn(2, 3, 4, 4)
    full = torch.randn(2, 3, 9, 9)
    pil = torch.stack([torch.from_numpy(np.array(Image.fromarray(t.numpy().astype(np.float32))
                                                 .resize((4, 4), Image.NEAREST))).long()
                       for t in y])
    expected = (F.cross_entropy(small, pil, ignore_index=255)
                + F.cross_entropy(full, y, ignore_index=255))
    assert torch.allclose(msc_loss([small, full], y), expected)
    up = F.interpolate(small, size=(9, 9), mode="bilinear", align_corners=False)
    assert torch.allclose(msc_loss([small, full], y, size="labels"),
                          F.cross_entropy(up, y, ignore_index=255)
                          + F.cross_entropy(full, y, ignore_index=255))
    assert torch.allclose(msc_loss([small, full], y, "mean"), expected / 2)


@pytest.mark.parametrize("backbone", ["resnet10t", "caffe_resnet101"])
def test_every_msc_branch_sees_the_same_value_range(tiny_cfg, backbone):
    """A uint8 batch, resized for the 0.75 and 0.5 branches: each branch's backbone input (after
    the model's own normalisation) covers the range the scale-1 branch's does. (The smaller
    branches used to get floats in 0-255, taken as [0, 1]: 255 times too bright.)"""
    kw = {} if backbone == "resnet10t" else {"backbone_kwargs": {"blocks": [1, 1, 1, 1]}}
    model = build_deeplab(tiny_cfg(**dl(backbone=backbone, **kw)), 11).eval()
    seen = []
    model.backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
    x[:, :, :32] = 255                                   # half white, half black
    with torch.no_grad():
        msc_logits(model, x)
    assert len(seen) == 3
    ranges = [(float(t.amin()), float(t.amax())) for t in seen]
    for lo, hi in ranges[1:]:
        assert lo == pytest.approx(ranges[0][0], abs=1e-4)
        assert hi == pytest.approx(ranges[0][1], abs=1e-4)


def test_multiscale_flip_inference_equals_hand_composed_calls(tiny_cfg):
    torch.manual_seed(0)
    model = build_deeplab(tiny_cfg(**TINY_DL), 11).eval()
    image = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    got = predict_probs(model, image, scales=(0.5, 1.0), flip=True)
    x = torch.from_numpy(image.transpose(2, 0, 1).copy())[None].float() / 255
    parts = []
    with torch.no_grad():
        for size in ((20, 28), (40, 56)):
            xs = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            for flip in (False, True):
                logits = model(xs.flip(-1) if flip else xs)
                logits = logits.flip(-1) if flip else logits
                parts.append(F.interpolate(logits, size=(40, 56), mode="bilinear",
                                           align_corners=False)[0].softmax(0))
    assert got.shape == (11, 40, 56)
    assert torch.allclose(got, torch.stack(parts).mean(0), atol=1e-5)
    assert torch.allclose(got.sum(0), torch.ones(40, 56), atol=1e-5)


def _pseudo_dir(toy_root, tmp_path):
    """Pseudo labels for train_aug made from the toy masks' classes, shifted: not ground truth,
    the right format and sizes."""
    from cpfcte.data.voc import read_split
    from cpfcte.machinery.io import read_label_png, save_label_png

    out = tmp_path / "pseudo"
    for image_id in read_split(toy_root, "train_aug"):
        m = read_label_png(toy_root / "SegmentationClassAug" / f"{image_id}.png")
        m = np.where(m == 255, 0, m)
        save_label_png(out / f"{image_id}.png", np.roll(m, 1, axis=1))
    return out


def test_training_refuses_ground_truth_as_pseudo_labels(tiny_cfg, toy_root, tmp_path):
    cfg = tiny_cfg(**TINY_DL)
    for gt in ("SegmentationClassAug", "SegmentationClass"):
        with pytest.raises(CpfcteError, match="ground-truth folder"):
            train_deeplab(cfg, toy_root / gt, tmp_path / "r", progress=False)
    with pytest.raises(CpfcteError, match="pseudo-label folder not found"):
        train_deeplab(cfg, tmp_path / "none", tmp_path / "r", progress=False)


def test_resume_equals_an_uninterrupted_run(tiny_cfg, toy_root, tmp_path):
    cfg = tiny_cfg(**TINY_DL)
    pseudo = _pseudo_dir(toy_root, tmp_path)
    full = train_deeplab(cfg, pseudo, tmp_path / "full", progress=False)
    part = train_deeplab(cfg, pseudo, tmp_path / "part", max_iterations=2, progress=False)
    assert part["iterations_done"] == 2 and not part["complete"]
    done = train_deeplab(cfg, pseudo, tmp_path / "part", progress=False)
    assert done["complete"] and [h["loss"] for h in done["history"]] == [
        h["loss"] for h in full["history"]]
    a = torch.load(tmp_path / "full" / CHECKPOINT, weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / CHECKPOINT, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CpfcteError, match="another config"):
        train_deeplab(tiny_cfg(**dl(lr=1.0)), pseudo, tmp_path / "full", progress=False)


def test_deeplab_stage_scores_val_and_writes_metrics(tiny_cfg, toy_root, tmp_path):
    from cpfcte.stages.deeplab_predict import deeplab_stage

    cfg = tiny_cfg(**TINY_DL)
    m = deeplab_stage(cfg, _pseudo_dir(toy_root, tmp_path), tmp_path / "d", progress=False)
    assert m["images"] == 4 and 0 <= m["miou"] <= 1 and 0 <= m["no_crf"]["miou"] <= 1
    assert len(list((tmp_path / "d" / "val" / "pred_crf").glob("*.png"))) == 4
    assert (tmp_path / "d" / "metrics.json").exists()


def test_kazuto_keys_map_by_prefix():
    assert kazuto_key("base.layer1.conv1.conv.weight") == "backbone.layer1.conv1.conv.weight"
    assert kazuto_key("module.base.layer3.block2.conv3x3.bn.running_var") == \
        "backbone.layer3.block2.conv3x3.bn.running_var"
    assert kazuto_key("scale.layer2.block1.proj.conv.weight") == \
        "backbone.layer2.block1.shortcut.conv.weight"             # the older name
    assert kazuto_key("base.aspp.c3.bias") == "aspp.branches.3.bias"
    assert kazuto_key("scale.aspp.stages.c1.weight") == "aspp.branches.1.weight"
    assert kazuto_key("fc.weight") is None                         # DeepLabv1's head


# kazuto1011/deeplab-pytorch's DeepLabv2, written out here on its own (libs/models/resnet.py,
# deeplabv2.py, msc.py): the reference the project's Caffe-style ResNet must match
class _KConv(torch.nn.Sequential):
    def __init__(self, cin, cout, k, stride, pad, dil, relu=True):
        super().__init__()
        self.add_module("conv", torch.nn.Conv2d(cin, cout, k, stride, pad, dil, bias=False))
        self.add_module("bn", torch.nn.BatchNorm2d(cout, eps=1e-5))
        if relu:
            self.add_module("relu", torch.nn.ReLU())


class _KBottleneck(torch.nn.Module):
    def __init__(self, cin, cout, stride, dil, down):
        super().__init__()
        self.reduce = _KConv(cin, cout // 4, 1, stride, 0, 1)
        self.conv3x3 = _KConv(cout // 4, cout // 4, 3, 1, dil, dil)
        self.increase = _KConv(cout // 4, cout, 1, 1, 0, 1, relu=False)
        self.shortcut = _KConv(cin, cout, 1, stride, 0, 1, relu=False) if down else None

    def forward(self, x):
        h = self.increase(self.conv3x3(self.reduce(x)))
        return F.relu(h + (self.shortcut(x) if self.shortcut is not None else x))


class _KDeepLabV2(torch.nn.Sequential):
    def __init__(self, n_classes, blocks):
        super().__init__()
        stem = torch.nn.Sequential()
        stem.add_module("conv1", _KConv(3, 64, 7, 2, 3, 1))
        stem.add_module("pool", torch.nn.MaxPool2d(3, 2, 1, ceil_mode=True))
        self.add_module("layer1", stem)
        spec = [(64, 256, 1, 1), (256, 512, 2, 1), (512, 1024, 1, 2), (1024, 2048, 1, 4)]
        for li, ((cin, cout, stride, dil), n) in enumerate(zip(spec, blocks)):
            layer = torch.nn.Sequential()
            for b in range(n):
                layer.add_module(f"block{b + 1}", _KBottleneck(cin if b == 0 else cout, cout,
                                                               stride if b == 0 else 1, dil,
                                                               b == 0))
            self.add_module(f"layer{li + 2}", layer)
        aspp = torch.nn.Module()
        for i, r in enumerate((6, 12, 18, 24)):
            aspp.add_module(f"c{i}", torch.nn.Conv2d(2048, n_classes, 3, 1, r, r, bias=True))
        aspp.forward = lambda x: sum(c(x) for c in aspp.children())
        self.add_module("aspp", aspp)


class _KMSC(torch.nn.Module):
    def __init__(self, base):
        super().__init__()
        self.base = base


def test_a_kazuto_checkpoint_computes_here_what_it_computes_there(tiny_cfg, tmp_path):
    """Random weights and random BatchNorm statistics in kazuto1011's network, saved as his
    MSC model saves them; loaded through deeplab.init into caffe_resnet101, the logits on the
    same image agree to 1e-4 (relative). His input is BGR, 0-255, minus the Caffe mean; ours
    is the RGB uint8 image."""
    torch.manual_seed(0)
    ref = _KDeepLabV2(11, (1, 2, 2, 1))
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
            elif isinstance(m, torch.nn.Conv2d):
                torch.nn.init.normal_(m.weight, std=(2 / m.weight[0].numel()) ** 0.5)
                if m.bias is not None:
                    m.bias.uniform_(-0.1, 0.1)
    ref.eval()
    torch.save(_KMSC(ref).state_dict(), tmp_path / "kazuto.pth")
    cfg = tiny_cfg(**dl(backbone="caffe_resnet101", backbone_kwargs={"blocks": [1, 2, 2, 1]},
                        init=str(tmp_path / "kazuto.pth"), freeze_bn=True))
    ours = build_deeplab(cfg, 11).eval()
    image = np.random.default_rng(0).integers(0, 256, (70, 66, 3), dtype=np.uint8)
    x = torch.from_numpy(image.transpose(2, 0, 1).copy())[None]
    bgr = x.flip(1).float() - torch.tensor([104.008, 116.669, 122.675]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = ref(bgr)
        got = ours(x)
    assert got.shape == expected.shape == (1, 11, 9, 9)
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-4
    assert ours.pad_rgb == (123, 117, 104)                  # the Caffe mean, in RGB


def test_inits_that_do_not_fit_are_refused(tiny_cfg, tmp_path):
    torch.manual_seed(0)
    torch.save(_KMSC(_KDeepLabV2(11, (1, 1, 1, 1))).state_dict(), tmp_path / "kazuto.pth")
    timm_cfg = tiny_cfg(**dl(init=str(tmp_path / "kazuto.pth")))
    with pytest.raises(CpfcteError, match="kazuto1011.*set deeplab.backbone=caffe_resnet101"):
        build_deeplab(timm_cfg, 11)
    from cpfcte.method.deeplabv2 import detect_backbone  # what the stage does first

    detected = detect_backbone(timm_cfg)
    assert detected.deeplab.backbone == "caffe_resnet101" and timm_cfg.deeplab.backbone == "resnet10t"
    assert detect_backbone(tiny_cfg(**TINY_DL)).deeplab.backbone == "resnet10t"
    torch.save({"base.layer1.conv1.conv.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    caffe = dl(backbone="caffe_resnet101", backbone_kwargs={"blocks": [1, 1, 1, 1]})
    with pytest.raises(CpfcteError, match="bad.pth: does not fit DeepLabv2"):
        build_deeplab(tiny_cfg(**{"deeplab": {**caffe["deeplab"],
                                              "init": str(tmp_path / "bad.pth")}}), 11)
    with pytest.raises(CpfcteError, match="no ImageNet weights"):
        build_deeplab(tiny_cfg(**caffe, random_init_ok=False), 11)
    with pytest.raises(CpfcteError, match="missing.pth: DeepLab init file not found"):
        build_deeplab(tiny_cfg(**{"deeplab": {**caffe["deeplab"],
                                              "init": str(tmp_path / "missing.pth")}}), 11)


def test_our_own_deeplab_state_round_trips_as_init(tiny_cfg, tmp_path):
    src = build_deeplab(tiny_cfg(**TINY_DL), 11)
    torch.save(src.state_dict(), tmp_path / "own.pth")
    dst = build_deeplab(tiny_cfg(**dl(init=str(tmp_path / "own.pth")), seed=9), 11)
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in src.state_dict().items())


def test_resnet101_deeplabv2_parameter_count(tiny_cfg):
    from cpfcte.method.deeplabv2 import count_parameters

    cfg = tiny_cfg(deeplab={"backbone": "resnet101", "backbone_kwargs": {}, "pretrained": False})
    # ResNet-101 without its classifier: 42,500,160; ASPP: 4 × (2048·3·3·21 + 21) = 1,548,372
    assert count_parameters(build_deeplab(cfg, 21)) == 42_500_160 + 1_548_372


def test_cli_deeplab_train_then_predict(tiny_cfg, toy_root, tmp_path, capsys):
    import json

    from cpfcte.cli import main

    pseudo = _pseudo_dir(toy_root, tmp_path)
    sets = [f"data_root={toy_root}", "deeplab.backbone=resnet10t",
            "deeplab.backbone_kwargs={channels: [8, 8, 16, 16]}", "deeplab.crop=32",
            "deeplab.batch=2", "deeplab.iterations=2", "deeplab.ckpt_every=1",
            "deeplab.test_scales=[1.0]", "deeplab.flip_test=false", "deeplab.crf=false"]
    main(["deeplab", "train", "--profile", "toy", "--pseudo", str(pseudo), "--run", "d",
          "--set", *sets])
    assert json.loads(capsys.readouterr().out)["complete"] is True
    main(["deeplab", "predict", "--profile", "toy", "--run", "d"])
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == 4 and out["miou"] == out["miou_no_crf"]
    with pytest.raises(SystemExit):
        main(["deeplab", "train", "--profile", "toy", "--pseudo",
              str(toy_root / "SegmentationClassAug"), "--run", "e", "--set", *sets])
    assert "ground-truth folder" in capsys.readouterr().err


def test_test_time_crf_is_the_references_or_with_pseudo_the_runs_own(tiny_cfg, tmp_path,
                                                                    monkeypatch):
    """DeepLabv2's test-time CRF uses kazuto1011's VOC parameters by default; with
    ``deeplab.test_crf=pseudo``, the CRF settings given to the training run and to the
    pseudo-label run follow the pseudo labels to it, the way notebook 04 derives its config
    (note 15). Every level is scored on its own."""
    from cpfcte.machinery.runfolder import run_config
    from cpfcte.method import crf
    from cpfcte.stages.deeplab_predict import deeplab_stage
    from cpfcte.stages.pseudo_labels import pseudo_stage
    from cpfcte.stages.train import train

    train(tiny_cfg(epochs=1, crf={"workers": 1}, **TINY_DL), tmp_path / "t", progress=False)
    pseudo_cfg = run_config(tmp_path / "t", {"pseudo_split": "train_aug", "crf.iterations": 2,
                                             "crf.bilateral_sxy": 17})
    pseudo_stage(pseudo_cfg, tmp_path / "t", tmp_path / "p", baselines=False, progress=False)
    seen = []
    real = crf.dense_crf
    monkeypatch.setattr(crf, "dense_crf", lambda image, probs, params: (
        seen.append(params), real(image, probs, params))[1])
    for mode, expected in (("reference", (67.0, 10, 1.0, 3.0, 4.0)),
                           ("pseudo", (17.0, 2, 1.0, 3.0, 4.0))):
        seen.clear()
        cfg = run_config(tmp_path / "p", {"deeplab.iterations": 2,       # as notebook 04 does
                                          "deeplab.test_crf": mode})
        m = deeplab_stage(cfg, tmp_path / "p", tmp_path / f"d_{mode}", progress=False)
        assert len(seen) == m["images"] == 4   # one CRF per val image, in this process
        assert {(p.bilateral_sxy, p.iterations, p.gaussian_sxy, p.bilateral_srgb,
                 p.bilateral_compat) for p in seen} == {expected}
        assert f"sxy {expected[0]:g}" in m["crf_params"]
        assert m["pseudo_dir"].endswith("crf_train_aug_48")              # the run's CRF labels
        assert set(m["levels"]) == {"single_scale", "multi_scale", "crf"}
        assert m["miou"] == m["levels"]["crf"]["miou"]
        assert m["no_crf"]["miou"] == m["levels"]["multi_scale"]["miou"]
        for sub in ("pred_ss", "pred", "pred_crf"):
            assert len(list((tmp_path / f"d_{mode}" / "val" / sub).glob("*.png"))) == 4


def test_msc_loss_sums_its_terms_as_the_reference_does():
    import torch

    from cpfcte.method.deeplabv2 import msc_loss

    torch.manual_seed(0)
    y = torch.randint(0, 3, (2, 8, 8))
    y[0, 0, 0] = 255
    outs = [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)]
    terms = [torch.nn.functional.cross_entropy(
        torch.nn.functional.interpolate(o, size=(8, 8), mode="bilinear", align_corners=False),
        y, ignore_index=255) for o in outs]
    assert torch.allclose(msc_loss(outs, y, size="labels"), sum(terms))
    assert torch.allclose(msc_loss(outs, y, "mean", size="labels"), sum(terms) / 3)
    assert torch.equal(msc_loss(outs[:1], y), msc_loss(outs[:1], y, "mean"))  # one output


def test_single_scale_view_is_part_of_the_multi_scale_mean():
    import numpy as np
    import torch

    from cpfcte.machinery.config import load_config
    from cpfcte.method.deeplabv2 import build_deeplab
    from cpfcte.stages.deeplab_predict import predict_probs

    cfg = load_config("toy", {"deeplab.backbone_kwargs": {"channels": [8, 8, 16, 16]}})
    torch.manual_seed(0)
    model = build_deeplab(cfg, 3).eval()
    image = np.random.default_rng(0).integers(0, 255, (20, 28, 3), dtype=np.uint8)
    one = predict_probs(model, image)
    mean, single = predict_probs(model, image, (0.75, 1.0), True, single=True)
    assert torch.equal(single, one) and mean.shape == one.shape == (3, 20, 28)
    assert not torch.allclose(mean, one)
    _, single2 = predict_probs(model, image, (0.75,), False, single=True)   # 1 not among them
    assert torch.equal(single2, one)


def test_deeplab_prediction_reports_a_failed_crf_image_and_writes_the_others(
        tiny_cfg, toy_root, tmp_path, monkeypatch):
    from cpfcte.stages import crf_pool
    from cpfcte.stages.deeplab_predict import deeplab_stage

    cfg = tiny_cfg(crf={"workers": 1}, **TINY_DL)
    real = crf_pool.crf_image
    monkeypatch.setattr(crf_pool, "crf_image", lambda job, p: (
        (_ for _ in ()).throw(RuntimeError("boom")) if job.name == "2026_000009" else real(job, p)))
    with pytest.raises(CpfcteError, match=r"dense CRF failed on 1 image\(s\), e.g. 2026_000009: RuntimeError: boom"):
        deeplab_stage(cfg, _pseudo_dir(toy_root, tmp_path), tmp_path / "d", progress=False)
    assert len(list((tmp_path / "d" / "val" / "pred_crf").glob("*.png"))) == 3


def test_cli_deeplab_on_a_pseudo_label_run_starts_from_that_runs_config(tiny_cfg, toy_root,
                                                                       capsys):
    from cpfcte.cli import main
    from cpfcte.machinery.paths import runs_dir
    from cpfcte.machinery.runfolder import RunFolder

    model = ["data_root=" + str(toy_root), "img_size=32", "token_dim=8", "lstm_hidden=8", "k=2",
             "infer_size=48", "batch_size=8", "epochs=1",
             "backbone_kwargs={patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}"]
    main(["train", "--profile", "toy", "--run", "t", "--set", *model])
    main(["pseudo", "--profile", "toy", "--train-run", "t", "--run", "p", "--split", "train_aug",
          "--set", "crf.iterations=2", "crf.workers=1"])
    capsys.readouterr()
    main(["deeplab", "train", "--profile", "toy", "--pseudo", str(runs_dir() / "toy" / "p"),
          "--run", "d", "--set", "deeplab.backbone_kwargs={channels: [8, 8, 16, 16]}",
          "deeplab.crop=32", "deeplab.batch=2", "deeplab.iterations=1", "deeplab.workers=0"])
    cfg = RunFolder(runs_dir() / "toy" / "d").config()
    assert cfg.crf.iterations == 2 and cfg.img_size == 32 and cfg.deeplab.iterations == 1
    assert RunFolder(runs_dir() / "toy" / "d").record()["pseudo_dir"].endswith("crf_train_aug_48")
    with pytest.raises(SystemExit):                       # a training run is no pseudo-label run
        main(["deeplab", "train", "--profile", "toy", "--pseudo", str(runs_dir() / "toy" / "t"),
              "--run", "e"])
    assert "holds a train run" in capsys.readouterr().err


def test_deeplab_under_torchrun_trains_the_weights_of_one_process(tiny_cfg, toy_root, tmp_path):
    """Parity (gloo, 2 processes vs 1, same global batch 4 and seed, MSC as in the paper's
    recipe): each rank draws its half of every iteration's samples and the loss is normalised
    over the global batch's labelled pixels (crops padded with 255 give the ranks unequal
    counts), so the weights differ only by float summation order. The paper's BatchNorm is
    frozen with ImageNet statistics, which a random tiny backbone lacks: per-image GroupNorm
    stands in (no batch statistics, as frozen BN). Measured: 1.2e-7 (float32 rounding) after 3
    SGD steps at lr 1e-2; tolerance 1e-6. The control, another seed, differs by 2."""
    from cpfcte.stages.deeplab_train import train_deeplab_distributed

    pseudo = _pseudo_dir(toy_root, tmp_path)
    section = {**TINY, "msc": True, "batch": 4, "iterations": 3, "ckpt_every": 3,
               "backbone_kwargs": {"channels": [8, 8, 16, 16], "norm_layer": "groupnorm1"}}
    cfg = tiny_cfg(deeplab=section)
    two = train_deeplab_distributed(cfg, pseudo, tmp_path / "two", nproc=2)
    assert two["processes"] == 2 and two["complete"]
    one = train_deeplab(cfg, pseudo, tmp_path / "one", progress=False)
    assert abs(one["history"][-1]["loss"] - two["history"][-1]["loss"]) < 1e-5

    def weights(d):
        return torch.load(d / CHECKPOINT, weights_only=True)["model"]

    def diff(a, b):
        return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)

    w1 = weights(tmp_path / "one")
    assert diff(w1, weights(tmp_path / "two")) < 1e-6
    train_deeplab(tiny_cfg(seed=1, deeplab=section), pseudo, tmp_path / "other", progress=False)
    assert diff(w1, weights(tmp_path / "other")) > 1e-2


def test_training_scales_come_from_the_choices_or_a_uniform_range(toy_root):
    from cpfcte.data import TOY_CLASSES
    from cpfcte.data.voc import VOCDataset
    from cpfcte.stages.deeplab_data import PseudoLabelData

    voc = VOCDataset(toy_root, "train", TOY_CLASSES)
    rng = np.random.default_rng(0)
    sets = PseudoLabelData(voc, toy_root, 32, choices=(0.5, 0.75, 1.0, 1.25, 1.5))
    drawn = {sets.draw_scale(rng) for _ in range(200)}
    assert drawn == {0.5, 0.75, 1.0, 1.25, 1.5}
    uniform = PseudoLabelData(voc, toy_root, 32, scale=(0.75, 1.25))
    values = [uniform.draw_scale(rng) for _ in range(200)]
    assert 0.75 <= min(values) and max(values) <= 1.25 and len(set(values)) == 200


def test_msc_max_test_views_are_the_max_of_the_msc_logits(tiny_cfg):
    torch.manual_seed(0)
    model = build_deeplab(tiny_cfg(**TINY_DL), 11).eval()
    image = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    probs, one = predict_probs(model, image, views="msc_max", single=True)
    x = torch.from_numpy(image.transpose(2, 0, 1).copy())[None]
    with torch.no_grad():
        outs = msc_logits(model, x)
    up = lambda t: F.interpolate(t, size=(40, 56), mode="bilinear", align_corners=False)  # noqa: E731
    assert torch.allclose(probs, up(outs[-1]).softmax(1)[0], atol=1e-6)
    assert torch.allclose(one, up(outs[0]).softmax(1)[0], atol=1e-6)
    with pytest.raises(CpfcteError, match="test_views"):
        predict_probs(model, image, views="median")
