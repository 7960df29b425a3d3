"""Your own dataset (a folder of images and a label CSV), predictions on any folder, and the
VOC test-server export."""

import csv
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from cpfcte.machinery.errors import CpfcteError
from cpfcte.machinery.io import read_label_png, save_label_png


@pytest.fixture
def own_folder(toy_root, tmp_path):
    """20 toy images as PNG files of your own with a names CSV (labels from the toy XML) and
    masks for evaluation; the class names are the toy's, minus background."""
    from cpfcte.data.classes import TOY_CLASSES
    from cpfcte.data.voc import VOCDataset

    voc = VOCDataset(toy_root, "train_aug", TOY_CLASSES)
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    rows = [["image", "labels"]]
    for i in range(20):
        name = f"photo_{i:02d}.png"
        voc.image(i).save(images / name)
        rows.append([name, " ".join(voc.label_names(i))])
        m = read_label_png(toy_root / "SegmentationClassAug" / f"{voc.ids[i]}.png")
        save_label_png(masks / f"photo_{i:02d}.png", m)
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return images, tmp_path / "labels.csv", masks


def test_a_folder_dataset_trains_and_predicts_with_the_toy_model(own_folder, tmp_path):
    from conftest import TINY_MODEL

    from cpfcte.data.classes import TOY_CLASSES
    from cpfcte.data.folder import prepare_folder
    from cpfcte.machinery.config import load_config
    from cpfcte.stages.predict import predict_folder
    from cpfcte.stages.pseudo_labels import pseudo_stage
    from cpfcte.stages.train import train

    images, labels, masks = own_folder
    report = prepare_folder(images, labels, tmp_path / "mine", masks=masks, val_fraction=0.25,
                            seed=3)
    assert report["counts"] == {"train": 15, "val": 5} and report["masks"] == 20
    used = sorted(set(report["classes"][1:]))
    assert report["classes"][0] == "background" and set(used) <= set(TOY_CLASSES)
    assert (tmp_path / "mine" / "JPEGImages" / "photo_00.jpg").is_symlink()   # linked PNG
    again = prepare_folder(images, labels, tmp_path / "mine2", masks=masks, val_fraction=0.25,
                           seed=3)
    assert again["counts"] == report["counts"]                 # the draw is seeded
    cfg = load_config("toy", {**TINY_MODEL, "dataset": "folder",
                              "data_root": str(tmp_path / "mine"), "epochs": 1})
    train(cfg, tmp_path / "t", progress=False)
    m = pseudo_stage(derive_split(cfg), tmp_path / "t", tmp_path / "p", progress=False)
    assert m["images"] == 15 and 0 <= m["miou"] <= 1 and "baselines" in m
    no_masks = prepare_folder(images, labels, tmp_path / "bare", val_fraction=0.25, seed=3)
    assert no_masks["masks"] == 0
    cfg2 = load_config("toy", {**TINY_MODEL, "dataset": "folder",
                               "data_root": str(tmp_path / "bare"), "epochs": 1})
    train(cfg2, tmp_path / "t2", progress=False)
    m2 = pseudo_stage(derive_split(cfg2), tmp_path / "t2", tmp_path / "p2", progress=False)
    assert m2["miou"] is None and m2["no_masks"] and m2["crf"]["miou"] is None
    out = predict_folder(tmp_path / "t", images, tmp_path / "pred", crf=True, scores=True,
                         progress=False)
    calibrated = json.loads((tmp_path / "t" / "threshold.json").read_text())
    assert out["images"] == 20 and out["threshold"] == calibrated["threshold"]
    assert out["threshold_chosen"].startswith(f"calibrated on {calibrated['images']} train")
    png = tmp_path / "pred" / "labels" / "photo_03.png"
    with Image.open(png) as im, Image.open(images / "photo_03.png") as src:
        assert im.mode == "P" and im.size == src.size               # VOC palette, image size
        assert im.getpalette()[3:6] == [128, 0, 0]
    assert (tmp_path / "pred" / "overlays" / "photo_03.jpg").exists()
    z = np.load(tmp_path / "pred" / "scores" / "photo_03.npz")
    assert z["z"].shape == (len(report["classes"]), 6, 6) and z["image_scores"].shape == (
        len(report["classes"]),)
    labels_found = set(np.unique(read_label_png(png)))
    kept = json.loads((tmp_path / "pred" / "predict.json").read_text())["classes_kept"]
    allowed = {0} | {report["classes"].index(c) for c in kept["photo_03"]}
    assert labels_found <= allowed                  # only the classes the image scores keep


