"""The real-data path on small fixtures built here in the exact real formats: VOC palette PNGs
with 255, SBD ``cls/*.mat`` (``GTcls`` struct written with scipy), VOC XML, COCO instances JSON
with polygons, uncompressed RLE and a crowd region; downloads from a loopback HTTP server."""

import hashlib
import http.server
import io
import json
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from cpfcte.data.classes import TOY_CLASSES, VOC_CLASSES
from cpfcte.data.coco import prepare_coco
from cpfcte.data.fixtures import write_sbd_mat
from cpfcte.data.prepare_voc import prepare_voc, read_sbd_mat
from cpfcte.data.voc import VOCDataset, read_split
from cpfcte.machinery.errors import CpfcteError
from cpfcte.machinery.io import read_label_png, save_label_png


def _xml(names):
    objs = "".join(f"<object><name>{n}</name><difficult>0</difficult></object>" for n in names)
    return f"<annotation><filename>x.jpg</filename>{objs}</annotation>"


@pytest.fixture
def voc_sbd(tmp_path):
    """VOC: train = a, b; val = c, d. SBD: train = a, e; val = c (a VOC val image), f.
    train_aug = (SBD ∪ VOC train) − VOC val = a, b, e, f."""
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    sbd = tmp_path / "benchmark_RELEASE" / "dataset"
    ids = {"a": "2008_000001", "b": "2008_000002", "c": "2008_000003", "d": "2008_000004",
           "e": "2008_000005", "f": "2008_000006"}
    for k, image_id in ids.items():
        (voc / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 8), (10, 20, 30)).save(voc / "JPEGImages" / f"{image_id}.jpg")
        (voc / "Annotations").mkdir(exist_ok=True)
        (voc / "Annotations" / f"{image_id}.xml").write_text(_xml(["dog", "person"]))
    for k in "abcd":                        # VOC masks: class 12 (dog) with a 255 band
        m = np.zeros((8, 12), np.uint8)
        m[2:6, 3:9] = 12
        m[2, 3:9] = 255
        save_label_png(voc / "SegmentationClass" / f"{ids[k]}.png", m, palette=True)
    for k in "aecf":                        # SBD masks: class 15 (person), no band
        seg = np.zeros((8, 12), np.uint8)
        seg[1:4, 1:4] = 15
        write_sbd_mat(sbd / "cls" / f"{ids[k]}.mat", seg)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text(f"{ids['a']}\n{ids['b']}\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text(f"{ids['c']}\n{ids['d']}\n")
    (sbd / "train.txt").write_text(f"{ids['a']}\n{ids['e']}\n")
    (sbd / "val.txt").write_text(f"{ids['c']}\n{ids['f']}\n")
    return voc, sbd, ids


def test_train_aug_union_rule_and_mask_sources(voc_sbd):
    voc, sbd, ids = voc_sbd
    report = prepare_voc(voc, sbd, allow_partial=True, progress=False)
    assert report["counts"] == {"train_aug": 4, "train": 2, "val": 2}
    assert read_split(voc, "train_aug") == sorted([ids["a"], ids["b"], ids["e"], ids["f"]])
    aug = voc / "SegmentationClassAug"
    for k in "abcd":                        # VOC's own mask wins where it exists (a is in both)
        m = read_label_png(aug / f"{ids[k]}.png")
        assert set(np.unique(m)) == {0, 12, 255}
    for k in "ef":                          # SBD-only images: the .mat's values
        m = read_label_png(aug / f"{ids[k]}.png")
        assert set(np.unique(m)) == {0, 15} and m[2, 2] == 15
    with Image.open(aug / f"{ids['e']}.png") as im:
        assert im.mode == "L"
    # image-level labels still come from the XML (dog and person), not from the masks
    ds = VOCDataset(voc, "train_aug", VOC_CLASSES)
    assert ds.labels(0)[[0, 12, 15]].tolist() == [1, 1, 1] and ds.labels(0).sum() == 3
    assert prepare_voc(voc, sbd, allow_partial=True, progress=False)["written"] == 0  # idempotent


def test_voc_counts_are_verified(voc_sbd):
    voc, sbd, _ = voc_sbd
    with pytest.raises(CpfcteError, match=r"train_aug: 4 \(expected 10582\)"):
        prepare_voc(voc, sbd, progress=False)


def test_voc_prepare_into_another_folder_links_the_originals(voc_sbd, tmp_path):
    voc, sbd, _ = voc_sbd
    out = tmp_path / "prepared"
    prepare_voc(voc, sbd, out, allow_partial=True, progress=False)
    assert len(VOCDataset(out, "train_aug", VOC_CLASSES)) == 4
    assert (out / "JPEGImages").is_symlink() and not (voc / "SegmentationClassAug").exists()


def test_sbd_mat_is_read_from_the_gtcls_struct(tmp_path):
    seg = np.arange(12, dtype=np.uint8).reshape(3, 4)
    write_sbd_mat(tmp_path / "x.mat", seg)
    assert (read_sbd_mat(tmp_path / "x.mat") == seg).all()
    scipy.io.savemat(tmp_path / "bad.mat", {"other": np.zeros(3)})
    with pytest.raises(CpfcteError, match="bad.mat: no GTcls.Segmentation"):
        read_sbd_mat(tmp_path / "bad.mat")
    (tmp_path / "junk.mat").write_bytes(b"not matlab")
    with pytest.raises(CpfcteError, match="junk.mat: not a readable MATLAB file"):
        read_sbd_mat(tmp_path / "junk.mat")


def test_sbd_mask_of_the_wrong_size_or_range_is_refused(voc_sbd):
    voc, sbd, ids = voc_sbd
    write_sbd_mat(sbd / "cls" / f"{ids['e']}.mat", np.zeros((5, 5), np.uint8))
    with pytest.raises(CpfcteError, match=f"{ids['e']}.mat: mask is 5×5 but its image"):
        prepare_voc(voc, sbd, allow_partial=True, progress=False)
    write_sbd_mat(sbd / "cls" / f"{ids['e']}.mat", np.full((8, 12), 21, np.uint8))
    with pytest.raises(CpfcteError, match="label 21 ≥ 21 classes"):
        prepare_voc(voc, sbd, allow_partial=True, progress=False)


def test_voc_missing_folder_and_image_are_named(voc_sbd, tmp_path):
    voc, sbd, ids = voc_sbd
    with pytest.raises(CpfcteError, match="SBD folder cls not found"):
        prepare_voc(voc, tmp_path / "nowhere", progress=False)
    (voc / "JPEGImages" / f"{ids['f']}.jpg").unlink()
    with pytest.raises(CpfcteError, match=f"{ids['f']}.jpg: image not found"):
        prepare_voc(voc, sbd, allow_partial=True, progress=False)


# ---- COCO --------------------------------------------------------------------------------

FIX_CLASSES = ("background", "person", "cat", "dog")          # ids 1, 17, 18 in id order


def _coco_fixture(root: Path, annotations=None) -> Path:
    for name, (w, h) in {"COCO_val2014_000000000001.jpg": (30, 20),
                         "COCO_val2014_000000000002.jpg": (16, 16),
                         "COCO_val2014_000000000003.jpg": (8, 8)}.items():
        (root / "val2014").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (w, h)).save(root / "val2014" / name)
    crowd = np.zeros((16, 16), bool)
    crowd[:, :8] = True                      # left half of image 2 is a crowd of persons
    from cpfcte.data.toy import rle_uncompressed

    dog = np.zeros((16, 16), bool)
    dog[4:8, 4:12] = True                    # a dog on top of the crowd and beside it
    anns = annotations if annotations is not None else [
        {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 300.0,
         "bbox": [0, 0, 20, 15], "segmentation": [[0, 0, 20, 0, 20, 15, 0, 15]]},
        {"id": 2, "image_id": 1, "category_id": 17, "iscrowd": 0, "area": 36.0,
         "bbox": [5, 5, 6, 6], "segmentation": [[5, 5, 11, 5, 11, 11, 5, 11]]},
        {"id": 3, "image_id": 2, "category_id": 1, "iscrowd": 1, "area": 128.0,
         "bbox": [0, 0, 8, 16], "segmentation": rle_uncompressed(crowd)},
        {"id": 4, "image_id": 2, "category_id": 18, "iscrowd": 0, "area": 32.0,
         "bbox": [4, 4, 8, 4], "segmentation": rle_uncompressed(dog)},
    ]
    data = {"images": [{"id": 1, "file_name": "COCO_val2014_000000000001.jpg", "height": 20, "width": 30},
                       {"id": 2, "file_name": "COCO_val2014_000000000002.jpg", "height": 16, "width": 16},
                       {"id": 3, "file_name": "COCO_val2014_000000000003.jpg", "height": 8, "width": 8}],
            "annotations": anns,
            "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"},
                           {"id": 17, "name": "cat"}]}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    path = root / "annotations" / "instances_val2014.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_remapping_overlap_and_crowd_rules(tmp_path):
    _coco_fixture(tmp_path)
    report = prepare_coco(tmp_path, classes=FIX_CLASSES, splits={"val": "val2014"},
                          known_counts=None, progress=False)
    assert report["counts"] == {"val": 2}                     # image 3 has no annotation
    ids = read_split(tmp_path, "val")
    assert ids == ["COCO_val2014_000000000001", "COCO_val2014_000000000002"]
    m1 = read_label_png(tmp_path / "SegmentationClass" / f"{ids[0]}.png")
    assert m1.shape == (20, 30)
    assert m1[2, 2] == 1 and m1[8, 8] == 2      # person (id 1 → 1); the smaller cat on top (17 → 2)
    assert m1[18, 25] == 0
    m2 = read_label_png(tmp_path / "SegmentationClass" / f"{ids[1]}.png")
    assert m2[12, 2] == 255                     # crowd region ignored
    assert m2[5, 6] == 3 and m2[5, 10] == 3     # dog (18 → 3) painted over the crowd
    assert m2[12, 12] == 0
    with Image.open(tmp_path / "SegmentationClass" / f"{ids[1]}.png") as im:
        assert im.mode == "P"
    ds = VOCDataset(tmp_path, "val", FIX_CLASSES)
    assert ds.labels(0).tolist() == [1, 1, 1, 0] and ds.labels(1).tolist() == [1, 1, 0, 1]
    assert (tmp_path / "JPEGImages" / f"{ids[0]}.jpg").is_symlink()
    assert ds.image(0).size == (30, 20)


