"""Nothing of the user's is ever lost (cpfcte.machinery.safety): a command writes only into a new or
empty folder, one it made and marked, or one it is told to replace with --force; its outputs
never alias its inputs; it never writes into a dataset; every check runs before the first
write. And inputs that used to be accepted and then go wrong are read right or refused."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from cpfcte.machinery.errors import CpfcteError


def _csv(path, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["image", "labels"], *rows])
    return path


@pytest.fixture
def photos(tmp_path):
    """Four photos of the user's and their label CSV."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
            folder / f"p{i}.jpg", quality=95)
        rows.append([f"p{i}.jpg", "cat" if i % 2 else "dog"])
    return folder, _csv(tmp_path / "labels.csv", rows)


def _snapshot(folder):
    return {p.relative_to(folder): (p.is_symlink(), p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


# ---- the six ways a command destroyed data ------------------------------------------------


def test_prepare_refuses_an_output_folder_holding_its_own_images(photos, tmp_path):
    from cpfcte.data.folder import prepare_folder

    images, labels = photos
    dataset = tmp_path / "D"
    shutil.copytree(images, dataset / "JPEGImages")
    before = _snapshot(dataset)
    with pytest.raises(CpfcteError, match="overlap"):
        prepare_folder(dataset / "JPEGImages", labels, dataset)
    assert _snapshot(dataset) == before                 # the photos are still files, not links


def test_prepare_refuses_a_dataset_it_did_not_make_and_keeps_its_lists(photos, toy_root,
                                                                      tmp_path):
    from cpfcte.data.folder import prepare_folder

    copy = tmp_path / "toycopy"
    shutil.copytree(toy_root, copy)
    before = _snapshot(copy)
    for out in (copy, copy / "SegmentationClass", copy / "JPEGImages", copy / "new"):
        for force in (False, True):                  # a dataset is never an output, --force or not
            with pytest.raises(CpfcteError, match="refused as the prepared folder.*dataset"):
                prepare_folder(photos[0], photos[1], out, force=force)
    assert _snapshot(copy) == before


def test_preparing_again_without_masks_leaves_no_stale_mask(photos, tmp_path):
    from cpfcte.data.folder import prepare_folder
    from cpfcte.machinery.io import save_label_png

    images, labels = photos
    masks = tmp_path / "masks"
    for i in range(4):
        save_label_png(masks / f"p{i}.png", np.zeros((40, 48), np.uint8))
    out = tmp_path / "own"
    assert prepare_folder(images, labels, out, masks=masks)["masks"] == 4
    assert len(list((out / "SegmentationClass").glob("*.png"))) == 4
    assert prepare_folder(images, labels, out)["masks"] == 0     # its own folder: replaced
    assert not list(out.rglob("SegmentationClass/*.png"))
    from cpfcte.data.voc import gt_dir

    with pytest.raises(CpfcteError, match="no ground-truth folder"):
        gt_dir(out, "train")


def test_prepare_toy_refuses_a_folder_of_yours(tmp_path):
    from cpfcte.data.toy import prepare_toy

    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "thesis.txt").write_text("years of work")
    (mine / "sub" / "notes.md").write_text("more")
    for force in (False, True):                 # it replaces a whole folder: never one of yours
        with pytest.raises(CpfcteError, match="thesis.txt.*not a toy dataset.*new or empty"):
            prepare_toy(mine, force=force, progress=False)
    assert (mine / "thesis.txt").read_text() == "years of work"
    assert (mine / "sub" / "notes.md").read_text() == "more"


def test_predict_refuses_outputs_that_would_overwrite_its_inputs(tiny_cfg, tmp_path,
                                                                 toy_root):
    from cpfcte.stages.predict import predict_folder
    from cpfcte.stages.train import train

    train(tiny_cfg(epochs=1), tmp_path / "t", progress=False)
    x = tmp_path / "X"
    shutil.copytree(toy_root / "JPEGImages", x / "overlays")
    before = _snapshot(x)
    with pytest.raises(CpfcteError, match="overlap"):
        predict_folder(tmp_path / "t", x / "overlays", x, progress=False)
    assert _snapshot(x) == before
    for out in (toy_root / "SegmentationClass", toy_root / "preds"):
        with pytest.raises(CpfcteError, match="dataset|ground-truth"):
            predict_folder(tmp_path / "t", x / "overlays", out, progress=False)
    assert not (toy_root / "preds").exists()
    assert not (toy_root / "SegmentationClass" / "predict.json").exists()


def test_a_run_folder_in_a_dataset_is_refused_before_config_json_is_written(tiny_cfg, toy_root,
                                                                             tmp_path):
    from cpfcte.data import fingerprint
    from cpfcte.machinery.runfolder import run_config
    from cpfcte.stages.pseudo_labels import pseudo_stage
    from cpfcte.stages.train import train

    train(tiny_cfg(epochs=1), tmp_path / "t", progress=False)
    stamp = fingerprint(toy_root)
    for run in (toy_root / "SegmentationClass", toy_root, toy_root / "JPEGImages"):
        with pytest.raises(CpfcteError, match="ground-truth folder|lies inside\\) the dataset"):
            pseudo_stage(run_config(tmp_path / "t"), tmp_path / "t", run, progress=False)
        assert not (run / "config.json").exists()
    with pytest.raises(CpfcteError, match="lies inside\\) the dataset"):
        train(tiny_cfg(epochs=1), toy_root / "JPEGImages", progress=False)
    assert not (toy_root / "JPEGImages" / "config.json").exists()
    assert fingerprint(toy_root) == stamp
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("x")
    with pytest.raises(CpfcteError, match="not a run folder"):
        train(tiny_cfg(epochs=1), mine, progress=False)
    assert sorted(p.name for p in mine.iterdir()) == ["chapter1.tex"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(CpfcteError, match="is a file"):
        train(tiny_cfg(epochs=1), afile, progress=False)


# ---- accepted, and wrong ---------------------------------------------------------------------


def test_a_16_bit_png_is_scaled_not_clipped(tmp_path):
    from cpfcte.machinery.io import read_image

    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1024)      # 0 .. 64512
    Image.fromarray(ramp).save(tmp_path / "deep.png")                  # mode I;16
    rgb = np.asarray(read_image(tmp_path / "deep.png"))
    assert rgb.shape == (8, 8, 3)
    expected = np.round(ramp / 65535 * 255).astype(np.uint8)
    assert np.array_equal(rgb[..., 0], expected)
    assert (rgb == 255).mean() < 0.05                    # was 99.7 % at 255


def test_an_exif_rotated_jpeg_is_read_as_it_displays(photos, tmp_path):
    from cpfcte.data.folder import prepare_folder
    from cpfcte.machinery.io import image_size, read_image, save_label_png

    stored = np.zeros((30, 50, 3), np.uint8)
    stored[:, :10] = 255                                 # a white band on the left, stored
    exif = Image.Exif()
    exif[0x0112] = 6                                     # displays rotated 90° clockwise
    folder = tmp_path / "phone"
    folder.mkdir()
    Image.fromarray(stored).save(folder / "IMG.jpg", exif=exif, quality=95)
    assert image_size(folder / "IMG.jpg") == (30, 50)   # as displayed: portrait
    shown = np.asarray(read_image(folder / "IMG.jpg"))
    assert shown.shape == (50, 30, 3) and shown[:10].mean() > 200   # the band is on top now
    labels = _csv(tmp_path / "l.csv", [["IMG.jpg", "cat"]])
    masks = tmp_path / "m"
    save_label_png(masks / "IMG.png", np.zeros((50, 30), np.uint8))  # drawn on what displays
    assert prepare_folder(folder, labels, tmp_path / "ok", masks=masks,
                          val_fraction=0)["masks"] == 1
    save_label_png(masks / "IMG.png", np.zeros((30, 50), np.uint8))  # on the stored pixels
    with pytest.raises(CpfcteError, match="EXIF orientation"):
        prepare_folder(folder, labels, tmp_path / "bad", masks=masks, val_fraction=0)


def test_a_huge_image_is_refused_with_the_fix(tmp_path, monkeypatch):
    from cpfcte.machinery import io

    Image.new("L", (7000, 6000)).save(tmp_path / "huge.png")        # 42 megapixels
    with pytest.raises(CpfcteError, match="7000×6000 .* resize it"):
        io.image_size(tmp_path / "huge.png")
    with pytest.raises(CpfcteError, match="resize it"):
        io.read_image(tmp_path / "huge.png")
    Image.new("RGB", (100, 100)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)             # PIL's bomb guard
    with pytest.raises(CpfcteError, match="too large to decode safely"):
        io.read_image(tmp_path / "bomb.png")


def test_names_with_spaces_and_ampersands_prepare_and_train(tiny_cfg, tmp_path):
    from cpfcte.data import open_split
    from cpfcte.data.folder import prepare_folder
    from cpfcte.machinery.config import load_config

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    names = ["with space.png", "tom & jerry.jpg", "plain.png", "a b c.png"]
    for n in names:
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / n)
    labels = _csv(tmp_path / "l.csv", [[n, "R&D" if i % 2 else "ops"]
                                       for i, n in enumerate(names)])
    out = tmp_path / "ds"
    prepare_folder(folder, labels, out, val_fraction=0)
    cfg = load_config("toy", {"dataset": "folder", "data_root": str(out)})
    voc = open_split(cfg, "train")
    assert sorted(voc.ids) == sorted(n.rsplit(".", 1)[0] for n in names)
    assert voc.classes == ("background", "R&D", "ops")
    assert {tuple(voc.label_names(i)) for i in range(len(voc))} == {("R&D",), ("ops",)}


