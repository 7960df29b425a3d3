"""A minute of micro-checks for the first GPU session (``benchmarks/device_check.sh``), each of
which decides something the CUDA paths were only read for:

1. the CF-BiLSTM's dtype under autocast: both LSTMs of each BiLSTM take and give float32
   (under CUDA autocast cuDNN's LSTM would otherwise run in float16; note 13);
2. one stage-1 step at the voc sizes (ViT-B/16 at 384, batch 16, random init) through
   ``cpfcte.stages.train.train_step`` under ``torch.cuda.set_sync_debug_mode("warn")``: the number of
   synchronising CUDA calls it makes (0 expected), its seconds and peak memory;
3. the value range each DeepLabv2 MSC branch sees (after the model's own normalisation): the
   three must match.

    python benchmarks/device_micro.py --out micro.json                 # on the GPU
    python benchmarks/device_micro.py --tiny --device cpu --out m.json # the CPU test

Writes one JSON with each check's figures and ``ok``; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cpfcte  # noqa: E402,F401,I001  (first: pins the CPU numerics before torch loads)
import torch  # noqa: E402,I001

TINY_VIT = {"patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2}


def voc_config(tiny: bool):
    from cpfcte.machinery.config import load_config

    over = {"pretrained": False, "random_init_ok": True}
    if tiny:
        over.update(backbone_kwargs=TINY_VIT, img_size=32, token_dim=8, lstm_hidden=8,
                    batch_size=2, unfreeze_blocks=1)
    return load_config("voc", over)


IEEE = ("ieee", "allow_tf32=False")          # cuDNN's RNN float32 precision without TF32


def check_bilstm_dtype(device: torch.device) -> dict:
    """Each LSTM of the CF-BiLSTM under autocast: float32 in and out, and, on CUDA, cuDNN's RNN
    precision while it runs: ``ieee``, not the ``tf32`` torch ≥ 2.9 defaults to (note 13)."""
    from cpfcte.machinery.precision import rnn_precision
    from cpfcte.method.cf_bilstm import CFBiLSTM

    lstm = CFBiLSTM(32, 16, "hv").to(device)
    seen, precision = [], []
    for sub in (lstm.lstm_h.forward_lstm, lstm.lstm_h.backward_lstm, lstm.lstm_v.forward_lstm,
                lstm.lstm_v.backward_lstm):
        sub.register_forward_hook(lambda m, i, o: seen.append([str(i[0].dtype),
                                                               str(o[0].dtype)]))
        sub.register_forward_pre_hook(lambda m, a: precision.append(rnn_precision()))
    x = torch.randn(2, 24, 16, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        f = torch.nn.Linear(16, 32).to(device)(x)        # bf16 under autocast
        out = lstm(f, (4, 6))
    ok = all(d == ["torch.float32", "torch.float32"] for d in seen)
    if device.type == "cuda":
        ok = ok and len(precision) == 4 and all(p in IEEE for p in precision)
    return {"input_under_autocast": str(f.dtype), "lstm_in_out": seen,
            "rnn_precision": precision if device.type == "cuda" else "n/a (no TF32 on a CPU)",
            "rnn_precision_outside": rnn_precision(), "output": str(out.dtype), "ok": ok}


def check_stage1_step(device: torch.device, tiny: bool) -> dict:
    from cpfcte.machinery.finite import FiniteGuard
    from cpfcte.stages.train import make_model, set_phase, train_step

    cfg = voc_config(tiny)
    model = make_model(cfg).to(device).train()
    set_phase(model, cfg, "main")                       # ViT-PCM's regime: the last 5 blocks
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    n, s = cfg.batch_size, cfg.img_size
    x = torch.randint(0, 255, (n, 3, s, s), dtype=torch.uint8, device=device)
    y = (torch.rand(n, 21, device=device) < 0.1).float()
    y[:, 0] = 1
    guard = FiniteGuard(device, "micro", "step")
    sums = torch.zeros(4, device=device)
    amp = device.type == "cuda"
    train_step(model, model, cfg, optimizer, guard, x, y, 0, sums, amp)   # warm-up step
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.set_sync_debug_mode("warn")
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_step(model, model, cfg, optimizer, guard, x, y, 1, sums, amp)
    if cuda:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    syncs = [str(w.message)[:160] for w in caught if "synchroniz" in str(w.message)]
    return {"batch": n, "img_size": s, "seconds": round(seconds, 4),
            "peak_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda
            else None, "synchronising_calls": len(syncs), "examples": syncs[:5],
            "sync_debug_mode": cuda, "loss_finite": bool(torch.isfinite(sums[0])),
            "ok": not syncs and bool(torch.isfinite(sums[0]))}


def check_msc_ranges(device: torch.device, tiny: bool) -> dict:
    from cpfcte.machinery.config import load_config
    from cpfcte.method.deeplabv2 import build_deeplab, msc_logits

    over = {"deeplab.pretrained": False, "random_init_ok": True}
    if tiny:
        over.update({"deeplab.backbone": "resnet10t",
                     "deeplab.backbone_kwargs": {"channels": [8, 8, 16, 16]}})
    model = build_deeplab(load_config("voc", over), 21).to(device).eval()
    seen = []
    model.backbone.register_forward_pre_hook(
        lambda m, a: seen.append([round(float(a[0].amin()), 4), round(float(a[0].amax()), 4)]))
    c = 65 if tiny else 321
    x = torch.zeros(2, 3, c, c, dtype=torch.uint8, device=device)
    x[:, :, : c // 2] = 255
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                         enabled=device.type == "cuda"):
        msc_logits(model, x)
    ok = len(seen) == 3 and all(abs(a - b) < 1e-3 for r in seen[1:] for a, b in zip(r, seen[0]))
    return {"branches": ["scale 1", "scale 0.75", "scale 0.5"], "min_max": seen, "ok": ok}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (the CPU test)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("device_micro: --device cuda but torch sees no CUDA device")
    torch.manual_seed(0)
    result = {}
    for name, check in (("bilstm_dtype", lambda: check_bilstm_dtype(device)),
                        ("stage1_step", lambda: check_stage1_step(device, args.tiny)),
                        ("msc_ranges", lambda: check_msc_ranges(device, args.tiny))):
        try:
            result[name] = check()
        except Exception as e:  # noqa: BLE001 (a failed check is reported, the others run)
            result[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        print(f"{name}: {json.dumps(result[name])}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(r.get("ok") for r in result.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
