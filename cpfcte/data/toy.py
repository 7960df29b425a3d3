"""The embedded toy dataset: generated deterministically from a seed, written in the VOC layout.

It is a small but real weak-supervision problem:

* ten classes in five colour families (``TOY_CLASSES``); both classes of a family share body
  colours and textures and differ only by a small marker (a light dot or a dark bar), so only a
  few patches of an object tell its class and the rest is ambiguous between the two;
* several shapes (ellipse, rotated rectangle, triangle, blob, ring), sizes and textures
  (stripes, checker, dots, mottled) per class, one to four objects and one to three classes
  per image, partial occlusion between objects;
* a cluttered textured background: low-frequency colour noise, line segments and grey blobs,
  small saturated specks of any hue, and *decoys*: bodies in an object family's colours and
  textures but without a marker, labelled background. A colour detector alone confuses them
  with objects; only the marker (and the context around it) tells an object from a decoy.

Masks carry a 255 band along every boundary, like VOC's; train and val get palette PNGs in
``SegmentationClass``; every image also gets a grayscale PNG in ``SegmentationClassAug`` (the
"SBD" extra images get only that one, without the band, as real SBD-derived masks). Image labels
come from ``Annotations/*.xml``, as for VOC.

The same scenes are also written in COCO format under ``coco/`` (``train2014`` = train_aug,
``val2014`` = val; ``annotations/instances_*.json`` with polygons, uncompressed RLE and crowd
regions; category ids with gaps, as COCO's), so the COCO preparation path
(``cpfcte.data.coco``) runs on every ``make paper``.
"""

from __future__ import annotations

import colorsys
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image

from cpfcte.data.classes import TOY_CLASSES, TOY_FAMILIES, TOY_MARKERS
from cpfcte.machinery.errors import CpfcteError
from cpfcte.machinery.io import (
    IGNORE_INDEX,
    atomic_path,
    read_json,
    save_label_png,
    write_json,
    write_text,
)

SHAPES = ("ellipse", "rectangle", "triangle", "blob", "ring")
TEXTURES = ("stripes", "checker", "dots", "mottled")
SPEC_FILE = "toy_spec.json"


@dataclass(frozen=True)
class ToySpec:
    seed: int = 0
    n_train: int = 120      # ImageSets/Segmentation/train.txt (masks in SegmentationClass)
    n_val: int = 120        # ImageSets/Segmentation/val.txt
    n_extra: int = 480      # the "SBD" images: train_aug = train + extra
    min_size: int = 88      # image sides are drawn from [min_size, max_size]
    max_size: int = 128
    version: int = 3        # bump when the generator's output changes (3: even family hues)