def test_two_images_with_one_stem_and_an_image_without_a_row_are_refused(tiny_cfg, tmp_path,
                                                                        photos):
    from cpfcte.data.folder import prepare_folder
    from cpfcte.stages.predict import predict_folder
    from cpfcte.stages.train import train

    images, labels = photos
    Image.new("RGB", (40, 40)).save(images / "extra.png")
    with pytest.raises(CpfcteError, match="no row for 1 image.*extra.png"):
        prepare_folder(images, labels, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    train(tiny_cfg(epochs=1), tmp_path / "t", progress=False)
    dup = tmp_path / "dup"
    dup.mkdir()
    Image.new("RGB", (40, 40)).save(dup / "dup.jpg")
    Image.new("RGB", (40, 40)).save(dup / "dup.png")
    with pytest.raises(CpfcteError, match="dup.jpg and dup.png"):
        predict_folder(tmp_path / "t", dup, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    for limit in (-1, 0):
        with pytest.raises(CpfcteError, match="--limit"):
            predict_folder(tmp_path / "t", dup, tmp_path / "out", limit=limit, progress=False)


def test_a_bad_image_in_a_predict_folder_is_named_before_anything_is_written(tiny_cfg,
                                                                            tmp_path):
    from cpfcte.stages.predict import predict_folder
    from cpfcte.stages.train import train

    train(tiny_cfg(epochs=1), tmp_path / "t", progress=False)
    rng = np.random.default_rng(0)
    for kind in ("empty", "truncated", "text"):
        folder = tmp_path / kind
        folder.mkdir()
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / "a.jpg")
        bad = folder / "b.jpg"
        if kind == "empty":
            bad.write_bytes(b"")
        elif kind == "truncated":
            bad.write_bytes((folder / "a.jpg").read_bytes()[:200])
        else:
            bad.write_text("not an image")
        with pytest.raises(CpfcteError, match="b.jpg"):
            predict_folder(tmp_path / "t", folder, tmp_path / f"out_{kind}", progress=False)
        assert not (tmp_path / f"out_{kind}" / "labels").exists()


def test_the_leak_guard_refuses_a_near_copy_of_the_masks(tiny_cfg, toy_root, tmp_path):
    from cpfcte.machinery.io import read_label_png, save_label_png
    from cpfcte.stages.deeplab_train import train_deeplab

    copy = tmp_path / "copy"
    for png in (toy_root / "SegmentationClassAug").glob("*.png"):
        mask = read_label_png(png)
        mask[0, 0] = (int(mask[0, 0]) + 1) % 11                    # one pixel changed
        save_label_png(copy / png.name, mask)
    tiny = {"backbone": "resnet10t", "backbone_kwargs": {"channels": [8, 8, 16, 16]},
            "pretrained": False, "crop": 32, "batch": 2, "iterations": 1, "workers": 0}
    with pytest.raises(CpfcteError, match="copy of the labels"):
        train_deeplab(tiny_cfg(deeplab=tiny), copy, tmp_path / "d", progress=False)
    assert not (tmp_path / "d" / "checkpoint.pt").exists()


def test_values_that_must_be_refused(tmp_path, monkeypatch):
    from cpfcte.machinery.config import load_config, parse_set_args

    for pair, words in (("epochs=1.7", "must be of type int"),
                        ("epochs=true", "must be of type int"),
                        ("lr=.nan", "finite"), ("lr=inf", "finite")):
        with pytest.raises(CpfcteError, match=words):
            load_config("toy", parse_set_args([pair]))
    with pytest.raises(CpfcteError, match="no value"):
        parse_set_args(["epochs="])
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "mismatch.yaml").write_text("extends: toy\nprofile: wrongname\n")
    (profiles / "named.yaml").write_text("extends: toy\nepochs: 2\n")
    monkeypatch.setenv("CPFCTE_PROFILES", str(profiles))
    with pytest.raises(CpfcteError, match="says profile: wrongname.*runs/wrongname"):
        load_config("mismatch")
    assert load_config("named").profile == "named"             # named by its file