def derive_split(cfg):
    from cpfcte.machinery.config import derive

    return derive(cfg, {"pseudo_split": "train"})


def _write(path, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def test_bad_folder_input_names_the_file_and_line(own_folder, tmp_path):
    from cpfcte.data.folder import prepare_folder

    images, labels, masks = own_folder
    bad = tmp_path / "bad.csv"
    out = tmp_path / "out"
    cases = [
        ([["image", "labels"], ["photo_00.png", "ruby_dot"], ["photo_01.png", "unicorn"]],
         {"classes": ("ruby_dot", "jade_bar")}, r"bad.csv:3: unknown class 'unicorn'"),
        ([["image", "labels"], ["photo_00.png", "ruby_dot"], ["nope.png", "ruby_dot"]], {},
         r"bad.csv:3: image .*nope.png not found"),
        ([["image", "labels"], ["photo_00.png", "ruby_dot"], ["photo_00.png", "ruby_dot"]], {},
         r"bad.csv:3: duplicate row for 'photo_00.png' \(first on line 2\)"),
        ([["image", "labels"], ["photo_00.png", "ruby_dot"], ["photo_01.png", ""]], {},
         r"bad.csv:3: 'photo_01.png' has no label"),
        ([["image", "ruby_dot", "jade_bar"], ["photo_00.png", "1", "0"],
          ["photo_01.png", "1", "2"]], {}, r"bad.csv:3: multi-hot cells must be 0 or 1"),
    ]
    for rows, kw, message in cases:
        _write(bad, rows)
        with pytest.raises(CpfcteError, match=message):
            prepare_folder(images, bad, out, **kw)
    (images / "broken.png").write_bytes(b"not an image")
    _write(bad, [["image", "labels"], ["broken.png", "ruby_dot"]])
    with pytest.raises(CpfcteError, match=r"bad.csv:2: .*broken.png: cannot decode image"):
        prepare_folder(images, bad, out)
    m = read_label_png(masks / "photo_01.png")
    save_label_png(masks / "photo_01.png", np.where(m > 0, 40, 0).astype(np.uint8))
    with pytest.raises(CpfcteError, match=r"photo_01.png: values \[40\] outside 0..10 and 255"):
        prepare_folder(images, labels, out, masks=masks)
    save_label_png(masks / "photo_01.png", np.zeros((5, 7), np.uint8))
    with pytest.raises(CpfcteError, match=r"photo_01.png: mask is 7×5, its image photo_01.png"):
        prepare_folder(images, labels, out, masks=masks)


def test_multi_hot_csv_gives_the_same_dataset_as_names(own_folder, tmp_path):
    from cpfcte.data.folder import prepare_folder, read_label_csv

    images, labels, _ = own_folder
    classes, entries = read_label_csv(labels)
    rows = [["image", *classes]] + [[name, *("1" if c in names else "0" for c in classes)]
                                    for _, name, names in entries]
    _write(tmp_path / "multi.csv", rows)
    a = prepare_folder(images, labels, tmp_path / "a", seed=1)
    b = prepare_folder(images, tmp_path / "multi.csv", tmp_path / "b", seed=1)
    assert a["classes"] == b["classes"] and a["counts"] == b["counts"]
    from cpfcte.data.voc import VOCDataset

    va, vb = (VOCDataset(tmp_path / d, "train", tuple(a["classes"])) for d in "ab")
    assert va.ids == vb.ids and np.array_equal(va.label_matrix(), vb.label_matrix())


def test_a_profile_of_yours_runs_as_the_profile_it_extends(tmp_path, monkeypatch):
    from cpfcte.batch import catalog
    from cpfcte.machinery.config import base_profile, load_config

    monkeypatch.setenv("CPFCTE_PROFILES", str(tmp_path))
    (tmp_path / "mine.yaml").write_text("extends: toy\nprofile: mine\ndataset: folder\n"
                                        "data_root: /data/mine\n")
    assert base_profile("mine") == "toy" and load_config("mine").dataset == "folder"
    runs, profiles = catalog.expand(catalog.load_batch(), "mine")
    assert profiles["train_full_s2"] == "mine" and "train_coco" not in runs   # no COCO twin
    (tmp_path / "voc.yaml").write_text("extends: toy\n")
    with pytest.raises(CpfcteError, match="is a built-in name"):
        load_config("voc")


def _test_predictions(tmp_path):
    """Two VOC test predictions (palette PNGs, 8×6), their JPEGs and test.txt: (pred, imgs,
    ids)."""
    pred, imgs = tmp_path / "pred", tmp_path / "imgs"
    imgs.mkdir()
    ids = ["2008_000001", "2008_000002"]
    (tmp_path / "test.txt").write_text("\n".join(ids) + "\n")
    for i in ids:
        save_label_png(pred / f"{i}.png", np.full((6, 8), 15, np.uint8))
        Image.new("RGB", (8, 6)).save(imgs / f"{i}.jpg")
    return pred, imgs, ids


def test_voc_test_export_packs_the_server_layout_and_refuses_what_it_would_reject(tmp_path):
    from cpfcte.stages.export import SERVER_DIR, export_voc_test

    pred, imgs, ids = _test_predictions(tmp_path)
    out = export_voc_test(pred, tmp_path / "sub.tar.gz", tmp_path / "test.txt", imgs)
    assert out["images"] == 2
    with tarfile.open(tmp_path / "sub.tar.gz") as tar:
        assert sorted(tar.getnames()) == [f"{SERVER_DIR}/{i}.png" for i in ids]
    linked = tmp_path / "linked"                         # predictions that are links
    linked.mkdir()
    for i in ids:
        (linked / f"{i}.png").symlink_to(pred / f"{i}.png")
    export_voc_test(linked, tmp_path / "links.tar.gz", tmp_path / "test.txt")
    with tarfile.open(tmp_path / "links.tar.gz") as tar:
        members = tar.getmembers()
        assert all(m.isfile() and not m.issym() for m in members)      # contents, not links
        assert tar.extractfile(members[0]).read() == (pred / f"{ids[0]}.png").read_bytes()
    (tmp_path / "test.txt").write_text("\n".join(ids + ["2008_000003"]) + "\n")
    with pytest.raises(CpfcteError, match=r"1 of 3 test ids have no PNG \(e.g. 2008_000003"):
        export_voc_test(pred, tmp_path / "x.tar.gz", tmp_path / "test.txt")
    (tmp_path / "test.txt").write_text("\n".join(ids) + "\n")
    save_label_png(pred / f"{ids[1]}.png", np.full((6, 8), 255, np.uint8))
    with pytest.raises(CpfcteError, match=r"values \[255\] outside 0..20"):
        export_voc_test(pred, tmp_path / "x.tar.gz", tmp_path / "test.txt")
    Image.new("L", (8, 6)).save(pred / f"{ids[1]}.png")
    with pytest.raises(CpfcteError, match="a L PNG; the server takes palette PNGs"):
        export_voc_test(pred, tmp_path / "x.tar.gz", tmp_path / "test.txt")
    save_label_png(pred / f"{ids[1]}.png", np.zeros((5, 8), np.uint8))
    with pytest.raises(CpfcteError, match=r"8×5, its image 2008_000002.jpg is 8×6"):
        export_voc_test(pred, tmp_path / "x.tar.gz", tmp_path / "test.txt", imgs)
    assert not (tmp_path / "x.tar.gz").exists()                  # nothing written on refusal


def test_the_commands_a_user_types(own_folder, tmp_path, capsys):
    from cpfcte.cli import main

    images, labels, masks = own_folder
    main(["data", "prepare", "folder", "--images", str(images), "--labels", str(labels),
          "--out", str(tmp_path / "mine"), "--masks", str(masks), "--val-fraction", "0.25"])
    assert json.loads(capsys.readouterr().out)["counts"] == {"train": 15, "val": 5}
    model = ["dataset=folder", f"data_root={tmp_path / 'mine'}", "img_size=32", "token_dim=8",
             "lstm_hidden=8", "k=2", "infer_size=48", "batch_size=8", "epochs=1",
             "backbone_kwargs={patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}"]
    main(["train", "--profile", "toy", "--run", "mine_t", "--set", *model])
    capsys.readouterr()
    main(["predict", "--run", "mine_t", "--images", str(images), "--out",
          str(tmp_path / "pred"), "--limit", "3"])
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == 3 and len(list((tmp_path / "pred" / "labels").glob("*.png"))) == 3
    with pytest.raises(SystemExit):
        main(["predict", "--run", "mine_t", "--images", str(tmp_path / "none"), "--out",
              str(tmp_path / "x")])
    assert "image folder not found" in capsys.readouterr().err


def test_a_run_remembers_its_classes_and_refuses_a_dataset_that_changed_them(own_folder,
                                                                            tmp_path):
    from conftest import TINY_MODEL

    from cpfcte.data.folder import prepare_folder
    from cpfcte.machinery.config import load_config
    from cpfcte.machinery.io import read_json
    from cpfcte.stages.train import describe_model, load_trained, train

    images, labels, masks = own_folder
    prepare_folder(images, labels, tmp_path / "mine", val_fraction=0.25, seed=3)
    cfg = load_config("toy", {**TINY_MODEL, "dataset": "folder",
                              "data_root": str(tmp_path / "mine"), "epochs": 1})
    train(cfg, tmp_path / "t", progress=False)
    record = read_json(tmp_path / "t" / "config.json")
    before = record["classes"]
    assert before[0] == "background" and len(record["dataset_fingerprint"]) >= 8
    rows = (tmp_path / "renamed.csv")
    rows.write_text(labels.read_text().replace("ruby_dot", "ruby_spot"))
    prepare_folder(images, rows, tmp_path / "mine", val_fraction=0.25, seed=3)
    with pytest.raises(CpfcteError, match=r"trained on the classes \[.*'ruby_dot'.*now has "
                                          r"\[.*'ruby_spot'"):
        load_trained(tmp_path / "t")
    with pytest.raises(CpfcteError, match="trained on the classes"):
        train(cfg, tmp_path / "t", progress=False)
    assert read_json(tmp_path / "t" / "config.json")["classes"] == before   # not rewritten
    assert "t:" in describe_model(tmp_path / "t")


def test_a_test_server_archive_is_checked_before_upload(tmp_path):
    """export voc-test --check reads an archive as the server does: the layout, palette PNGs
    with values 0..20, the ids against the list (or VOC 2012 test's 1,456), sizes against the
    JPEGs; the first problem is named."""
    import io

    from cpfcte.cli import main
    from cpfcte.stages.export import SERVER_DIR, check_voc_test, export_voc_test

    pred, imgs, ids = _test_predictions(tmp_path)
    good = tmp_path / "good.tar.gz"
    export_voc_test(pred, good, tmp_path / "test.txt")
    assert check_voc_test(good, tmp_path / "test.txt", imgs)["images"] == 2
    with pytest.raises(CpfcteError, match="2 PNGs; VOC 2012 test has 1456 images"):
        check_voc_test(good)
    (tmp_path / "three.txt").write_text("\n".join(ids + ["2008_000003"]) + "\n")
    with pytest.raises(CpfcteError, match=r"missing 1 \(e.g. 2008_000003\)"):
        check_voc_test(good, tmp_path / "three.txt")
    Image.new("RGB", (9, 6)).save(imgs / f"{ids[1]}.jpg")
    with pytest.raises(CpfcteError, match=r"2008_000002.png: 8×6, its image .* is 9×6"):
        check_voc_test(good, tmp_path / "test.txt", imgs)

    def archive(name, members):
        path = tmp_path / name
        with tarfile.open(path, "w:gz") as tar:
            for arcname, data, kind in members:
                info = tarfile.TarInfo(arcname)
                if kind == "link":
                    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                    tar.addfile(info)
                else:
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        return path

    png = (pred / f"{ids[0]}.png").read_bytes()
    grey = io.BytesIO()
    Image.new("L", (8, 6)).save(grey, format="PNG")
    for members, message in (
            ([(f"results/VOC2012/{ids[0]}.png", png, "file")], "not <id>.png in results"),
            ([(f"{SERVER_DIR}/{ids[0]}.png", b"", "link")], "is a link, not a file"),
            ([(f"{SERVER_DIR}/{ids[0]}.png", grey.getvalue(), "file")],
             "a L PNG; the server takes palette PNGs"),
            ([(f"{SERVER_DIR}/{ids[0]}.png", b"not a png", "file")], "not a readable PNG")):
        with pytest.raises(CpfcteError, match=message):
            check_voc_test(archive("bad.tar.gz", members), tmp_path / "test.txt")
    (tmp_path / "plain.txt").write_text("no archive")
    with pytest.raises(CpfcteError, match="not a .tar.gz the server can read"):
        check_voc_test(tmp_path / "plain.txt")
    with pytest.raises(SystemExit) as e:                     # the command line: one or other
        main(["export", "voc-test", "--check", str(good), "--out", str(tmp_path / "x.tar.gz")])
    assert e.value.code == 2
