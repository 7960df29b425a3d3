import json

import numpy as np
import pytest
import torch

from cpfcte.machinery.errors import CpfcteError
from cpfcte.machinery.io import read_label_png
from cpfcte.machinery.runfolder import CHECKPOINT, LOG, run_config
from cpfcte.method.bpm import bpm_from_probs
from cpfcte.stages.pseudo_labels import baseline_mask, pseudo_stage
from cpfcte.stages.train import load_trained, train


def pseudo(train_dir, run_dir, overrides=None, **kw):
    """The pseudo-label stage with the training run's config (and ``overrides``)."""
    return pseudo_stage(run_config(train_dir, overrides), train_dir, run_dir, progress=False, **kw)


def test_same_seed_gives_identical_metrics(tiny_cfg, tmp_path):
    cfg = tiny_cfg(epochs=2)
    a = train(cfg, tmp_path / "a", progress=False)
    b = train(cfg, tmp_path / "b", progress=False)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])
    ma = pseudo(tmp_path / "a", tmp_path / "pa")
    mb = pseudo(tmp_path / "b", tmp_path / "pb")
    assert ma["miou"] == mb["miou"] and ma["iou"] == mb["iou"]
    c = train(tiny_cfg(epochs=2, seed=1), tmp_path / "c", progress=False)
    assert strip(c["history"]) != strip(a["history"])


def test_resume_after_interruption_matches_an_uninterrupted_run(tiny_cfg, tmp_path):
    cfg = tiny_cfg(epochs=3)
    full = train(cfg, tmp_path / "full", progress=False)
    part = train(cfg, tmp_path / "resumed", max_epochs=1, progress=False)   # "killed" after 1
    assert part["epochs_done"] == 1 and not part["complete"]
    with pytest.raises(CpfcteError, match="stopped at epoch 1 of 3"):
        load_trained(tmp_path / "resumed")
    resumed = train(cfg, tmp_path / "resumed", progress=False)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(resumed["history"]) == strip(full["history"])
    sa = torch.load(tmp_path / "full" / CHECKPOINT, weights_only=True)["model"]
    sb = torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=True)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    again = train(cfg, tmp_path / "resumed", progress=False)                 # complete: no-op
    assert strip(again["history"]) == strip(full["history"])
    log = (tmp_path / "resumed" / LOG).read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in log] == [1, 2, 3]


def test_two_stage_lr_and_frozen_backbone_in_the_first_stage(tiny_cfg, tmp_path):
    cfg = tiny_cfg(epochs=2, warmup_epochs=1, freeze_backbone_warmup=True, lr_warmup=1e-3,
                   lr=1e-4)
    from cpfcte.stages.train import make_model

    before = make_model(cfg).state_dict()
    train(cfg, tmp_path / "r", max_epochs=1, progress=False)
    after = torch.load(tmp_path / "r" / CHECKPOINT, weights_only=True)
    assert after["optimizer"]["param_groups"][0]["lr"] == 1e-3
    state = after["model"]
    backbone_same = all(torch.equal(before[k], state[k]) for k in before if k.startswith("backbone."))
    head_changed = any(not torch.equal(before[k], state[k]) for k in before
                       if k.startswith("classifier."))
    assert backbone_same and head_changed
    summary = train(cfg, tmp_path / "r", progress=False)
    assert [h["lr"] for h in summary["history"]] == [1e-3, 1e-4]
    assert [h["backbone_frozen"] for h in summary["history"]] == [True, False]
    state2 = torch.load(tmp_path / "r" / CHECKPOINT, weights_only=True)["model"]
    assert any(not torch.equal(state[k], state2[k]) for k in state if k.startswith("backbone."))