def test_cli_names_and_counts_are_refused(tmp_path, capsys):
    from cpfcte import cli

    for argv, words in ((["report", "--profile", "nope"], "unknown profile 'nope'"),
                        (["paper", "--status", "--profile", "nope"], "unknown profile 'nope'"),
                        (["paper", "--jobs", "0", "--dry-run"], "--jobs 0"),
                        (["paper", "--jobs", "-1", "--dry-run"], "--jobs -1")):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2 and words in capsys.readouterr().err
    assert not list((tmp_path / "out").rglob("*.nope.*")) if (tmp_path / "out").exists() else True


def test_export_refuses_escaping_and_duplicated_ids_and_an_existing_archive(tmp_path):
    from cpfcte.machinery.io import save_label_png
    from cpfcte.stages.export import export_voc_test

    pred = tmp_path / "pred"
    save_label_png(pred / "a.png", np.zeros((4, 4), np.uint8), palette=True)
    for content, words in (("../x\n", "not a plain image id"), ("a\na\n", "appears twice")):
        (tmp_path / "list.txt").write_text(content)
        with pytest.raises(CpfcteError, match=words):
            export_voc_test(pred, tmp_path / "o.tar.gz", tmp_path / "list.txt")
    (tmp_path / "list.txt").write_text("a\n")
    export_voc_test(pred, tmp_path / "o.tar.gz", tmp_path / "list.txt")
    with pytest.raises(CpfcteError, match="exists.*--force"):
        export_voc_test(pred, tmp_path / "o.tar.gz", tmp_path / "list.txt")
    export_voc_test(pred, tmp_path / "o.tar.gz", tmp_path / "list.txt", force=True)


