"""Estimated run times for ``cpfcte paper --dry-run`` (a plan for a GPU machine).

Each pending run's time is estimated from the work it does (images × epochs, iterations, images
to infer and to refine) divided by a throughput. The throughputs are those measured by the GPU
benchmark (``benchmarks/throughput.json`` when present); otherwise the reference figures
measured on one H200 for this project (torch 2.11, bf16, ViT-B/16 at 384): CPF-CTE training
777 img/s (batch 64, eager), inference at 960 286 img/s, DeepLabv2 ResNet-101 training at 321
231 img/s, dense CRF 0.75 s per VOC image per core on 16 cores. They are estimates, labelled so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cpfcte.paths import project_root

REFERENCE = {"source": "reference H200 figures (issue 7)", "train_img_s": 777.0,
             "infer_img_s": 286.0, "deeplab_img_s": 231.0, "crf_s_per_image_core": 0.75,
             "cores": 16}
KNOWN_SPLITS = {"voc": {"train_aug": 10582, "train": 1464, "val": 1449},
                "coco": {"train": 82081, "val": 40137}}


def throughputs() -> dict:
    path = project_root() / "benchmarks" / "throughput.json"
    if path.is_file():
        return {**REFERENCE, **json.loads(path.read_text()), "source": str(path)}
    return dict(REFERENCE)


def split_size(cfg, split: str) -> int:
    from cpfcte.data import dataset_root
    from cpfcte.data.voc import read_split
    from cpfcte.errors import CpfcteError

    try:
        return len(read_split(dataset_root(cfg), split))
    except CpfcteError:
        return KNOWN_SPLITS.get(cfg.dataset, {}).get(split, 0)


def estimate_seconds(notebook: str, profile: str, params: dict, tp: dict) -> float:
    from cpfcte.config import load_config

    cfg = load_config(profile)
    crf = split_size(cfg, params.get("split") or cfg.pseudo_split) * tp[
        "crf_s_per_image_core"] / tp["cores"]
    if notebook.startswith("02"):
        return cfg.epochs * split_size(cfg, cfg.train_split) / tp["train_img_s"]
    if notebook.startswith("03"):
        n = split_size(cfg, params.get("split") or cfg.pseudo_split)
        return n / tp["infer_img_s"] + crf
    if notebook.startswith("04"):
        n = split_size(cfg, cfg.val_split)
        views = len(cfg.deeplab_test_scales) * (2 if cfg.deeplab_flip_test else 1)
        train = cfg.deeplab_iterations * cfg.deeplab_batch * (
            1.75 if cfg.deeplab_msc else 1.0) / tp["deeplab_img_s"]
        return train + n * views / (4 * tp["deeplab_img_s"]) + n * tp[
            "crf_s_per_image_core"] / tp["cores"]
    return 0.0


def print_plan(profile: str, results: dict[str, dict]) -> float:
    tp = throughputs()
    total = 0.0
    print(f"\nplan for profile {profile} (throughputs: {tp['source']})")
    print(f"{'run':<22}{'notebook':<26}{'profile':<10}{'estimate':>10}")
    for name, r in results.items():
        if not r.get("dry_run"):
            continue
        sec = estimate_seconds(r["notebook"], r["profile"], r.get("params", {}), tp)
        total += sec
        print(f"{name:<22}{r['notebook']:<26}{r['profile']:<10}{sec / 3600:>9.2f}h")
    skipped = sum(1 for r in results.values() if r.get("action"))
    print(f"total: {total / 3600:.1f} GPU hours for {sum(1 for r in results.values() if r.get('dry_run'))}"
          f" runs ({skipped} unchanged runs skipped; {os.cpu_count()} CPU cores here)")
    return total