def test_coco_bad_input(tmp_path):
    path = _coco_fixture(tmp_path, annotations=[
        {"id": 9, "image_id": 1, "category_id": 5, "iscrowd": 0, "area": 1.0,
         "bbox": [0, 0, 1, 1], "segmentation": [[0, 0, 1, 0, 1, 1]]}])
    kw = dict(classes=FIX_CLASSES, splits={"val": "val2014"}, known_counts=None, progress=False)
    with pytest.raises(CpfcteError, match="unknown category id 5"):
        prepare_coco(tmp_path, **kw)
    path.write_text("{\"images\": [")
    with pytest.raises(CpfcteError, match="instances_val2014.json: malformed JSON"):
        prepare_coco(tmp_path, **kw)
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(CpfcteError, match="no 'annotations' list"):
        prepare_coco(tmp_path, **kw)
    _coco_fixture(tmp_path)
    with pytest.raises(CpfcteError, match="categories do not match"):
        prepare_coco(tmp_path, **{**kw, "classes": ("background", "a", "b", "c")})
    (tmp_path / "val2014" / "COCO_val2014_000000000002.jpg").unlink()
    with pytest.raises(CpfcteError, match="COCO_val2014_000000000002.jpg: image named by"):
        prepare_coco(tmp_path, **kw)
    _coco_fixture(tmp_path)
    with pytest.raises(CpfcteError, match=r"val: 2 \(expected 40137\)"):
        prepare_coco(tmp_path, **{**kw, "known_counts": {"val": 40137}})


