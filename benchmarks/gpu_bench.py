"""Throughput of every paper-scale stage on one device, written to ``benchmarks/throughput.json``
(which ``cpfcte paper --profile voc --dry-run`` reads for its plan).

    python benchmarks/gpu_bench.py                 # on a CUDA machine: the paper's sizes, bf16
    python benchmarks/gpu_bench.py --tiny --device cpu --out /tmp/t.json   # the test's sizes

Measures, in one run (random init: throughput does not depend on the weights), section by
section in the order of their value to the plan, and saves the JSON after every section
(``<out>.partial.json`` until the last one is done, then ``<out>``): a section that fails
records its error and the next one runs, so a late failure keeps every figure before it:
- stage 1 train step (forward, MCE loss, backward, Adam step) in img/s for the bare ViT-B/16
  (timm's own classification head, BCE on 20 labels) and for the full CPF-CTE (class tokens,
  CF-BiLSTM, patch classifier, top-k, MCE) at 384, batch 16 and 64, eager and torch.compile
  (nn.LSTM breaks the graph: the compiled full model is compiled in part, and says so); the
  CPF-CTE head's cost is the ratio of the two at the same batch and mode; and the full model in
  ViT-PCM's regime (``regime_*``: only the last 5 ViT blocks train);
- pseudo-label inference at 960 (batch 8): patch probabilities, image-label masking, bilinear
  upsampling to a 500×375 image and the argmax, in img/s;
- DeepLabv2 train step (ResNet-101, OS 8, MSC, crop 321, batch 10, SGD) in img/s, with
  ``cudnn.benchmark`` on as its training runs;
- the stage-1 training loader (JPEG decode, resize to 384 and ViT-PCM's augmentation, the
  profile's workers, on VOC-sized JPEGs written for the purpose) in img/s: the plan takes the
  slower of the loader and the step;
- the dense CRF on 500×375 images over every CPU core (img/s, and seconds per image per core);
  a failed image is an error, never a figure;
- peak device memory of each.
Each figure is the median of timed steps after warm-up steps, with the device synchronised
around the timed region only. The JSON also records the provenance (device, torch, CUDA, date,
commit) and the keys the plan uses (``train_img_s``: CPF-CTE at the voc profile's batch 16,
eager, as its training runs; ``infer_img_s``; ``deeplab_img_s``; ``crf_s_per_image_core``;
``cores``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cpfcte  # noqa: E402,F401,I001  (first: pins the CPU numerics before torch loads)
import torch  # noqa: E402,I001
import torch.nn.functional as F  # noqa: E402,I001

PAPER = {"img": 384, "infer": 960, "crop": 321, "dl_batch": 10, "batches": (16, 64),
         "infer_batch": 8, "crf_images": 32, "image_hw": (375, 500), "loader_images": 64,
         "loader_batches": 24}
TINY = {"img": 32, "infer": 64, "crop": 33, "dl_batch": 2, "batches": (2,),
        "infer_batch": 2, "crf_images": 2, "image_hw": (40, 50), "loader_images": 4,
        "loader_batches": 2}
TINY_VIT = {"patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    return None


def timed(step, batch: int, device: torch.device, warmup: int, steps: int) -> dict:
    """img/s of ``step()`` (one batch), the median over ``steps`` timed calls."""
    _reset_peak(device)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"img_s": round(batch / statistics.median(times), 1), "batch": batch,
            "steps": steps, "peak_gb": _peak_gb(device)}


def stage1_config(tiny: bool):
    from cpfcte.machinery.config import load_config

    over = {"pretrained": False, "random_init_ok": True}
    if tiny:
        over.update(backbone_kwargs=TINY_VIT, img_size=TINY["img"], token_dim=8, lstm_hidden=8,
                    unfreeze_blocks=1)
    return load_config("voc", over)


def train_step_fn(model, cfg, kind: str, batch: int, device, amp: bool, compiled: bool):
    """One stage-1 training step on random images and labels; the full model's step applies
    the colour ops to the batch first when the profile does (``augment_on: device``)."""
    import numpy as np

    from cpfcte.data.transforms import apply_color_batch, color_params
    from cpfcte.method.mce_loss import mce_loss
    from cpfcte.method.topk_pooling import pool

    x = torch.rand(batch, 3, cfg.img_size, cfg.img_size, device=device)
    colour = kind != "bare" and cfg.augment_on == "device" and cfg.augment == "pcm"
    params = torch.from_numpy(np.stack([color_params(np.random.default_rng(i))
                                        for i in range(batch)])).to(device)
    y = (torch.rand(batch, 21, device=device) < 0.1).float()    # background + 20 classes
    y[:, 0] = 1
    if kind == "bare":
        y = y[:, 1:]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def forward(x):
        if kind == "bare":
            return model(x)
        return pool(model(x)["z"].float(), cfg.pooling, cfg.k)      # as cpfcte.stages.train does

    fwd = torch.compile(forward) if compiled else forward

    def step():
        inputs = apply_color_batch(x * 255.0, params) / 255.0 if colour else x
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = fwd(inputs)
        loss = (F.binary_cross_entropy_with_logits(out.float(), y) if kind == "bare"
                else mce_loss(out.float(), y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


# torch.compile cannot trace nn.LSTM (its cuDNN kernel): the CF-BiLSTM is a graph break, so the
# "compiled" full model is two compiled parts (ViT + class tokens; classifier + pooling) with the
# BiLSTMs eager between them. Said in the output beside every compiled figure.
COMPILE_NOTE = ("partly compiled: nn.LSTM breaks the graph, so the CF-BiLSTM runs eager between "
                "the compiled ViT and the compiled head")


def bench_stage1(cfg, device, amp: bool, sizes: dict, compile_ok: bool, warmup: int,
                 steps: int, kinds=("full", "regime")) -> dict:
    """img/s of a training step of the full CPF-CTE (every block trains: what the plan's
    figure means), of the full model in ViT-PCM's regime (``regime``: the last
    ``unfreeze_blocks`` blocks train) and of the bare ViT (``bare``: every block trains)."""
    import timm

    from cpfcte.stages.train import make_model, set_phase

    out = {}
    for kind in kinds:
        for compiled in ((False, True) if compile_ok else (False,)):
            for batch in sizes["batches"]:
                torch.manual_seed(0)
                if kind == "bare":
                    model = timm.create_model(cfg.backbone, pretrained=False, num_classes=20,
                                              img_size=cfg.img_size,
                                              **(cfg.backbone_kwargs or {}))
                else:
                    model = make_model(cfg)
                    if kind == "regime":
                        set_phase(model, cfg, "main")
                model = model.to(device).train()
                key = f"{kind}_b{batch}_{'compiled' if compiled else 'eager'}"
                out[key] = timed(train_step_fn(model, cfg, kind, batch, device, amp, compiled),
                                 batch, device, warmup, steps)
                if compiled and kind != "bare":
                    out[key]["note"] = COMPILE_NOTE
                print(f"stage 1 {key}: {out[key]}", flush=True)
                del model
    return out


def head_costs(stage1: dict) -> None:
    """The CPF-CTE head's cost, full over bare at the same batch and mode, where both ran."""
    for key in list(stage1):
        if key.startswith("full_"):
            bare = stage1.get(key.replace("full_", "bare_"))
            if bare:
                stage1[key]["head_cost"] = round(bare["img_s"] / stage1[key]["img_s"] - 1, 3)


