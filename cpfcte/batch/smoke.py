"""The paper-scale smoke (``make test-scale``): the voc and coco profiles themselves, on a CPU,
through every stage, on small datasets in the real formats.

It writes a VOC 2012 + SBD tree and a COCO 2014 tree (``cpfcte.data.fixtures``: VOC-sized
JPEGs, palette PNGs with the 255 border, XML, SBD ``.mat``, an instances JSON with polygons, RLE
and a crowd region), prepares them with the commands a user types (``cpfcte data prepare
voc|coco``), then runs, for each profile, the same command-line stages as a user: stage-1
training, pseudo labels (BPM at 960 + dense CRF at the images' own size), DeepLabv2 training
(ResNet-101 at output stride 8, MSC, crop 321) and its multi-scale + flip prediction with the
CRF, and the tables. Every size that shapes the computation is the profile's; only what two CPU
cores cannot afford shrinks, by the overrides ``SMOKE_OVERRIDES`` lists and the smoke prints:
steps and iterations, batch sizes, the number of images, and random weights instead of the
pretrained ones (``random_init_ok``, never set in the voc/coco profile files; every output says
"random init"). Each stage is a subprocess; its seconds and peak memory (max RSS, from
``wait4``) are printed and written to ``smoke.json``. It asserts what the outputs must be and
exits non-zero with the reason otherwise.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cpfcte.machinery.errors import CpfcteError

# the only changes from the voc/coco profiles: what two CPU cores cannot afford
SMOKE_OVERRIDES = {
    "pretrained": "false", "random_init_ok": "true",   # no download here: random init, stamped
    "epochs": "2", "warmup_epochs": "1",                # 2 epochs of 2 steps: frozen, then full
    "batch_size": "3", "workers": "0", "infer_batch": "1",
    "deeplab.pretrained": "false", "deeplab.iterations": "2", "deeplab.batch": "2",
    "deeplab.workers": "0", "deeplab.ckpt_every": "1",
}
# the sizes that shape the computation, checked to be the profile's own
PAPER_SIZES = {"img_size": 384, "infer_size": 960, "deeplab.crop": 321,
               "deeplab.backbone": "resnet101.tv_in1k", "deeplab.msc": True,
               "deeplab.scale_choices": [0.5, 0.75, 1.0, 1.25, 1.5],
               "deeplab.loss_size": "logits", "deeplab.test_views": "msc_max",
               "deeplab.crf": True, "backbone": "vit_base_patch16_384.orig_in21k_ft_in1k",
               "unfreeze_blocks": 5, "bpm_norm": "pcm", "augment": "pcm", "resize": "pcm",
               "dropout": 0.2, "lstm_dropout": 0.2, "classifier_init_std": 0.05,
               "classifier_l2": 0.01, "crf.bilateral_sxy": 67.0}
RUNS = {"voc": ("train_full", "pseudo_full", "pseudo_trainaug", "deeplab_full"),
        "coco": ("train_coco", "pseudo_coco", None, "deeplab_coco")}
# the voc batch's DeepLabv2 from kazuto1011's COCO init (Table 2): its run and file
COCO_INIT_RUN, COCO_INIT_FILE = "deeplab_coco_init", "models/deeplabv1_resnet101-coco.pth"


class SmokeFailure(CpfcteError):
    pass


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise SmokeFailure(f"paper-scale smoke: {message}")


def _sets(overrides: dict[str, str]) -> list[str]:
    return [f"{k}={v}" for k, v in overrides.items()]


class Stages:
    """Runs command-line stages as subprocesses, recording seconds and peak memory."""

    def __init__(self, root: Path):
        self.root = root
        self.env = {**os.environ, "CPFCTE_DATA": str(root / "data"),
                    "CPFCTE_RUNS": str(root / "runs"), "CPFCTE_OUT": str(root / "out"),
                    "MPLBACKEND": "Agg"}
        self.records: list[dict] = []

    def run(self, name: str, *args: str) -> str:
        cmd = [sys.executable, "-m", "cpfcte", *args]
        print(f"[{name}] cpfcte {' '.join(args)}", flush=True)
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env)
            _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.time() - t0
        code = os.waitstatus_to_exitcode(status)
        peak_gb = usage.ru_maxrss / 2 ** 20                  # ru_maxrss is in KiB on Linux
        self.records.append({"stage": name, "seconds": round(seconds, 1),
                             "peak_gb": round(peak_gb, 2), "exit": code})
        print(f"[{name}] {seconds:.1f} s, peak {peak_gb:.2f} GB, exit {code}", flush=True)
        text = log.read_text()
        _check(code == 0, f"stage {name} failed (exit {code}); its log {log} ends:\n"
                          + "\n".join(text.splitlines()[-15:]))
        return text


def _last_json(text: str) -> dict:
    """The JSON object a cpfcte command prints last."""
    start = text.rfind("\n{")
    start = 0 if start < 0 and text.startswith("{") else start + 1
    return json.loads(text[start:])


def _check_labels(folder: Path, split_ids: list[str], images: Path, classes: int) -> None:
    from PIL import Image

    from cpfcte.machinery.io import read_label_png

    files = sorted(folder.glob("*.png"))
    _check(len(files) == len(split_ids), f"{folder}: {len(files)} label PNGs for "
                                         f"{len(split_ids)} images")
    for f in files:
        mask = read_label_png(f)
        with Image.open(images / f"{f.stem}.jpg") as im:
            w, h = im.size
        _check(mask.shape == (h, w), f"{f}: mask {mask.shape[::-1]} for a {w}×{h} image")
        bad = np.setdiff1d(np.unique(mask), np.r_[np.arange(classes), 255])
        _check(bad.size == 0, f"{f}: values {bad.tolist()} outside 0..{classes - 1} and 255")


def _finite(value, what: str) -> None:
    _check(isinstance(value, (int, float)) and math.isfinite(value), f"{what} = {value!r}")


def check_profile_sizes(profile: str) -> None:
    """The smoke's profile keeps every paper size (a regression in the profile file fails)."""
    from cpfcte.machinery.config import load_config

    cfg = load_config(profile)
    _check(not cfg.random_init_ok, f"profile {profile} sets random_init_ok (only the smoke may)")
    for name, expected in PAPER_SIZES.items():
        value = cfg
        for part in name.split("."):
            value = getattr(value, part)
        _check(value == expected, f"profile {profile}: {name} = {value!r}, the paper's is "
                                  f"{expected!r}")