# ----------------------------------------------------------------------------------------------
# drawing


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a random grid upsampled bilinearly."""
    grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
    img = Image.fromarray((grid * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


def _shape_mask(rng: np.random.Generator, shape: str, yy: np.ndarray, xx: np.ndarray,
                cy: float, cx: float, r: float) -> np.ndarray:
    angle = rng.uniform(0, np.pi)
    ca, sa = np.cos(angle), np.sin(angle)
    u = (xx - cx) * ca + (yy - cy) * sa
    v = -(xx - cx) * sa + (yy - cy) * ca
    aspect = rng.uniform(0.55, 1.0)
    if shape == "ellipse":
        return (u / r) ** 2 + (v / (r * aspect)) ** 2 <= 1.0
    if shape == "rectangle":
        return (np.abs(u) <= r * 0.9) & (np.abs(v) <= r * 0.9 * aspect)
    if shape == "ring":
        d = (u / r) ** 2 + (v / (r * aspect)) ** 2
        return (d <= 1.0) & (d >= 0.3)
    if shape == "triangle":
        pts = [(r * np.cos(a), r * np.sin(a)) for a in (np.pi / 2, np.pi * 7 / 6, np.pi * 11 / 6)]
        inside = np.ones_like(u, dtype=bool)
        for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]):
            inside &= (x1 - x0) * (v - y0) - (y1 - y0) * (u - x0) >= 0
        return inside
    if shape == "blob":
        theta = np.arctan2(v, u)
        rad = np.full_like(u, r * 0.8)
        for freq in (2, 3, 5):
            rad += r * rng.uniform(0.05, 0.18) * np.cos(freq * theta + rng.uniform(0, 2 * np.pi))
        return np.hypot(u, v) <= rad
    raise ValueError(shape)


def _texture(rng: np.random.Generator, texture: str, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """A pattern in [0, 1] over the whole canvas (masked later)."""
    period = rng.uniform(4.0, 8.0)
    if texture == "stripes":
        a = rng.uniform(0, np.pi)
        t = (xx * np.cos(a) + yy * np.sin(a)) / period
        return (np.sin(2 * np.pi * t) > 0).astype(np.float32)
    if texture == "checker":
        ox, oy = rng.uniform(0, period, 2)
        return (((np.floor((xx + ox) / period) + np.floor((yy + oy) / period)) % 2) == 0).astype(
            np.float32)
    if texture == "dots":
        fy = ((yy + rng.uniform(0, period)) % period) - period / 2
        fx = ((xx + rng.uniform(0, period)) % period) - period / 2
        return (np.hypot(fx, fy) < period * 0.3).astype(np.float32)
    if texture == "mottled":
        h, w = yy.shape
        return _smooth_noise(rng, h, w, max(3, int(max(h, w) / period)))
    raise ValueError(texture)


def _background(rng: np.random.Generator, h: int, w: int, yy: np.ndarray,
                xx: np.ndarray) -> np.ndarray:
    base_h = rng.random()
    c1 = _hsv(base_h, rng.uniform(0.0, 0.25), rng.uniform(0.35, 0.8))
    c2 = _hsv(base_h + rng.uniform(-0.2, 0.2), rng.uniform(0.0, 0.25), rng.uniform(0.3, 0.85))
    t = _smooth_noise(rng, h, w, int(rng.integers(2, 6)))[..., None]
    img = c1 * t + c2 * (1 - t)
    # clutter: line segments and grey blobs
    for _ in range(int(rng.integers(4, 12))):
        col = _hsv(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.2, 0.95))
        if rng.random() < 0.5:
            x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
            a = rng.uniform(0, np.pi)
            d = np.abs((xx - x0) * np.sin(a) - (yy - y0) * np.cos(a))
            along = np.abs((xx - x0) * np.cos(a) + (yy - y0) * np.sin(a))
            m = (d < rng.uniform(0.6, 2.0)) & (along < rng.uniform(8, 40))
        else:
            m = _shape_mask(rng, str(rng.choice(SHAPES[:4])), yy, xx, rng.uniform(0, h),
                            rng.uniform(0, w), rng.uniform(3, 10))
        img[m] = col
    # small saturated specks of any hue
    for _ in range(int(rng.integers(2, 7))):
        m = np.hypot(yy - rng.uniform(0, h), xx - rng.uniform(0, w)) < rng.uniform(1.0, 2.5)
        img[m] = _hsv(rng.random(), rng.uniform(0.6, 1.0), rng.uniform(0.5, 1.0))
    return img


def _body(rng: np.random.Generator, hue: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """An object body: two shades of a family's hue in one of the textures."""
    tex = _texture(rng, str(rng.choice(TEXTURES)), yy, xx)[..., None]
    dh = rng.uniform(-0.03, 0.03)
    light = _hsv(hue + dh, rng.uniform(0.55, 0.9), rng.uniform(0.75, 1.0))
    dark = _hsv(hue + dh, rng.uniform(0.6, 1.0), rng.uniform(0.35, 0.6))
    return light * tex + dark * (1 - tex)


@dataclass
class _Object:
    cls: int
    mask: np.ndarray
    area: int