def test_toy_coco_twin_round_trip(toy_root):
    coco_root = toy_root / "coco"
    data = json.loads((coco_root / "annotations" / "instances_train2014.json").read_text())
    segs = [a["segmentation"] for a in data["annotations"]]
    assert any(isinstance(s, list) for s in segs)                           # polygons
    assert any(isinstance(s, dict) and isinstance(s["counts"], list) for s in segs)  # raw RLE
    all_anns = data["annotations"] + json.loads(
        (coco_root / "annotations" / "instances_val2014.json").read_text())["annotations"]
    assert any(a["iscrowd"] for a in all_anns)
    assert sorted({c["id"] for c in data["categories"]}) == list(range(1, 20, 2))  # gaps
    prepare_coco(coco_root, classes=TOY_CLASSES, known_counts=None, progress=False)
    train_aug = read_split(toy_root, "train_aug")
    coco_ids = read_split(coco_root, "train")
    assert len(coco_ids) == len(train_aug)
    agree = total = 0
    for toy_id, coco_id in zip(train_aug, coco_ids):
        a = read_label_png(toy_root / "SegmentationClassAug" / f"{toy_id}.png")
        b = read_label_png(coco_root / "SegmentationClass" / f"{coco_id}.png")
        valid = (a != 255) & (b != 255)
        agree += int((a[valid] == b[valid]).sum())
        total += int(valid.sum())
        ta = VOCDataset(toy_root, "train_aug", TOY_CLASSES)
    assert agree / total > 0.97
    tc = VOCDataset(coco_root, "train", TOY_CLASSES)
    assert (tc.label_matrix() == ta.label_matrix()).all()                 # same image labels