def smoke_profile(stages: Stages, profile: str) -> dict:
    from cpfcte.data import classes_of
    from cpfcte.data.voc import read_split
    from cpfcte.machinery.config import load_config

    check_profile_sizes(profile)
    train_run, pseudo_run, aug_run, deeplab_run = RUNS[profile]
    sets = _sets(SMOKE_OVERRIDES)
    cfg = load_config(profile)
    root = stages.root / "data" / cfg.data_root
    n_classes = len(classes_of(cfg))
    out = _last_json(stages.run(f"{profile} train", "train", "--profile", profile, "--run",
                                train_run, "--set", *sets))
    _check(out["complete"] and out["epochs_done"] == 2, f"{profile} training: {out}")
    _finite(out["last"]["loss"], f"{profile} training loss")
    trainable = out["trainable_parameters"]             # ViT-PCM's phases (note 6)
    _check(list(trainable) == ["warm-up", "main"] and trainable["warm-up"] < trainable["main"],
           f"{profile} training: trainable parameters by phase {trainable}")
    result = {"train_loss": out["last"]["loss"], "trainable_parameters": trainable}
    for run, split in ((pseudo_run, cfg.pseudo_split), (aug_run, cfg.train_split)):
        if run is None:
            continue
        both = ["--both-norms"] if run == pseudo_run else []  # Table 1: the BPM both ways
        m = _last_json(stages.run(f"{profile} pseudo {split}", "pseudo", "--profile", profile,
                                  "--train-run", train_run, "--run", run, "--split", split,
                                  *both))
        _check(m["infer_size"] == 960, f"{profile} pseudo labels at {m['infer_size']}, not 960")
        _finite(m["miou"], f"{profile} BPM mIoU on {split}")
        metrics = json.loads((stages.root / "runs" / profile / run / "metrics.json").read_text())
        _check(metrics["patches_per_side"] == 60, f"{profile}: {metrics['patches_per_side']} "
                                                  "patches per side at 960, not 60")
        ids = read_split(root, split)
        _check_labels(Path(m["bpm_dir"]), ids, root / "JPEGImages", n_classes)
        _check_labels(Path(metrics["crf"]["crf_dir"]), ids, root / "JPEGImages", n_classes)
        result[f"pseudo_{split}"] = {"bpm": m["miou"], "crf": metrics["crf"]["miou"]}
    labels = aug_run or pseudo_run
    out = _last_json(stages.run(f"{profile} deeplab train", "deeplab", "train", "--profile",
                                profile, "--pseudo", labels, "--run", deeplab_run, "--set",
                                *sets))
    _check(out["complete"] and out["iterations_done"] == 2, f"{profile} DeepLabv2: {out}")
    m = _last_json(stages.run(f"{profile} deeplab predict", "deeplab", "predict", "--profile",
                              profile, "--run", deeplab_run))
    metrics = json.loads((stages.root / "runs" / profile / deeplab_run / "metrics.json")
                         .read_text())
    _check(set(metrics["levels"]) == {"single_scale", "multi_scale", "crf"},
           f"{profile} DeepLabv2 levels {sorted(metrics['levels'])}")
    _check("random init" in metrics["weights"], f"{profile} DeepLabv2 not stamped random init")
    val_ids = read_split(root, cfg.val_split)
    for key in ("single_dir", "pred_dir", "crf_dir"):
        _check_labels(Path(metrics[key]), val_ids, root / "JPEGImages", n_classes)
    for level, v in metrics["levels"].items():
        _finite(v["miou"], f"{profile} DeepLabv2 {level} mIoU")
    history = json.loads((stages.root / "runs" / profile / deeplab_run / "summary.json")
                         .read_text())["history"]
    _finite(history[-1]["loss"], f"{profile} DeepLabv2 loss")
    result["deeplab"] = {k: v["miou"] for k, v in metrics["levels"].items()}
    result["deeplab_parameters"] = metrics["parameters"]
    if profile == "voc":                                 # Table 2's COCO-init row
        result["deeplab_coco_init"] = smoke_coco_init(stages, labels, val_ids, root, n_classes)
    return result