def test_eval_without_a_list_names_the_images_it_does_not_score(tmp_path, capsys):
    from cpfcte import cli
    from cpfcte.machinery.io import save_label_png

    for name in ("a", "b", "c"):
        save_label_png(tmp_path / "gt" / f"{name}.png", np.zeros((4, 4), np.uint8))
    save_label_png(tmp_path / "pred" / "a.png", np.ones((4, 4), np.uint8))
    save_label_png(tmp_path / "pred" / "b.png", np.zeros((4, 4), np.uint8))
    cli.main(["eval", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"),
              "--num-classes", "2"])
    err = capsys.readouterr().err
    assert "no prediction for 1 ground-truth mask(s)" in err and "(c)" in err
    # the same rule the other way round: a prediction without ground truth is not scored
    save_label_png(tmp_path / "pred" / "x.png", np.ones((4, 4), np.uint8))
    cli.main(["eval", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"),
              "--num-classes", "2"])
    out = capsys.readouterr()
    assert "1 prediction(s)" in out.err and "(x)" in out.err and '"images": 2' in out.out
    for name in ("a", "b"):
        (tmp_path / "pred" / f"{name}.png").unlink()
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"),
                  "--num-classes", "2"])
    assert e.value.code == 2 and "none of its predictions" in capsys.readouterr().err


