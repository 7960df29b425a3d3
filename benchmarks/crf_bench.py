"""Dense-CRF throughput on VOC-sized inputs (issue: CRF stage).

    .venv/bin/python benchmarks/crf_bench.py [--images 16] [--classes 21] [--iterations 10]

Builds synthetic VOC-sized inputs (500×375 blocky colour images with noise, smooth random
patch-grid probabilities at 60×60 = the paper's 960/16), then times ``crf_stage`` with 1 worker
and with every core, over all C classes and over the 3 classes of a typical image label, and
prints images per second with ratios to the 1-worker, all-class baseline measured in this run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cpfcte.machinery.config import CRFConfig
from cpfcte.method.crf import save_grid_probs
from cpfcte.stages.crf_pool import CRFJob, crf_stage


def make_inputs(folder: Path, n: int, classes: int, present: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    jobs = []
    for i in range(n):
        blocks = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(blocks).resize((500, 375), Image.NEAREST), dtype=np.int16)
        img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:04d}.jpg", quality=90)
        grid = np.exp(3 * rng.standard_normal((classes, 60, 60))).astype(np.float32)
        labels = np.zeros(classes)
        labels[0] = 1
        labels[rng.choice(np.arange(1, classes), size=present - 1, replace=False)] = 1
        if present == classes:
            labels[:] = 1
        grid = grid * labels[:, None, None]
        grid /= grid.sum(0, keepdims=True)
        save_grid_probs(folder / f"{i:04d}.npz", grid, labels)
        jobs.append(CRFJob(str(folder / "out" / f"{i:04d}.png"), str(folder / f"{i:04d}.jpg"),
                           str(folder / f"{i:04d}.npz")))
    return jobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--classes", type=int, default=21)
    ap.add_argument("--iterations", type=int, default=10)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    params = CRFConfig(iterations=args.iterations)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="crf-bench-"))
    try:
        for present, label in ((args.classes, f"all {args.classes} classes"),
                               (3, "3 classes (image label)")):
            folder = tmp / str(present)
            folder.mkdir()
            jobs = make_inputs(folder, args.images, args.classes, present)
            for workers in (1, cores):
                shutil.rmtree(folder / "out", ignore_errors=True)
                t0 = time.perf_counter()
                r = crf_stage(jobs, dataclasses.replace(params, workers=workers), progress=False)
                dt = time.perf_counter() - t0
                assert not r["failed"], r["failed"]
                rows.append((label, workers, args.images / dt))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = rows[0][2]
    print(f"dense CRF, 500×375, {args.iterations} iterations, {args.images} images, "
          f"{cores} cores")
    print(f"{'classes':<26}{'workers':>8}{'img/s':>9}{'× baseline':>12}")
    for label, workers, ips in rows:
        print(f"{label:<26}{workers:>8}{ips:>9.2f}{ips / base:>12.2f}")
    print(f"10,582 images (VOC train_aug) at the best rate: "
          f"{10582 / max(r[2] for r in rows) / 60:.1f} min on this machine")


if __name__ == "__main__":
    main()