def render_scene(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray,
                                                                     list[tuple]]:
    """One scene: an H×W×3 uint8 image, an H×W label map (no band) and, per visible object,
    (class index, (xmin, ymin, xmax, ymax) with 1-based VOC box coordinates, visible mask)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = _background(rng, h, w, yy, xx)
    label = np.zeros((h, w), dtype=np.uint8)
    # decoys: bodies in an object family's colours and textures but without a marker, part of
    # the background; they make the marker the only reliable cue of an object
    for _ in range(int(rng.choice([0, 1, 2], p=[0.4, 0.4, 0.2]))):
        r = rng.uniform(0.1, 0.3) * min(h, w)
        m = _shape_mask(rng, str(rng.choice(SHAPES)), yy, xx, rng.uniform(0, h), rng.uniform(0, w), r)
        img[m] = _body(rng, TOY_FAMILIES[int(rng.integers(len(TOY_FAMILIES)))][1], yy, xx)[m]
    n_classes = int(rng.choice([1, 2, 3], p=[0.45, 0.4, 0.15]))
    classes = rng.choice(np.arange(1, len(TOY_CLASSES)), size=n_classes, replace=False)
    n_objects = max(n_classes, int(rng.integers(1, 5)))
    wanted = list(classes) + list(rng.choice(classes, size=n_objects - n_classes))
    placed: list[_Object] = []
    side = min(h, w)
    for cls in wanted:
        family, marker = divmod(int(cls) - 1, len(TOY_MARKERS))
        hue = TOY_FAMILIES[family][1]
        for _attempt in range(20):
            r = rng.uniform(0.12, 0.38) * side
            cy, cx = rng.uniform(r * 0.5, h - r * 0.5), rng.uniform(r * 0.5, w - r * 0.5)
            shape = str(rng.choice(SHAPES))
            mask = _shape_mask(rng, shape, yy, xx, cy, cx, r)
            if mask.sum() < 60:
                continue
            # occlusion: every earlier object keeps at least half of its visible area
            if all((o.mask & ~mask).sum() >= 0.5 * o.area for o in placed):
                break
        else:
            continue
        for o in placed:
            o.mask &= ~mask
        img[mask] = _body(rng, hue, yy, xx)[mask]
        # the marker: small, inside the object, the only cue that separates the family's pair
        ys, xs = np.nonzero(mask)
        j = int(rng.integers(len(ys)))
        my, mx = ys[j], xs[j]
        mr = max(2.0, 0.22 * r)
        if TOY_MARKERS[marker] == "dot":
            mmask = np.hypot(yy - my, xx - mx) <= mr
            mcol = np.array([0.97, 0.97, 0.92], dtype=np.float32)
        else:
            a = rng.uniform(0, np.pi)
            u = (xx - mx) * np.cos(a) + (yy - my) * np.sin(a)
            v = -(xx - mx) * np.sin(a) + (yy - my) * np.cos(a)
            mmask = (np.abs(u) <= mr * 1.4) & (np.abs(v) <= mr * 0.45)
            mcol = np.array([0.06, 0.06, 0.08], dtype=np.float32)
        mmask &= mask
        img[mmask] = mcol
        label[mask] = cls
        placed.append(_Object(int(cls), mask.copy(), int(mask.sum())))
    img = np.clip(img + rng.normal(0, 0.025, img.shape).astype(np.float32), 0, 1)
    objects = []
    for o in placed:
        ys, xs = np.nonzero(o.mask)
        if len(ys) == 0:
            continue
        objects.append((o.cls, (int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1,
                                int(ys.max()) + 1), o.mask))
    return (img * 255).round().astype(np.uint8), label, objects


def boundary_band(label: np.ndarray) -> np.ndarray:
    """Pixels whose 4-neighbourhood holds another label: VOC's 255 'void' band, scaled down."""
    band = np.zeros(label.shape, dtype=bool)
    diff_v = label[1:, :] != label[:-1, :]
    diff_h = label[:, 1:] != label[:, :-1]
    band[1:, :] |= diff_v
    band[:-1, :] |= diff_v
    band[:, 1:] |= diff_h
    band[:, :-1] |= diff_h
    return band


def annotation_xml(image_id: str, w: int, h: int, objects: list[tuple],
                   segmented: bool) -> str:
    parts = [
        "<annotation>", "\t<folder>VOC2012</folder>", f"\t<filename>{image_id}.jpg</filename>",
        "\t<source>", "\t\t<database>cpfcte toy</database>", "\t</source>",
        "\t<size>", f"\t\t<width>{w}</width>", f"\t\t<height>{h}</height>",
        "\t\t<depth>3</depth>", "\t</size>", f"\t<segmented>{int(segmented)}</segmented>",
    ]
    for cls, (x0, y0, x1, y1), _mask in objects:
        parts += [
            "\t<object>", f"\t\t<name>{escape(TOY_CLASSES[cls])}</name>",
            "\t\t<pose>Unspecified</pose>", "\t\t<truncated>0</truncated>",
            "\t\t<difficult>0</difficult>", "\t\t<bndbox>", f"\t\t\t<xmin>{x0}</xmin>",
            f"\t\t\t<ymin>{y0}</ymin>", f"\t\t\t<xmax>{x1}</xmax>", f"\t\t\t<ymax>{y1}</ymax>",
            "\t\t</bndbox>", "\t</object>",
        ]
    parts.append("</annotation>")
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------------------------
# writing the dataset