def smoke_coco_init(stages: Stages, labels: str, val_ids: list[str], root: Path,
                    n_classes: int) -> dict:
    """DeepLabv2 from a kazuto1011-format COCO init (random weights in his format, at the path
    the voc batch reads): detected as his Caffe-style ResNet-101, trained and predicted."""
    from cpfcte.method.caffe_resnet import write_checkpoint

    write_checkpoint(stages.root / "data" / COCO_INIT_FILE)
    sets = _sets(SMOKE_OVERRIDES)
    out = _last_json(stages.run("voc deeplab coco init", "deeplab", "train", "--profile", "voc",
                                "--pseudo", labels, "--run", COCO_INIT_RUN, "--init",
                                COCO_INIT_FILE, "--set", *sets))
    _check(out["complete"], f"voc DeepLabv2 from the COCO init: {out}")
    stages.run("voc deeplab coco init predict", "deeplab", "predict", "--profile", "voc",
               "--run", COCO_INIT_RUN)
    folder = stages.root / "runs" / "voc" / COCO_INIT_RUN
    backbone = json.loads((folder / "config.json").read_text())["config"]["deeplab"]["backbone"]
    _check(backbone == "caffe_resnet101", f"the COCO init ran in {backbone}, not caffe_resnet101")
    metrics = json.loads((folder / "metrics.json").read_text())
    _check_labels(Path(metrics["crf_dir"]), val_ids, root / "JPEGImages", n_classes)
    _check("local init" in metrics["weights"], f"COCO init stamped {metrics['weights']!r}")
    return {k: v["miou"] for k, v in metrics["levels"].items()}