def test_which_parameters_train_in_each_phase(tiny_cfg, tmp_path):
    """ViT-PCM's regime: the ViT frozen in the warm-up; then only its last unfreeze_blocks
    blocks and its final norm train (the embeddings and the first blocks never do);
    unfreeze_blocks=None trains every one. The head always trains."""
    from cpfcte.stages.train import make_model, set_phase, trainable_parameters

    kw = {"backbone_kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}}
    cfg = tiny_cfg(unfreeze_blocks=2, freeze_backbone_warmup=True, **kw)
    model = make_model(cfg)

    def training() -> set[str]:
        return {n for n, p in model.named_parameters() if p.requires_grad}

    head = {n for n, _ in model.named_parameters() if not n.startswith("backbone.")}
    set_phase(model, cfg, "warm-up")
    assert training() == head
    set_phase(model, cfg, "main")
    vit = {n for n in training() if n.startswith("backbone.")}
    assert vit == {n for n, _ in model.named_parameters()
                   if n.startswith(("backbone.blocks.1.", "backbone.blocks.2.", "backbone.norm."))}
    assert training() - vit == head
    assert not any(n.startswith(("backbone.patch_embed", "backbone.pos_embed",
                                 "backbone.cls_token", "backbone.blocks.0.")) for n in vit)
    set_phase(model, tiny_cfg(unfreeze_blocks=None, **kw), "main")
    assert training() == {n for n, _ in model.named_parameters()}
    with pytest.raises(CpfcteError, match="has 3 blocks"):
        set_phase(model, tiny_cfg(unfreeze_blocks=4, **kw), "main")

    count = lambda names: sum(p.numel() for n, p in model.named_parameters() if n in names)  # noqa: E731
    summary = train(cfg, tmp_path / "r", progress=False)
    assert list(summary["trainable_parameters"]) == ["warm-up", "main"]
    assert summary["trainable_parameters"] == {"warm-up": count(head), "main": count(head | vit)}
    assert trainable_parameters(model, tiny_cfg(warmup_epochs=0, **kw)) == {
        "main": count({n for n, _ in model.named_parameters()})}
    before = make_model(cfg).state_dict()
    after = torch.load(tmp_path / "r" / CHECKPOINT, weights_only=True)["model"]
    for name in before:                                # what was frozen throughout is unchanged
        if name.startswith(("backbone.blocks.0.", "backbone.patch_embed", "backbone.pos_embed")):
            assert torch.equal(before[name], after[name]), name
    assert not torch.equal(before["backbone.blocks.2.mlp.fc1.weight"],
                           after["backbone.blocks.2.mlp.fc1.weight"])


def test_a_run_folder_refuses_another_config(tiny_cfg, tmp_path):
    train(tiny_cfg(epochs=1), tmp_path / "r", progress=False)
    with pytest.raises(CpfcteError, match="differs in k"):
        train(tiny_cfg(epochs=1, k=3), tmp_path / "r", progress=False)


def test_bpm_both_normalisations_on_a_three_class_case_computed_by_hand():
    """Background, A, B on a 1×3 patch grid. Eq. 10 as printed (``none``) gives background
    everywhere; ViT-PCM's merge_class_labels (``pcm``) divides each class map by its maximum
    (bg 0.8, A 0.4, B 0.3), then renormalises each patch over the classes."""
    from cpfcte.method.bpm import bpm_grid

    probs = torch.tensor([[[0.8, 0.5, 0.6]], [[0.1, 0.4, 0.1]], [[0.1, 0.1, 0.3]]])  # (C, h, w)
    every = torch.ones(3)
    assert bpm_from_probs(probs, every, (1, 3), norm="none").tolist() == [[0, 0, 0]]
    assert bpm_from_probs(probs, every, (1, 3)).tolist() == [[0, 1, 2]]     # pcm: the default
    maps = bpm_grid(probs[None], every[None])[0, :, 0]                       # (C, 3)
    scaled = torch.tensor([[1.0, 0.625, 0.75], [0.25, 1.0, 0.25], [1 / 3, 1 / 3, 1.0]])
    assert torch.allclose(maps, scaled / scaled.sum(0), atol=1e-6)
    assert torch.allclose(maps.sum(0), torch.ones(3))
    # B absent: zeroed before the normalisation, its patch goes to the background
    assert bpm_from_probs(probs, torch.tensor([1.0, 1.0, 0.0]), (1, 3)).tolist() == [[0, 1, 0]]
    # upsampled to 5 with the corners aligned (ViT-PCM's resize): x = 0, .5, 1, 1.5, 2 on the
    # grid; at .5 bg (.632+.319)/2 > A (.158+.511)/2; at 1.5 bg .347 > B .335 > A .318
    assert bpm_from_probs(probs, every, (1, 5)).tolist() == [[0, 0, 1, 0, 2]]
    # half-pixel centres (resize=pil): x = -.2 → 0, .4, 1, 1.6 (B .368 > bg .353), 2.2 → 2
    assert bpm_from_probs(probs, every, (1, 5), align_corners=False).tolist() == \
        [[0, 0, 1, 2, 2]]


def test_baselines():
    labels = np.array([1, 0, 1, 1], dtype=np.float32)
    assert (baseline_mask("background", labels, (2, 3)) == 0).all()
    assert (baseline_mask("uniform", labels, (2, 3)) == 2).all()


def test_pseudo_stage_writes_pngs_and_metrics_and_resumes(tiny_cfg, tmp_path):
    train(tiny_cfg(epochs=1), tmp_path / "t", progress=False)
    m = pseudo(tmp_path / "t", tmp_path / "p")
    assert m["images"] == 8 and 0.0 <= m["miou"] <= 1.0
    assert m["infer_size"] == 48 and m["patches_per_side"] == 6
    pngs = sorted((tmp_path / "p" / "bpm_train_48").glob("*.png"))
    assert len(pngs) == 8 and not list((tmp_path / "p").rglob("*.tmp"))
    assert set(m["baselines"]) == {"background", "uniform"}
    assert 0.0 <= m["crf"]["miou"] <= 1.0 and m["crf"]["images"] == 8
    assert len(list((tmp_path / "p" / "crf_train_48").glob("*.png"))) == 8
    assert m["crf"]["params"]["iterations"] == 10
    saved = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert saved["miou"] == m["miou"]
    stamp = pngs[0].stat().st_mtime_ns
    pngs[1].unlink()                                                  # as if killed before it
    again = pseudo(tmp_path / "t", tmp_path / "p", baselines=False)
    assert again["timing"]["written"] == 1 and again["timing"]["skipped"] == 7
    assert pngs[0].stat().st_mtime_ns == stamp and pngs[1].exists()
    assert again["miou"] == m["miou"]
    m2 = pseudo(tmp_path / "t", tmp_path / "p", {"infer_scale": 2.0}, baselines=False)
    assert m2["infer_size"] == 64
    mask = read_label_png(pngs[0])
    assert mask.dtype == np.uint8


def test_pseudo_labels_refuse_a_ground_truth_folder(tiny_cfg, tmp_path, toy_root):
    from cpfcte.data import TOY_CLASSES
    from cpfcte.data.voc import VOCDataset
    from cpfcte.stages.pseudo_labels import make_pseudo_labels

    train(tiny_cfg(epochs=1), tmp_path / "t", progress=False)
    model, _ = load_trained(tmp_path / "t")
    voc = VOCDataset(toy_root, "train", TOY_CLASSES)
    before = sorted(p.stat().st_mtime_ns for p in (toy_root / "SegmentationClass").iterdir())
    with pytest.raises(CpfcteError, match="ground-truth folder"):
        make_pseudo_labels(model, voc, toy_root / "SegmentationClass", infer_size=48,
                           progress=False)
    with pytest.raises(CpfcteError, match="ground-truth folder"):
        make_pseudo_labels(model, voc, toy_root / "SegmentationClassAug" / "bpm", infer_size=48,
                           progress=False)
    after = sorted(p.stat().st_mtime_ns for p in (toy_root / "SegmentationClass").iterdir())
    assert before == after


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path):
    from cpfcte.machinery.io import atomic_path, write_text

    target = tmp_path / "metrics.json"
    write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_cli_train_and_pseudo(tiny_cfg, toy_root, capsys):
    from cpfcte.cli import main
    from cpfcte.machinery.paths import runs_dir

    sets = ["data_root=" + str(toy_root), "img_size=32", "token_dim=8",
            "lstm_hidden=8", "k=2", "infer_size=48", "batch_size=8",
            "backbone_kwargs={patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}"]
    main(["train", "--profile", "toy", "--run", "cli_t", "--max-epochs", "0", "--set", *sets,
          "epochs=2"])
    capsys.readouterr()
    main(["train", "--profile", "toy", "--run", "cli_t", "--max-epochs", "1", "--set", *sets,
          "epochs=2", "--resume"])
    assert json.loads(capsys.readouterr().out)["epochs_done"] == 1
    with pytest.raises(SystemExit):                       # unfinished: needs --resume
        main(["train", "--profile", "toy", "--run", "cli_t", "--set", *sets, "epochs=2"])
    assert "pass --resume to continue" in capsys.readouterr().err
    main(["train", "--profile", "toy", "--run", "cli_t", "--resume", "--set", *sets, "epochs=2"])
    assert json.loads(capsys.readouterr().out)["complete"] is True
    assert (runs_dir() / "toy" / "cli_t" / CHECKPOINT).exists()
    main(["pseudo", "--profile", "toy", "--train-run", "cli_t", "--run", "cli_p"])
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == 8 and out["infer_size"] == 48
    with pytest.raises(SystemExit):
        main(["train", "--profile", "toy", "--run", "x", "--set", "pooing=gap"])
    assert "unknown parameter 'pooing'" in capsys.readouterr().err