# ---- a message, not a traceback ----------------------------------------------------------------


def test_interrupt_and_os_errors_end_in_one_line(monkeypatch, capsys):
    from cpfcte import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_train", interrupted)
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--run", "x"])
    err = capsys.readouterr().err
    assert e.value.code == 130 and "interrupted" in err and "--resume" in err
    assert "Traceback" not in err

    def full(args):
        raise OSError(28, "No space left on device", "/data/run/checkpoint.pt")

    monkeypatch.setattr(cli, "_train", full)
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--run", "x"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "/data/run/checkpoint.pt: No space left" in err


def test_a_run_still_training_says_so_and_a_run_config_json_trains_again(tiny_cfg, tmp_path):
    import json
    import socket

    from cpfcte.machinery.config import config_from_file
    from cpfcte.stages.train import load_trained, train

    train(tiny_cfg(epochs=2), tmp_path / "t", max_epochs=1, progress=False)
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / "t" / ".lock").write_text(json.dumps(
            {"pid": sleeper.pid, "host": socket.gethostname()}))
        with pytest.raises(CpfcteError, match="still training .*process"):
            load_trained(tmp_path / "t")
    finally:
        sleeper.kill()
        sleeper.wait()
    (tmp_path / "t" / ".lock").unlink()
    with pytest.raises(CpfcteError, match="--resume"):
        load_trained(tmp_path / "t")
    cfg = config_from_file(tmp_path / "t" / "config.json")     # the file we write ourselves
    assert cfg.digest() == tiny_cfg(epochs=2).digest()


def test_a_wrong_download_you_put_there_is_left_in_place_and_said_so(tmp_path):
    from cpfcte.data.download import Archive, fetch

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "train2014.zip").write_bytes(b"x" * 10)
    archive = Archive("train2014.zip", "http://127.0.0.1:9/none", None, 20, "train2014")
    with pytest.raises(CpfcteError, match="left in place"):
        fetch(archive, downloads, progress=False)
    assert (downloads / "train2014.zip").exists()


# ---- a machine without AVX2 -------------------------------------------------------------------


def test_a_processor_without_avx2_runs_native_and_says_so(monkeypatch, tmp_path, tiny_cfg):
    from cpfcte.machinery import numerics
    from cpfcte.report import check

    for fake, expected in (("arm64", "native (no AVX2)"), ("x86_64-noavx2", "native (no AVX2)"),
                           ("x86_64", "pinned")):
        monkeypatch.setenv("CPFCTE_FAKE_CPU", fake)
        assert numerics.mode() == expected
    monkeypatch.setenv("CPFCTE_FAKE_CPU", "arm64")
    for name in numerics.PINS:
        monkeypatch.delenv(name, raising=False)
    assert numerics.pin_environment() == [] and not any(n in os.environ for n in numerics.PINS)
    with pytest.warns(numerics.NativeNumerics, match="digits may differ"):
        numerics.apply(tiny_cfg())
    assert "numerics native" in numerics.describe()
    monkeypatch.setattr(check, "committed_text", lambda rel, root=None: "Method,mIoU x\nA,1.0\n")
    out = tmp_path / "out" / "tables"
    out.mkdir(parents=True)
    monkeypatch.setenv("CPFCTE_OUT", str(tmp_path / "out"))
    from cpfcte.report import record_written

    for name in check.TABLES:                 # as this machine's report writes them
        (out / f"{name}.csv").write_text("Method,mIoU x\nA,2.0\n")
        record_written(name, "toy", {"csv": out / f"{name}.csv"})
    ok, lines = check.check("toy")
    assert ok and lines[0].startswith("differences expected on this machine")
    monkeypatch.setenv("CPFCTE_FAKE_CPU", "x86_64")
    ok, lines = check.check("toy")
    assert not ok and lines[0].startswith("NOT reproduced")


