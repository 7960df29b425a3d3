"""Stage 1's training loader on one CPU core: the colour ops in the loader (numpy, the default
and the toy's) against on the device (``augment_on: device``, voc's: the loader decodes,
resizes and flips; the batch gets the colour ops where it trains).

    .venv/bin/python benchmarks/loader_bench.py [--images 16] [--batches 6] [--size 384]

Writes VOC-sized JPEGs (500 × 375), reads them through ``ClassificationData`` as stage 1 does,
with no workers, and prints ms per image for each mode, the cost of ``apply_color_batch`` on
this CPU (on a GPU it is a few kernels on the batch) and the ratio to the loader-colour
baseline measured in this run. Images per second on N workers are about N × 1000 / ms.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import numpy as np
import torch

from cpfcte.data.transforms import apply_color_batch, color_params

ROOT = Path(__file__).resolve().parents[1]


def _gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" /
                                                  "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--size", type=int, default=384)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    bench = _gpu_bench()
    cfg = bench.stage1_config(False)
    cfg.workers, cfg.img_size = 0, args.size
    sizes = {**bench.PAPER, "loader_images": args.images}
    out = {}
    for mode in ("loader", "device"):
        r = bench._loader_img_s(cfg, sizes, args.batches, mode)
        out[mode] = r["ms_per_image_per_worker"]
    x = torch.rand(cfg.batch_size, 3, args.size, args.size) * 255
    p = torch.from_numpy(np.stack([color_params(np.random.default_rng(i))
                                   for i in range(cfg.batch_size)]))
    apply_color_batch(x, p)
    t0 = time.perf_counter()
    apply_color_batch(x, p)
    out["colour_on_this_cpu"] = round(1000 * (time.perf_counter() - t0) / cfg.batch_size, 2)
    base = out["loader"]
    print(f"stage-1 loader at {args.size}, one core, ms per image "
          f"(ratio to the colour in the loader, this run):")
    print(f"  colour in the loader (augment_on: loader)  {base:7.2f}  1.00")
    print(f"  colour on the device (augment_on: device)  {out['device']:7.2f}  "
          f"{out['device'] / base:.2f}")
    print(f"  apply_color_batch on this CPU, per image   {out['colour_on_this_cpu']:7.2f}  "
          f"{out['colour_on_this_cpu'] / base:.2f}")
    return out


if __name__ == "__main__":
    main()