def bench_inference(cfg, device, sizes: dict, warmup: int, steps: int) -> dict:
    from cpfcte.data.transforms import aligned
    from cpfcte.method.bpm import bpm_grid, patch_probs
    from cpfcte.stages.train import make_model

    torch.manual_seed(0)
    model = make_model(cfg).to(device).eval()
    b, s = sizes["infer_batch"], sizes["infer"]
    x = torch.rand(b, 3, s, s, device=device)
    labels = torch.zeros(b, 21, device=device)
    labels[:, :3] = 1

    @torch.no_grad()
    def step():                    # as the pseudo-label stage: Z, the BPM's maps, up, argmax
        maps = bpm_grid(patch_probs(model, x, cfg.amp), labels, cfg.bpm_norm)
        up = F.interpolate(maps, size=sizes["image_hw"], mode="bilinear",
                           align_corners=aligned(cfg))
        up.argmax(1)
    r = timed(step, b, device, warmup, steps)
    print(f"inference @{s}: {r}", flush=True)
    return r


def bench_deeplab(device, amp: bool, sizes: dict, tiny: bool, warmup: int, steps: int,
                  channels_last: bool = False) -> dict:
    """One DeepLabv2 training step (MSC, SGD), as ``cpfcte.stages.deeplab_train`` runs it;
    ``channels_last``: the model and batch in NHWC, a layout training does not use yet (measured
    last, when the bench has time left)."""
    from cpfcte.machinery.config import load_config
    from cpfcte.method.deeplabv2 import build_deeplab, msc_logits, msc_loss, param_groups

    over = {"deeplab.pretrained": False, "random_init_ok": True}
    if tiny:
        over.update({"deeplab.backbone": "resnet10t",
                     "deeplab.backbone_kwargs": {"channels": [8, 8, 16, 16]}})
    cfg = load_config("voc", over)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = device.type == "cuda"     # as DeepLabv2's training runs
    model = build_deeplab(cfg, 21).to(device).train()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    opt = torch.optim.SGD(param_groups(model, 2.5e-4, 5e-4), lr=2.5e-4, momentum=0.9)
    b, c = sizes["dl_batch"], sizes["crop"]
    x = torch.randint(0, 255, (b, 3, c, c), device=device,
                      dtype=torch.uint8).contiguous(memory_format=layout)
    y = torch.randint(0, 21, (b, c, c), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            outs = msc_logits(model, x)
        loss = msc_loss(outs, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    r = timed(step, b, device, warmup, steps)
    r["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    r["channels_last"] = channels_last
    print(f"DeepLabv2 train step{' (channels last)' if channels_last else ''}: {r}", flush=True)
    return r


class _Jpegs:
    """What ``ClassificationData`` reads of a split (``image``, ``label_matrix``, its length),
    over ``n`` VOC-sized JPEGs written to a folder, each read ``repeat`` times."""

    def __init__(self, folder: Path, n: int, hw: tuple[int, int], repeat: int):
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(0)
        h, w = hw
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        self.paths = []
        for i in range(n):                   # smooth scenes with some texture, as photos
            base = np.stack([np.sin(6 * xx + i), np.cos(5 * yy - i), np.sin(4 * (xx + yy))], -1)
            pixels = 127 + 80 * base + rng.normal(0, 12, (h, w, 3))
            path = folder / f"{i:04d}.jpg"
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
            self.paths.append(path)
        self.n, self.repeat = n, repeat

    def __len__(self) -> int:
        return self.n * self.repeat

    def image(self, index: int):
        from cpfcte.machinery.io import read_image

        return read_image(self.paths[index % self.n])

    def label_matrix(self):
        import numpy as np

        return np.ones((len(self), 21), dtype=np.float32)


def bench_loader(cfg, sizes: dict, batches: int) -> dict:
    """img/s of stage 1's training loader as the run builds it (``ClassificationData``: decode,
    resize, augment; the profile's workers, batch and ``augment_on``), uncached as on VOC, after
    its first batch (the workers' start); then the same with the colour ops in the loader
    (``loader_colour``), the figure ``augment_on: loader`` would plan with."""
    r = _loader_img_s(cfg, sizes, batches, cfg.augment_on)
    if cfg.augment_on != "loader":
        r["loader_colour"] = _loader_img_s(cfg, sizes, batches, "loader")
    print(f"stage-1 loader: {r}", flush=True)
    return r


def _loader_img_s(cfg, sizes: dict, batches: int, augment_on: str) -> dict:
    from torch.utils.data import DataLoader

    from cpfcte.stages.train import ClassificationData

    batch = cfg.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        split = _Jpegs(Path(tmp), sizes["loader_images"], sizes["image_hw"],
                       repeat=max(1, -(-(batches + 1) * batch // sizes["loader_images"])))
        data = ClassificationData(split, cfg.img_size, cfg.augment, 0, cfg.resize, augment_on)
        data.cache = None                          # VOC's 10,582 images are never cached
        loader = DataLoader(data, batch_size=batch, num_workers=cfg.workers, shuffle=False)
        it = iter(loader)
        next(it)                                   # the workers start
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        seconds = time.perf_counter() - t0
        del it, loader
    return {"img_s": round(batches * batch / seconds, 1), "workers": cfg.workers,
            "batch": batch, "batches": batches, "augment_on": augment_on,
            "ms_per_image_per_worker":
                round(1000 * seconds * max(cfg.workers, 1) / (batches * batch), 2)}


def bench_crf(sizes: dict) -> dict:
    """Dense CRF over every core (the pseudo labels' pool), on VOC-sized inputs."""
    import numpy as np

    from cpfcte.machinery.config import CRFConfig
    from cpfcte.stages.crf_pool import CRFJob, crf_stage

    cores = os.cpu_count() or 1
    rng = np.random.default_rng(0)
    h, w = sizes["image_hw"]
    jobs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(sizes["crf_images"]):
            image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            probs = rng.random((3, h, w)).astype(np.float32)
            probs /= probs.sum(0, keepdims=True)
            jobs.append(CRFJob(str(Path(tmp) / f"{i}.png"), image, probs, np.array([0, 5, 9])))
        t0 = time.perf_counter()
        run = crf_stage(jobs, CRFConfig(workers=cores), progress=False)
        seconds = time.perf_counter() - t0
    if run["failed"]:              # a failure is not a speed (pydensecrf missing fails fast)
        name, error = next(iter(run["failed"].items()))
        raise SystemExit(f"gpu_bench: the dense CRF failed on {len(run['failed'])} of "
                         f"{len(jobs)} images (e.g. {name}: {error}); install pydensecrf2 "
                         "(benchmarks/build_wheels.sh for the device's Python); no figure "
                         "written")
    img_s = len(jobs) / seconds
    r = {"img_s": round(img_s, 2), "cores": cores, "images": len(jobs),
         "s_per_image_core": round(cores / img_s, 3), "classes_per_image": 3}
    print(f"dense CRF: {r}", flush=True)
    return r


def provenance(device: torch.device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        commit = "unknown"
    return {"device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                       else f"CPU ({os.cpu_count()} cores)"),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": commit or "unknown",
            "precision": "bf16 autocast" if device.type == "cuda" else "float32",
            "weights": "random init"}


def plan_keys(result: dict, sizes: dict) -> dict:
    """The figures the plan reads (``cpfcte.batch.plan``), from the sections that ran."""
    keys = {}
    full = result.get("stage1", {}).get(f"full_b{sizes['batches'][0]}_eager")
    if full:
        keys["train_img_s"] = full["img_s"]
    for key, section in (("infer_img_s", "inference"), ("deeplab_img_s", "deeplab"),
                         ("loader_img_s", "loader")):
        if "img_s" in result.get(section, {}):
            keys[key] = result[section]["img_s"]
    if "s_per_image_core" in result.get("crf", {}):
        keys.update(crf_s_per_image_core=result["crf"]["s_per_image_core"],
                    cores=result["crf"]["cores"])
    return keys


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (the CPU test)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "throughput.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_bench: --device cuda but torch sees no CUDA device; on a CPU use "
                         "--tiny --device cpu (a test of the script, not a benchmark)")
    sizes = TINY if args.tiny else PAPER
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    steps = args.steps if args.steps is not None else (2 if args.tiny else 20)
    amp = device.type == "cuda"
    compile_ok = not args.no_compile
    cfg = stage1_config(args.tiny)
    if args.tiny:
        cfg.infer_size = sizes["infer"]
        cfg.workers = 0
    from cpfcte.machinery.io import write_text  # atomic: a killed bench leaves no half file

    def _save(path: Path, result: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(result, indent=2) + "\n")

    out = Path(args.out)
    partial = out.with_name(out.stem + ".partial.json")
    result = {"provenance": provenance(device), "sizes": {k: list(v) if isinstance(v, tuple)
                                                          else v for k, v in sizes.items()},
              "stage1": {}, "errors": {}}
    sections = (   # by their value to the plan: a late failure keeps the figures before it
        ("stage1", lambda: result["stage1"].update(
            bench_stage1(cfg, device, amp, sizes, compile_ok, warmup, steps))),
        ("inference", lambda: result.update(
            inference=bench_inference(cfg, device, sizes, warmup, steps))),
        ("deeplab", lambda: result.update(
            deeplab=bench_deeplab(device, amp, sizes, args.tiny, warmup, steps))),
        ("loader", lambda: result.update(loader=bench_loader(cfg, sizes,
                                                             sizes["loader_batches"]))),
        ("bare_vit", lambda: result["stage1"].update(
            bench_stage1(cfg, device, amp, sizes, compile_ok, warmup, steps, kinds=("bare",)))),
        ("crf", lambda: result.update(crf=bench_crf(sizes))),
        ("deeplab_channels_last", lambda: result.update(deeplab_channels_last=bench_deeplab(
            device, amp, sizes, args.tiny, warmup, steps, channels_last=True))),
    )
    for name, run in sections:
        t0 = time.perf_counter()
        try:
            run()
        except (Exception, SystemExit) as e:  # noqa: BLE001 (recorded; the next section runs)
            result["errors"][name] = f"{type(e).__name__}: {e}"[:2000]
            print(f"gpu_bench: section {name} failed: {result['errors'][name]}", flush=True)
        head_costs(result["stage1"])
        result.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
        result.update(plan_keys(result, sizes))
        _save(partial, {**result, "partial": True,
                        "source": f"gpu_bench.py on {result['provenance']['device']} "
                                  f"(partial: up to section {name})"})
    result["source"] = f"gpu_bench.py on {result['provenance']['device']}"
    if result["errors"]:
        print(f"gpu_bench: {len(result['errors'])} section(s) failed "
              f"({', '.join(result['errors'])}); the figures that were measured are in "
              f"{partial}", flush=True)
        raise SystemExit(1)
    _save(out, result)
    partial.unlink(missing_ok=True)
    print(f"written: {out}")
    return result


if __name__ == "__main__":
    main()