def test_your_own_data_without_masks_says_no_masks_instead_of_a_key_error(photos, tiny_cfg,
                                                                        tmp_path, capsys):
    from cpfcte import cli
    from cpfcte.data.folder import prepare_folder
    from cpfcte.machinery.config import derive
    from cpfcte.stages.train import train

    images, labels = photos
    prepare_folder(images, labels, tmp_path / "own", val_fraction=0)
    cfg = derive(tiny_cfg(epochs=1), {"dataset": "folder", "data_root": str(tmp_path / "own"),
                                      "train_split": "train", "pseudo_split": "train"})
    train(cfg, tmp_path / "t", progress=False)
    capsys.readouterr()
    cli.main(["pseudo", "--train-run", str(tmp_path / "t"), "--run", str(tmp_path / "p")])
    out = capsys.readouterr()
    assert "no masks" in out.err and '"miou": null' in out.out and '"images": 4' in out.out
    assert len(list((tmp_path / "p").glob("bpm_train_*/*.png"))) == 4


def test_force_replaces_only_what_the_command_wrote(photos, tiny_cfg, tmp_path):
    """--force on a folder of yours: the command writes its files and, on a rerun, removes the
    ones its earlier run wrote and this one does not; files of yours beside them, in its own
    subfolders too, stay as they were. A linked subfolder is refused, never written through."""
    from cpfcte.data.folder import prepare_folder
    from cpfcte.stages.predict import predict_folder
    from cpfcte.stages.train import train

    images, labels = photos
    mine = tmp_path / "mine"
    (mine / "labels").mkdir(parents=True)
    (mine / "labels" / "my_drawing.png").write_bytes(b"mine")
    (mine / "overlays").mkdir()
    (mine / "overlays" / "slide.jpg").write_bytes(b"mine too")
    (mine / "notes.txt").write_text("keep")
    train(tiny_cfg(epochs=1), tmp_path / "t", progress=False)
    with pytest.raises(CpfcteError, match="not empty.*--force"):
        predict_folder(tmp_path / "t", images, mine, threshold=0.3, progress=False)
    predict_folder(tmp_path / "t", images, mine, threshold=0.3, force=True, progress=False)
    assert len(list((mine / "labels").glob("p*.png"))) == 4
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    for name in ("p0.jpg", "p1.jpg"):
        shutil.copy(images / name, fewer / name)
    predict_folder(tmp_path / "t", fewer, mine, threshold=0.3, progress=False)   # its own now
    assert sorted(p.name for p in (mine / "labels").iterdir()) == ["my_drawing.png", "p0.png",
                                                                   "p1.png"]
    assert (mine / "labels" / "my_drawing.png").read_bytes() == b"mine"
    assert (mine / "overlays" / "slide.jpg").read_bytes() == b"mine too"
    assert (mine / "notes.txt").read_text() == "keep"
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "labels").symlink_to(mine / "labels")
    with pytest.raises(CpfcteError, match="symbolic link"):
        predict_folder(tmp_path / "t", fewer, linked, threshold=0.3, force=True, progress=False)
    # prepare folder: the same with a folder that holds notes of yours
    out = tmp_path / "prepared"
    (out / "Annotations").mkdir(parents=True)
    (out / "Annotations" / "README.txt").write_text("my notes")
    prepare_folder(images, labels, out, force=True)
    assert (out / "Annotations" / "README.txt").read_text() == "my notes"
    assert len(list((out / "Annotations").glob("p*.xml"))) == 4