def test_ensure_pseudo_labels_makes_the_training_split_once(tiny_cfg, tmp_path):
    from cpfcte.stages.pseudo_labels import ensure_pseudo_labels
    from cpfcte.stages.pseudo_runs import pseudo_label_dir

    train(tiny_cfg(epochs=1), tmp_path / "t", progress=False)
    made = ensure_pseudo_labels("toy", tmp_path / "p", tmp_path / "t", progress=False)
    labels = pseudo_label_dir(made)
    assert labels.name == "crf_train_aug_48" and len(list(labels.glob("*.png"))) == 24
    stamp = (made / "metrics.json").stat().st_mtime_ns
    assert ensure_pseudo_labels("toy", made, tmp_path / "t", progress=False) == made
    assert (made / "metrics.json").stat().st_mtime_ns == stamp          # reused, not remade
    pseudo(tmp_path / "t", tmp_path / "q")                               # the train split only
    with pytest.raises(CpfcteError, match="no CRF pseudo labels of the training split"):
        pseudo_label_dir(tmp_path / "q")


def test_inference_loader_workers_give_the_same_bits(tiny_cfg, tmp_path, toy_root):
    """Decoding and resizing in 2 DataLoader workers writes the same BPMs and grid maps, byte
    for byte, as in the stage's own process."""
    from cpfcte.data import TOY_CLASSES
    from cpfcte.data.voc import VOCDataset
    from cpfcte.stages.pseudo_labels import make_pseudo_labels

    train(tiny_cfg(epochs=1), tmp_path / "t", progress=False)
    model, _ = load_trained(tmp_path / "t")
    voc = VOCDataset(toy_root, "train", TOY_CLASSES)
    for workers in (0, 2):
        make_pseudo_labels(model, voc, tmp_path / f"bpm{workers}", infer_size=48, batch_size=3,
                           probs_dir=tmp_path / f"probs{workers}", workers=workers,
                           progress=False)
    for kind in ("bpm", "probs"):
        a = sorted((tmp_path / f"{kind}0").iterdir())
        b = sorted((tmp_path / f"{kind}2").iterdir())
        assert [f.name for f in a] == [f.name for f in b] and len(a) == 8
        assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