def check_tables(stages: Stages, profile: str) -> dict:
    """The tables of ``profile``, written from the smoke's runs: the cells of its runs filled,
    and the random init said."""
    stages.run(f"{profile} report", "report", "--profile", profile)
    tables = stages.root / "out" / "tables"
    cells = {}
    names = {"voc": ("table1", "table2"), "coco": ("table3",)}[profile]
    for name in names:
        md = (tables / f"{name}.{profile}.md").read_text()
        rows = [r for r in md.splitlines() if r.startswith("| CPF-CTE")]
        for row in rows:
            parts = [p.strip() for p in row.strip("|").split("|")]
            _check(len(parts) >= 5 and parts[4] not in ("", "—") and "not run" not in parts[4],
                   f"{name}.{profile}.md: row {parts[0]!r} has no value from the smoke's runs")
            cells[f"{name}: {parts[0]}"] = parts[4]
        _check("RANDOM INIT" in md, f"{name}.{profile}.md does not warn 'RANDOM INIT'")
    return cells


def main(argv: list[str] | None = None) -> int:
    import argparse
    import shutil

    from cpfcte.data.fixtures import make_coco, make_voc_sbd

    parser = argparse.ArgumentParser(prog="python -m cpfcte.batch.smoke", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/_scale", help="working folder (emptied first)")
    parser.add_argument("--profiles", nargs="*", default=["voc", "coco"])
    args = parser.parse_args(argv)
    root = Path(args.out).resolve()
    shutil.rmtree(root, ignore_errors=True)
    (root / "data").mkdir(parents=True)
    print("paper-scale smoke: the profiles' own sizes; shrunk for two CPU cores: "
          + ", ".join(_sets(SMOKE_OVERRIDES)), flush=True)
    stages = Stages(root)
    t0 = time.time()
    report: dict = {"overrides": SMOKE_OVERRIDES, "profiles": {}}
    try:
        if "voc" in args.profiles:
            voc, sbd = make_voc_sbd(root / "data", n=8)
            stages.run("voc prepare", "data", "prepare", "voc", "--voc-root", str(voc),
                       "--sbd-root", str(sbd), "--allow-partial")
        if "coco" in args.profiles:
            make_coco(root / "data" / "coco2014", n_train=4, n_val=1)
            stages.run("coco prepare", "data", "prepare", "coco", "--coco-root",
                       str(root / "data" / "coco2014"), "--allow-partial")
        for profile in args.profiles:
            report["profiles"][profile] = smoke_profile(stages, profile)
            report["profiles"][profile]["tables"] = check_tables(stages, profile)
    except SmokeFailure as e:
        print(f"\nFAILED: {e}", file=sys.stderr)
        return 1
    finally:
        report["stages"] = stages.records
        report["seconds"] = round(time.time() - t0, 1)
        report["peak_gb"] = max((r["peak_gb"] for r in stages.records), default=0.0)
        (root / "smoke.json").write_text(json.dumps(report, indent=2))
        print("\n  stage                      seconds   peak GB")
        for r in stages.records:
            print(f"  {r['stage']:<26} {r['seconds']:>7.1f}   {r['peak_gb']:>7.2f}")
        print(f"  {'all':<26} {report['seconds']:>7.1f}   {report['peak_gb']:>7.2f}")
    for profile, r in report["profiles"].items():
        for cell, value in r["tables"].items():
            print(f"  {profile} {cell}: {value} (random init, 2 steps: not a result)")
    print(f"\npaper-scale smoke passed in {report['seconds']:.0f} s; {root / 'smoke.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
