"""Estimated run times for ``cpfcte paper --dry-run`` (a plan for a GPU machine).

Each pending run's time is estimated, by the stage its notebook drives (``Run.stage``, from the
notebook's metadata), from the work it does (images × epochs, iterations, images to infer and
to refine) divided by a throughput. The throughputs are those measured by the GPU benchmark
(``benchmarks/throughput.json`` when present); otherwise the reference figures measured on one
H200 for this project (torch 2.11, bf16, ViT-B/16 at 384): CPF-CTE training 777 img/s (batch
64, eager), inference at 960 286 img/s, DeepLabv2 ResNet-101 training at 321 231 img/s, dense
CRF 0.75 s per VOC image per core on 16 cores. They are estimates, labelled so.

The stage-1 throughput is measured with every ViT block training (the benchmark trains all).
ViT-PCM's regime (note 6) trains fewer: none in the warm-up, the last ``unfreeze_blocks`` after
it. A step is then costed as the forward pass through all L blocks plus the backward pass
through the b that train, backward counted as twice a forward: (1 + 2b/L)/3 of a full step
(b = 5 of 12: 0.61; the warm-up's b = 0: 0.33). Where the benchmark measured the training
loader too (``loader_img_s``: decode, resize and augment with the profile's workers), an epoch
takes the longer of the two: the GPU waits for a loader slower than its step.

The DeepLabv2 figure is a training step with multi-scale inputs (MSC: the benchmark's step runs
all three branches), so an iteration costs ``batch / deeplab_img_s``, MSC included.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cpfcte.machinery.config import Config
from cpfcte.machinery.paths import project_root

REFERENCE = {"source": "reference figures of an earlier H200 run", "train_img_s": 777.0,
             "infer_img_s": 286.0, "deeplab_img_s": 231.0, "crf_s_per_image_core": 0.75,
             "cores": 16}
KNOWN_SPLITS = {"voc": {"train_aug": 10582, "train": 1464, "val": 1449},
                "coco": {"train": 82081, "val": 40137}}


def throughputs() -> dict:
    """The measured figures (``benchmarks/throughput.json``, or the file ``CPFCTE_THROUGHPUT``
    names: the device check's own), else the reference ones."""
    path = Path(os.environ.get("CPFCTE_THROUGHPUT") or
                project_root() / "benchmarks" / "throughput.json")
    if path.is_file():
        return {**REFERENCE, **json.loads(path.read_text()), "source": str(path)}
    return dict(REFERENCE)


def split_size(cfg: Config, split: str) -> int:
    from cpfcte.data import dataset_root
    from cpfcte.data.voc import read_split
    from cpfcte.machinery.errors import CpfcteError

    try:
        return len(read_split(dataset_root(cfg), split))
    except CpfcteError:
        return KNOWN_SPLITS.get(cfg.dataset, {}).get(split, 0)


def _crf_seconds(cfg: Config, images: int, tp: dict) -> float:
    return images * tp["crf_s_per_image_core"] / tp["cores"]


def backbone_depth(cfg: Config) -> int:
    """The number of transformer blocks of the profile's ViT (built on the meta device: no
    weights, no memory)."""
    import timm
    import torch

    if "depth" in (cfg.backbone_kwargs or {}):
        return int(cfg.backbone_kwargs["depth"])
    with torch.device("meta"):
        model = timm.create_model(cfg.backbone, pretrained=False, num_classes=0)
    return len(model.blocks)


def trained_blocks(cfg: Config, warm: bool, depth: int) -> int:
    """How many ViT blocks train in an epoch (``cpfcte.stages.train.set_phase``)."""
    if warm and cfg.freeze_backbone_warmup:
        return 0
    return depth if cfg.unfreeze_blocks is None else min(depth, int(cfg.unfreeze_blocks))


def step_fraction(blocks: int, depth: int) -> float:
    """A stage-1 step's cost as a fraction of a step that trains every block."""
    return (1 + 2 * blocks / depth) / 3


def _train(cfg: Config, params: dict, tp: dict) -> float:
    n = split_size(cfg, cfg.train_split)
    depth = backbone_depth(cfg)
    loader = 1 / tp["loader_img_s"] if tp.get("loader_img_s") else 0.0   # seconds per image
    return sum(n * max(step_fraction(trained_blocks(cfg, e < cfg.warmup_epochs, depth), depth)
                       / tp["train_img_s"], loader)
               for e in range(cfg.epochs))


def _pseudo(cfg: Config, params: dict, tp: dict) -> float:
    n = split_size(cfg, params.get("split") or cfg.pseudo_split)
    refinements = 2 if params.get("both_norms") else 1         # Table 1: the BPM both ways
    return n / tp["infer_img_s"] + refinements * _crf_seconds(cfg, n, tp)


def _deeplab(cfg: Config, params: dict, tp: dict) -> float:
    dl = cfg.deeplab
    n = split_size(cfg, cfg.val_split)
    views = (1.75 if dl.test_views == "msc_max"           # scales 1 + 0.75² + 0.5² of the pixels
             else len(dl.test_scales) * (2 if dl.flip_test else 1))
    train = dl.iterations * dl.batch / tp["deeplab_img_s"]       # the figure includes MSC
    return train + n * views / (4 * tp["deeplab_img_s"]) + _crf_seconds(cfg, n, tp)


STAGE_ESTIMATES = {"train": _train, "pseudo": _pseudo, "deeplab": _deeplab}


def estimate_seconds(stage: str | None, profile: str, params: dict, tp: dict) -> float:
    """Seconds of GPU time for a run of ``stage`` (0 for the stages that only read or plot)."""
    from cpfcte.machinery.config import load_config

    estimate = STAGE_ESTIMATES.get(stage or "")
    return estimate(load_config(profile), params, tp) if estimate else 0.0


# the runs of the main result (Tables 1 and 2): stage 1, pseudo labels at 960 + CRF on train
# and train_aug, DeepLabv2 with its evaluation
MAIN_RESULT = ("train_full", "pseudo_full", "pseudo_trainaug", "deeplab_full")


def print_plan(profile: str, results: dict[str, dict]) -> float:
    tp = throughputs()
    total = 0.0
    print(f"\nplan for profile {profile} (throughputs: {tp['source']})")
    try:
        from cpfcte.machinery.config import load_config

        cfg = load_config(profile)
        depth = backbone_depth(cfg)
        warm, main = (trained_blocks(cfg, w, depth) for w in (True, False))
        print(f"stage 1: the backward pass runs through {warm} of {depth} ViT blocks in the "
              f"warm-up and {main} after it: {step_fraction(warm, depth):.2f} and "
              f"{step_fraction(main, depth):.2f} of a step that trains every block")
    except Exception:  # noqa: BLE001 (a profile without a ViT: no stage-1 line)
        pass
    print(f"{'run':<22}{'stage':<10}{'notebook':<26}{'profile':<10}{'estimate':>10}")
    for name, r in results.items():
        if not r.get("dry_run"):
            continue
        sec = estimate_seconds(r.get("stage"), r["profile"], r.get("params", {}), tp)
        total += sec
        print(f"{name:<22}{r.get('stage') or '—':<10}{r['notebook']:<26}{r['profile']:<10}"
              f"{sec / 3600:>9.2f}h")
    skipped = sum(1 for r in results.values() if r.get("action"))
    runs = sum(1 for r in results.values() if r.get("dry_run"))
    print(f"total: {total / 3600:.1f} GPU hours for {runs} runs ({skipped} unchanged runs "
          f"skipped; {os.cpu_count()} CPU cores here)")
    main = [results[n] for n in MAIN_RESULT if n in results]
    if len(main) == len(MAIN_RESULT):
        sec = sum(estimate_seconds(r.get("stage"), r["profile"], r.get("params", {}), tp)
                  for r in main)
        print(f"main result ({', '.join(MAIN_RESULT)}: stage 1, pseudo labels + CRF, "
              f"DeepLabv2 and its evaluation): {sec / 60:.0f} min of GPU time, all of it "
              "(run or not)")
    return total
