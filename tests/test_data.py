import hashlib

import numpy as np
import pytest
from PIL import Image

from cpfcte.data import TOY_CLASSES, dataset_root
from cpfcte.data.toy import ToySpec, generate
from cpfcte.data.voc import VOCDataset, gt_dir, read_split
from cpfcte.machinery.config import load_config
from cpfcte.machinery.errors import CpfcteError
from cpfcte.machinery.io import read_label_png


def test_toy_dataset_has_the_voc_layout(toy_root):
    for sub in ("JPEGImages", "Annotations", "SegmentationClass", "SegmentationClassAug",
                "ImageSets/Segmentation", "ImageSets/SegmentationAug"):
        assert (toy_root / sub).is_dir(), sub
    assert len(read_split(toy_root, "train")) == 8
    assert len(read_split(toy_root, "val")) == 4
    train_aug = read_split(toy_root, "train_aug")
    assert len(train_aug) == 24 and set(read_split(toy_root, "train")) <= set(train_aug)
    assert not set(read_split(toy_root, "val")) & set(train_aug)
    assert len(TOY_CLASSES) >= 11


def test_toy_masks_are_voc_palette_pngs_with_a_255_band(toy_root):
    for image_id in read_split(toy_root, "train"):
        with Image.open(toy_root / "SegmentationClass" / f"{image_id}.png") as im:
            assert im.mode == "P"
            assert im.getpalette()[3:6] == [128, 0, 0]          # VOC colour of class 1
        with Image.open(toy_root / "SegmentationClassAug" / f"{image_id}.png") as im:
            assert im.mode == "L"
        mask = read_label_png(toy_root / "SegmentationClass" / f"{image_id}.png")
        with Image.open(toy_root / "JPEGImages" / f"{image_id}.jpg") as img:
            assert mask.shape == (img.height, img.width)
        assert 255 in mask and 0 in mask
        assert set(np.unique(mask)) <= set(range(len(TOY_CLASSES))) | {255}


def test_image_labels_from_xml_match_the_mask_classes(toy_root):
    voc = VOCDataset(toy_root, "train_aug", TOY_CLASSES)
    several = 0
    for i, image_id in enumerate(voc.ids):
        labels = voc.labels(i)
        assert labels[0] == 1.0                                     # background always
        mask = read_label_png(toy_root / "SegmentationClassAug" / f"{image_id}.png")
        in_mask = {int(v) for v in np.unique(mask) if v not in (0, 255)}
        assert in_mask == {c for c in range(1, len(TOY_CLASSES)) if labels[c] == 1}
        several += len(in_mask) > 1
    assert several > 0                                              # several classes per image


def test_toy_generation_is_deterministic_and_idempotent(tmp_path):
    spec = ToySpec(seed=5, n_train=3, n_val=2, n_extra=2, min_size=40, max_size=48)
    a = generate(tmp_path / "a", spec, progress=False)
    b = generate(tmp_path / "b", spec, progress=False)

    def digest(root):
        h = hashlib.sha256()
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.name != "toy_spec.json":
                h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
        return h.hexdigest()

    assert digest(a) == digest(b)
    stamp = (a / "JPEGImages" / "2026_000000.jpg").stat().st_mtime_ns
    generate(a, spec, progress=False)                               # same spec: kept
    assert (a / "JPEGImages" / "2026_000000.jpg").stat().st_mtime_ns == stamp
    c = generate(tmp_path / "c", ToySpec(seed=6, n_train=3, n_val=2, n_extra=2, min_size=40,
                                         max_size=48), progress=False)
    assert digest(c) != digest(a)
    assert not (tmp_path / "a.partial").exists()


def test_gt_dir_prefers_voc_segmentationclass(toy_root):
    assert gt_dir(toy_root, "train").name == "SegmentationClass"
    assert gt_dir(toy_root, "train_aug").name == "SegmentationClassAug"


# ---- bad input: one clear error each, naming the file ------------------------------------


@pytest.fixture
def broken_root(toy_root, tmp_path):
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(toy_root, root)
    return root


def test_missing_dataset_folder_says_how_to_make_it(tmp_path):
    cfg = load_config("toy", {"data_root": str(tmp_path / "nowhere")})
    with pytest.raises(CpfcteError, match="cpfcte data prepare toy"):
        dataset_root(cfg)


def test_corrupt_jpeg_is_named(broken_root):
    voc = VOCDataset(broken_root, "train", TOY_CLASSES)
    assert voc.image_size(0) == voc.image(0).size
    voc.image_path(0).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(CpfcteError, match=f"{voc.ids[0]}.jpg: cannot decode image"):
        voc.image(0)
    with pytest.raises(CpfcteError, match=f"{voc.ids[0]}.jpg: cannot read image header"):
        voc.image_size(0)


def test_malformed_xml_is_named(broken_root):
    voc = VOCDataset(broken_root, "train", TOY_CLASSES)
    (broken_root / "Annotations" / f"{voc.ids[1]}.xml").write_text("<annotation><object>")
    with pytest.raises(CpfcteError, match=f"{voc.ids[1]}.xml: malformed XML"):
        voc.labels(1)


def test_unknown_class_in_xml_is_named(broken_root):
    voc = VOCDataset(broken_root, "train", TOY_CLASSES)
    path = broken_root / "Annotations" / f"{voc.ids[2]}.xml"
    text = path.read_text()
    name = text.split("<name>")[1].split("</name>")[0]
    path.write_text(text.replace(f"<name>{name}</name>", "<name>unicorn</name>", 1))
    with pytest.raises(CpfcteError, match="'unicorn' is not one of"):
        voc.labels(2)


def test_empty_or_missing_split_is_refused(broken_root):
    (broken_root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n")
    with pytest.raises(CpfcteError, match="val.txt: split list is empty"):
        VOCDataset(broken_root, "val", TOY_CLASSES)
    with pytest.raises(CpfcteError, match="no list for split 'test'"):
        VOCDataset(broken_root, "test", TOY_CLASSES)


def test_unknown_parameter_and_profile_are_refused():
    with pytest.raises(CpfcteError, match="unknown parameter 'pooing'.*did you mean pooling"):
        load_config("toy", {"pooing": "gap"})
    with pytest.raises(CpfcteError, match="unknown profile 'vocc'"):
        load_config("vocc")
    with pytest.raises(CpfcteError, match="class_tokens='many'"):
        load_config("toy", {"class_tokens": "many"})
    with pytest.raises(CpfcteError, match="k=0"):
        load_config("toy", {"k": 0})
    with pytest.raises(CpfcteError, match="must be of type int"):
        load_config("toy", {"epochs": "lots"})