def _write_scene(root: Path, image_id: str, rng: np.random.Generator, spec: ToySpec,
                 segmented: bool, coco: "_CocoTwin | None" = None) -> None:
    h, w = (int(v) for v in rng.integers(spec.min_size, spec.max_size + 1, size=2))
    img, label, objects = render_scene(rng, h, w)
    jpeg = root / "JPEGImages" / f"{image_id}.jpg"
    with atomic_path(jpeg) as tmp:
        Image.fromarray(img).save(tmp, format="JPEG", quality=90)
    if coco is not None:
        coco.add(jpeg, h, w, objects, rng)
    write_text(root / "Annotations" / f"{image_id}.xml",
               annotation_xml(image_id, w, h, objects, segmented))
    banded = label.copy()
    banded[boundary_band(label)] = IGNORE_INDEX
    if segmented:
        save_label_png(root / "SegmentationClass" / f"{image_id}.png", banded, palette=True)
        save_label_png(root / "SegmentationClassAug" / f"{image_id}.png", banded, palette=False)
    else:  # SBD-derived masks have no boundary band
        save_label_png(root / "SegmentationClassAug" / f"{image_id}.png", label, palette=False)


def generate(root: str | Path, spec: ToySpec = ToySpec(), *, force: bool = False,
             progress: bool = True) -> Path:
    """Write the toy dataset to ``root`` (idempotent: an existing dataset made from the same
    spec is kept). The dataset is built in a sibling folder and renamed into place, so an
    interrupted generation never leaves a half-written dataset at ``root``."""
    from cpfcte.machinery.progress import progress_bar

    root = Path(root)
    if not force and is_complete(root, spec):
        return root
    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    ids = {
        "train": [f"2026_{i:06d}" for i in range(spec.n_train)],
        "val": [f"2026_{spec.n_train + i:06d}" for i in range(spec.n_val)],
        "extra": [f"2027_{i:06d}" for i in range(spec.n_extra)],
    }
    order = [(i, True) for i in ids["train"] + ids["val"]] + [(i, False) for i in ids["extra"]]
    twins = {"train": _CocoTwin(staging / "coco", "train2014"),
             "val": _CocoTwin(staging / "coco", "val2014")}
    val_ids = set(ids["val"])
    start = time.time()
    bar = progress_bar(order, desc="toy dataset", disable=not progress, leave=False)
    for n, (image_id, segmented) in enumerate(bar):
        rng = np.random.default_rng([spec.seed, spec.version, n])
        twin = twins["val" if image_id in val_ids else "train"]
        _write_scene(staging, image_id, rng, spec, segmented, twin)
    for twin in twins.values():
        twin.write()
    seg = staging / "ImageSets" / "Segmentation"
    write_text(seg / "train.txt", "\n".join(ids["train"]) + "\n")
    write_text(seg / "val.txt", "\n".join(ids["val"]) + "\n")
    write_text(seg / "trainval.txt", "\n".join(ids["train"] + ids["val"]) + "\n")
    write_text(staging / "ImageSets" / "SegmentationAug" / "train_aug.txt",
               "\n".join(ids["train"] + ids["extra"]) + "\n")
    write_text(staging / "classes.txt", "\n".join(TOY_CLASSES) + "\n")
    write_json(staging / SPEC_FILE, {**asdict(spec), "seconds": round(time.time() - start, 2)})
    if root.exists():
        old = root.with_name(root.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        root.rename(old)
        staging.rename(root)
        shutil.rmtree(old, ignore_errors=True)
    else:
        root.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(root)
    return root


# ----------------------------------------------------------------------------------------------
# the COCO-format twin


def toy_coco_categories() -> list[dict]:
    """The toy classes as COCO categories with non-contiguous ids (1, 3, 5, ...), so that the
    COCO path's id → index remapping is exercised as with COCO's 1..90."""
    return [{"id": 2 * i + 1, "name": name, "supercategory": name.split("_")[0]}
            for i, name in enumerate(TOY_CLASSES[1:])]


def rle_uncompressed(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with a run
    of zeros (possibly empty)."""
    flat = np.asarray(mask, dtype=bool).flatten(order="F")
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0] + counts
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def mask_polygons(mask: np.ndarray) -> list[list[float]]:
    """Outlines of a hole-free mask as COCO polygons (pixel-corner coordinates)."""
    import contourpy

    padded = np.pad(mask.astype(np.float64), 1)
    gen = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate)
    polys = []
    for line in gen.lines(0.5):
        if len(line) >= 3:
            xy = line - 1 + 0.5                      # pixel centres → COCO's corner coordinates
            polys.append([round(float(v), 2) for v in xy.reshape(-1)])
    return polys


class _CocoTwin:
    """Collects the scenes of one split as a COCO instances file: hole-free objects as polygons,
    objects with holes (rings, or an object on top of another) and about one in four others as
    uncompressed RLE, and in about one image in six one object marked as a crowd region."""

    def __init__(self, root: Path, folder: str):
        self.root, self.folder = root, folder
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.cat_ids = [c["id"] for c in toy_coco_categories()]

    def add(self, jpeg: Path, h: int, w: int, objects: list[tuple], rng: np.random.Generator) -> None:
        from scipy.ndimage import binary_fill_holes

        image_id = len(self.images) + 1
        name = f"COCO_{self.folder}_{image_id:012d}.jpg"
        target = self.root / self.folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(jpeg, target)
        except OSError:
            shutil.copyfile(jpeg, target)
        self.images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        crowd = int(rng.integers(len(objects))) if objects and rng.random() < 1 / 6 else -1
        for k, (cls, _box, mask) in enumerate(objects):
            ys, xs = np.nonzero(mask)
            holes = bool((binary_fill_holes(mask) & ~mask).any())
            as_rle = k == crowd or holes or rng.random() < 0.25
            seg = rle_uncompressed(mask) if as_rle else mask_polygons(mask)
            self.annotations.append({
                "id": len(self.annotations) + 1, "image_id": image_id,
                "category_id": self.cat_ids[cls - 1], "segmentation": seg,
                "area": float(mask.sum()), "iscrowd": int(k == crowd),
                "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                         float(ys.max() - ys.min() + 1)]})

    def write(self) -> None:
        data = {"info": {"description": "cpfcte toy dataset, COCO-format twin"},
                "licenses": [], "images": self.images, "annotations": self.annotations,
                "categories": toy_coco_categories()}
        write_text(self.root / "annotations" / f"instances_{self.folder}.json", json.dumps(data))


def is_complete(root: Path, spec: ToySpec) -> bool:
    stamp = root / SPEC_FILE
    if not stamp.is_file():
        return False
    try:
        saved = read_json(stamp)
    except CpfcteError:
        return False
    return all(saved.get(k) == v for k, v in asdict(spec).items())


def prepare_toy(root: str | Path | None = None, seed: int = 0, *, force: bool = False,
                progress: bool = True) -> Path:
    """Generate the toy dataset (refusing a folder of yours) and convert its COCO twin
    through the COCO path."""
    from cpfcte.data.coco import prepare_coco
    from cpfcte.data.preparation import PREPARED
    from cpfcte.machinery.paths import data_dir
    from cpfcte.machinery.safety import check_folder, owner_of, user_files

    root = Path(root) if root else data_dir() / "toy"
    found = user_files(root)
    if found and owner_of(root) != "data prepare toy":   # the toy replaces its whole folder:
        raise CpfcteError(                                # never one of yours, --force or not
            f"{root}: holds {', '.join(p.name for p in found[:3])}"
            f"{' …' if len(found) > 3 else ''} and is not a toy dataset this command made; it "
            "would replace the whole folder, so nothing was written. Give a new or empty "
            "folder (--root)")
    check_folder(root, "data prepare toy", force=force)
    generate(root, ToySpec(seed=seed), force=force, progress=progress)
    if force or not (root / "coco" / PREPARED["toy_coco"]).exists():
        prepare_coco(root / "coco", classes=TOY_CLASSES, known_counts=None, progress=progress)
    return root


def ensure_toy(cfg, progress: bool = True) -> Path | None:
    """The toy dataset that a toy config reads from the project's ``data/toy``, generated now
    when it is not there (deterministic, seconds; one line says so first). Nothing happens for
    another dataset or a toy folder elsewhere (``data_root`` of yours): those are read as they
    are, and a missing one is an error that says how to make it."""
    from cpfcte.data.datasets import dataset_root
    from cpfcte.machinery.errors import CpfcteError
    from cpfcte.machinery.paths import data_dir, resolve

    if cfg.dataset not in ("toy", "toy_coco"):
        return None
    toy = data_dir() / "toy"
    if resolve(cfg.data_root, data_dir()).resolve() not in (toy.resolve(),
                                                           (toy / "coco").resolve()):
        return None
    try:
        return dataset_root(cfg)
    except CpfcteError:
        pass
    print(f"preparing the toy dataset in {toy} (it is not there yet; deterministic, about "
          "15 s): 720 images of 10 synthetic classes, and its COCO-format twin", flush=True)
    prepare_toy(toy, progress=progress)
    return dataset_root(cfg)