# ---- downloads from a loopback server -----------------------------------------------------


class _Server:
    """Serves one payload on 127.0.0.1 with HTTP Range support; can cut the first transfer."""

    def __init__(self, payload: bytes, cut_first_at: int | None = None):
        self.payload, self.cut, self.ranges = payload, cut_first_at, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                start = 0
                rng = self.headers.get("Range")
                outer.ranges.append(rng)
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range",
                                     f"bytes {start}-{len(outer.payload) - 1}/{len(outer.payload)}")
                else:
                    self.send_response(200)
                body = outer.payload[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.cut is not None:
                    self.wfile.write(body[:outer.cut])
                    outer.cut = None
                    self.wfile.flush()
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/benchmark.tgz"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _tgz() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, text in (("benchmark_RELEASE/dataset/train.txt", "2008_000001\n"),
                           ("benchmark_RELEASE/dataset/val.txt", "2008_000002\n")):
            data = text.encode() + np.random.default_rng(0).bytes(40000)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_download_resumes_an_interrupted_transfer_and_extracts(tmp_path):
    from cpfcte.data.download import Archive, download

    payload = _tgz()
    server = _Server(payload, cut_first_at=len(payload) // 3)
    try:
        table = {"sbd": (Archive("benchmark.tgz", server.url, hashlib.md5(payload).hexdigest(),
                                 len(payload), "benchmark_RELEASE"),)}
        with pytest.raises(CpfcteError, match="run the same command again to resume"):
            download("sbd", tmp_path, archives=table, progress=False)
        part = tmp_path / "downloads" / "benchmark.tgz.part"
        assert 0 < part.stat().st_size < len(payload)
        assert not (tmp_path / "benchmark_RELEASE").exists()
        (out,) = download("sbd", tmp_path, archives=table, progress=False)
        assert server.ranges[-1] == f"bytes={len(payload) // 3}-"          # resumed, not restarted
        assert (out / "dataset" / "train.txt").read_bytes().startswith(b"2008_000001\n")
        assert (tmp_path / "downloads" / "benchmark.tgz").stat().st_size == len(payload)
        assert not part.exists() and not list(tmp_path.glob(".*extracting"))
        assert download("sbd", tmp_path, archives=table, progress=False) == [out]  # idempotent
    finally:
        server.close()


def test_download_refuses_a_corrupt_archive(tmp_path):
    from cpfcte.data.download import Archive, download

    payload = _tgz()
    server = _Server(payload[:-10] + b"0123456789")
    try:
        table = {"sbd": (Archive("benchmark.tgz", server.url, hashlib.md5(payload).hexdigest(),
                                 len(payload), "benchmark_RELEASE"),)}
        with pytest.raises(CpfcteError, match="MD5 .* expected .*corrupt"):
            download("sbd", tmp_path, archives=table, progress=False)
        assert not (tmp_path / "downloads" / "benchmark.tgz.part").exists()
        assert not (tmp_path / "downloads" / "benchmark.tgz").exists()
        assert not (tmp_path / "benchmark_RELEASE").exists()
    finally:
        server.close()


def test_unreachable_hub_is_a_clear_error(monkeypatch):
    import timm

    from cpfcte.machinery.config import load_config
    from cpfcte.method.network import build_backbone

    real = timm.create_model

    def offline(name, pretrained=False, **kw):     # what timm raises when the hub is unreachable
        if pretrained:
            raise OSError("We couldn't connect to the Hub to load the file")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    cfg = load_config("voc", {"backbone": "vit_tiny_patch16_224.augreg_in21k_ft_in1k",
                              "img_size": 224})
    with pytest.raises(CpfcteError, match="could not load the pretrained weights of "
                                          "'vit_tiny_patch16_224.augreg_in21k_ft_in1k'.*--weights"):
        build_backbone(cfg)
    with pytest.raises(CpfcteError, match="unknown backbone 'vit_nonexistent'"):
        build_backbone(load_config("voc", {"backbone": "vit_nonexistent"}))


# ---- the paper-scale smoke's fixtures (cpfcte.data.fixtures) -----------------------------

def test_smoke_voc_fixture_is_what_prepare_voc_reads(tmp_path):
    from cpfcte.data.fixtures import make_voc_sbd

    voc, sbd = make_voc_sbd(tmp_path, n=8)
    report = prepare_voc(voc, sbd, allow_partial=True, progress=False)
    assert report["counts"]["train"] == 4 and report["counts"]["val"] == 2
    assert read_split(voc, "train_aug") == ["2008_000001", "2008_000002", "2008_000003",
                                            "2008_000004", "2008_000007", "2008_000008"]
    with Image.open(voc / "SegmentationClass" / "2008_000001.png") as im:
        assert im.mode == "P" and im.size in ((500, 375), (375, 500))
    m = read_label_png(voc / "SegmentationClass" / "2008_000001.png")
    assert 255 in m and set(np.unique(m)) - {255} <= set(range(21))
    seg = read_sbd_mat(sbd / "cls" / "2008_000007.mat")
    assert seg.shape == (375, 500) and 255 not in seg
    ds = VOCDataset(voc, "train", VOC_CLASSES)
    labels = ds.labels(0)
    assert set(np.flatnonzero(labels)) - {0} == set(np.unique(m)) - {0, 255}  # XML = mask


def test_smoke_coco_fixture_has_the_80_categories_at_their_ids(tmp_path):
    from cpfcte.data.coco_classes import COCO_CLASSES
    from cpfcte.data.fixtures import COCO_CATEGORY_IDS, make_coco

    make_coco(tmp_path, n_train=2, n_val=1)
    data = json.loads((tmp_path / "annotations" / "instances_train2014.json").read_text())
    assert len(data["categories"]) == 80 and max(c["id"] for c in data["categories"]) == 90
    assert len(set(COCO_CATEGORY_IDS)) == 80 and 12 not in COCO_CATEGORY_IDS
    kinds = {("rle" if isinstance(a["segmentation"], dict) else "poly", a["iscrowd"])
             for a in data["annotations"]}
    assert ("poly", 0) in kinds and ("rle", 1) in kinds
    report = prepare_coco(tmp_path, allow_partial=True, progress=False)
    assert report["counts"] == {"train": 2, "val": 1}
    ids = read_split(tmp_path, "train")
    m = read_label_png(tmp_path / "SegmentationClass" / f"{ids[0]}.png")
    assert m.shape == (375, 500) and m[0, 0] == 255          # the crowd corner is ignored
    assert set(np.unique(m)) - {0, 255} <= set(range(1, len(COCO_CLASSES)))


def test_paper_profiles_keep_the_paper_sizes_and_never_allow_random_init():
    from cpfcte.batch.smoke import SmokeFailure, check_profile_sizes

    for profile in ("voc", "coco"):
        check_profile_sizes(profile)
    with pytest.raises(SmokeFailure, match="profile toy sets random_init_ok"):
        check_profile_sizes("toy")


def test_an_interrupted_preparation_is_refused_until_it_is_rerun(voc_sbd, monkeypatch):
    """The completion file is written last: a preparation cut short (here by a full disk at
    its third mask) leaves a tree that `data verify` and every stage refuse, and a rerun keeps
    the masks already written and completes it."""
    from cpfcte.data import dataset_root
    from cpfcte.data.preparation import PREPARED
    from cpfcte.machinery import faults
    from cpfcte.machinery.config import load_config

    voc, sbd, _ = voc_sbd
    prepare_voc(voc, sbd, allow_partial=True, progress=False)          # a complete one first
    cfg = load_config("voc", {"data_root": str(voc)})
    assert dataset_root(cfg) == voc
    for png in (voc / "SegmentationClassAug").glob("*.png"):
        png.unlink()
    monkeypatch.setattr(faults, "_writes", 0)
    monkeypatch.setenv(faults.VARIABLE, "ENOSPC-write:3")
    monkeypatch.setenv(faults.OWNER, str(__import__("os").getpid()))
    with pytest.raises(CpfcteError, match="SegmentationClassAug: cannot write .*No space left"):
        prepare_voc(voc, sbd, allow_partial=True, progress=False)
    monkeypatch.delenv(faults.VARIABLE)
    assert not (voc / PREPARED["voc"]).exists()
    with pytest.raises(CpfcteError, match="not completely prepared .*prepare voc` again"):
        dataset_root(cfg)
    report = prepare_voc(voc, sbd, allow_partial=True, progress=False)
    assert report["written"] == 4 and dataset_root(cfg) == voc      # 2 kept, 4 more written