def test_a_csv_in_another_encoding_or_separator_is_named_with_its_fix(tmp_path, photos):
    from cpfcte.data.folder import read_label_csv

    latin = tmp_path / "latin1.csv"
    latin.write_bytes("image,labels\np0.jpg,caf\xe9\n".encode("latin-1"))
    with pytest.raises(CpfcteError, match=r"latin1.csv:2: not UTF-8 .*save the CSV as UTF-8"):
        read_label_csv(latin)
    semi = tmp_path / "semi.csv"
    semi.write_text("image;labels\np0.jpg;cat\n")
    with pytest.raises(CpfcteError, match="separated by semicolons"):
        read_label_csv(semi)


def test_the_resume_advice_of_a_stopped_run_works_when_followed(tiny_cfg, tmp_path):
    import re

    from cpfcte.cli import main
    from cpfcte.stages.train import load_trained, train

    cfg = tiny_cfg(epochs=2)
    train(cfg, tmp_path / "t", max_epochs=1, progress=False)
    with pytest.raises(CpfcteError, match="training stopped at epoch 1 of 2") as e:
        load_trained(tmp_path / "t")
    advice = re.search(r"resume it \((cpfcte train [^)]*)\)", str(e.value)).group(1)
    try:
        main(advice.split()[1:])                     # the advice, to the letter
    except SystemExit as done:
        assert done.code in (0, None)
    assert load_trained(tmp_path / "t")[1].epochs == 2


def test_a_missing_custom_toy_folder_is_told_its_own_fix(tmp_path):
    from cpfcte.data import dataset_root
    from cpfcte.machinery.config import load_config

    cfg = load_config("toy", {"data_root": str(tmp_path / "elsewhere")})
    with pytest.raises(CpfcteError, match=f"prepare toy --root {tmp_path / 'elsewhere'}"):
        dataset_root(cfg)


def test_csv_rows_name_only_images_inside_the_image_folder(photos, tmp_path):
    from cpfcte.data.folder import prepare_folder

    images, _ = photos
    outside = tmp_path / "secret.jpg"
    shutil.copy(images / "p0.jpg", outside)
    for name in ("../secret.jpg", str(outside)):
        rows = _csv(tmp_path / "rows.csv", [[name, "cat"], ["p1.jpg", "dog"]])
        with pytest.raises(CpfcteError, match=r"rows.csv:2: .* not a file name inside --images"):
            prepare_folder(images, rows, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_empty_profile_file_is_refused(tmp_path, monkeypatch):
    from cpfcte.machinery.config import load_config

    monkeypatch.setenv("CPFCTE_PROFILES", str(tmp_path))
    (tmp_path / "mine.yaml").write_text("# nothing yet\n")
    with pytest.raises(CpfcteError, match="mine.yaml: the profile file is empty"):
        load_config("mine")


def test_an_all_background_mask_is_no_copy_of_the_labels():
    """The leak guard's known answers: a copy with a few changed pixels is a copy; an
    all-background mask beside a truth that is (nearly) all background is not."""
    from cpfcte.machinery.guard import near_copy

    truth = np.zeros((100, 100), np.uint8)
    truth[40:60, 40:60] = 3
    copy = truth.copy()
    copy[0, :5] = 7                                          # 5 of 10,000 pixels changed
    assert near_copy(copy, truth)
    assert not near_copy(np.zeros_like(truth), truth)        # 96 % agree, and it is constant
    tiny = np.zeros((100, 100), np.uint8)
    tiny[0, 0] = 3                                           # one object pixel: 99.99 % agree
    assert not near_copy(np.zeros_like(tiny), tiny)
    assert not near_copy(np.zeros_like(tiny), np.zeros_like(tiny))   # a one-label truth
