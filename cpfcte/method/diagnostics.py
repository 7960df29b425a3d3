"""What the class tokens do (Sec. 3.2; note 23), measured rather than assumed.

A class-token module can train without ever doing anything: if its soft assignment stays
uniform, every patch gets the same mean token, and the tokens are a learned constant. Stage 1
therefore measures, after every epoch, on a fixed set of training images in eval mode:

    entropy       the assignment's entropy over the C tokens, divided by ln C (1: uniform),
                  mean over patches
    max_weight    the mean over patches of the largest assignment weight (uniform: 1/C)
    logit_std     the standard deviation of the assignment's logits q(p_i)·t_c/√H
    swap_changed  the share of the patches whose BPM label (the argmax of the BPM's grid maps,
                  note 7) changes when each patch's token t(i) is replaced by the mean token of
                  its image: what the tokens' patch-dependence changes in the pseudo masks
    swap_max_dz   the largest |ΔZ| of that swap
    token_rms, patch_rms   the rms of the two halves of F_in, Concat(p_i, t(i))
    label_map     the image-label mAP of the pooled scores on these images
    alive         max_weight ≥ 1.5/C and swap_changed ≥ 0.5 %

``mean`` class tokens give every patch the same token, so their swap changes nothing and they
are never alive; without class tokens only the patch rms and the mAP are measured.
"""

from __future__ import annotations

import math

import torch

from cpfcte.method.bpm import bpm_grid
from cpfcte.method.metrics import label_map
from cpfcte.method.topk_pooling import pool

ALIVE_MAX_WEIGHT = 1.5      # × 1/C
ALIVE_SWAP = 0.005          # share of BPM labels


def _rms(x: torch.Tensor) -> float:
    return float(x.float().pow(2).mean().sqrt())


def _grid_labels(z: torch.Tensor, grid: tuple[int, int], labels: torch.Tensor,
                 norm: str) -> torch.Tensor:
    """Patch-level BPM labels (B, h, w) from Z (B, s, C)."""
    b, _, c = z.shape
    maps = z.float().transpose(1, 2).reshape(b, c, *grid)
    return bpm_grid(maps, labels.float(), norm).argmax(dim=1)


@torch.no_grad()
def class_token_diagnostics(model, images: torch.Tensor, labels: torch.Tensor, *,
                            pooling: str = "topk", k: int = 4, norm: str = "pcm",
                            batch: int = 16) -> dict:
    """The measurements above on ``images`` (N, 3, S, S) with image labels ``labels`` (N, C),
    in batches of ``batch``; the model is put in eval mode and left in the mode it was in."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    n_patches, changed, max_dz, scores = 0, 0, 0.0, []
    tokens = model.class_tokens
    try:
        for lo in range(0, len(images), batch):
            x, y = images[lo:lo + batch], labels[lo:lo + batch]
            with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16,
                                enabled=x.device.type == "cuda"):
                p, grid = model.patch_tokens(x)
            p = p.float()
            s = p.shape[0] * p.shape[1]
            n_patches += s
            acc = {"patch_ms": p.pow(2).mean(-1).sum()}
            if tokens is None:
                out = model.head(model.f_in(p), grid)
            else:
                t = tokens.patch_tokens(p)                                   # (B, s, H)
                acc["token_ms"] = t.pow(2).mean(-1).sum()
                if tokens.mode == "soft":
                    a = tokens.assignment(p)
                    c = a.shape[-1]
                    ent = -(a * a.clamp_min(1e-30).log()).sum(-1) / math.log(c)
                    logits = tokens.logits(p)
                    acc.update(entropy=ent.sum(), max_weight=a.amax(-1).sum(),
                               logit_var=logits.var(dim=-1, unbiased=False).sum())
                out = model.head(model.f_in(p, t), grid)
                swapped = model.head(model.f_in(p, t.mean(dim=1, keepdim=True).expand_as(t)),
                                     grid)
                before = _grid_labels(out["z"], grid, y, norm)
                after = _grid_labels(swapped["z"], grid, y, norm)
                changed += int((before != after).sum())
                max_dz = max(max_dz, float((out["z"] - swapped["z"]).abs().max()))
            for key, value in acc.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            scores.append(pool(out["z"].float(), pooling, k).cpu())
    finally:
        model.train(was_training)
    result = {"images": len(images), "patch_rms": math.sqrt(sums["patch_ms"] / n_patches),
              "label_map": label_map(torch.cat(scores).numpy(), labels.float().cpu().numpy())}
    if tokens is None:
        return {"class_tokens": "none", **result}
    classes = labels.shape[1]
    result.update(class_tokens=tokens.mode, token_rms=math.sqrt(sums["token_ms"] / n_patches),
                  swap_changed=changed / n_patches, swap_max_dz=max_dz,
                  uniform_weight=1.0 / classes)
    if tokens.mode == "soft":
        result.update(entropy=sums["entropy"] / n_patches,
                      max_weight=sums["max_weight"] / n_patches,
                      logit_std=math.sqrt(sums["logit_var"] / n_patches))
    result["alive"] = bool(result.get("max_weight", 0.0) >= ALIVE_MAX_WEIGHT / classes
                           and result["swap_changed"] >= ALIVE_SWAP)
    return result


def describe(d: dict) -> str:
    """One line for a log."""
    if d.get("class_tokens") == "none":
        return (f"no class tokens; patch rms {d['patch_rms']:.3f}, label mAP "
                f"{d['label_map']:.3f}")
    soft = ""
    if "max_weight" in d:
        soft = (f"assignment entropy {d['entropy']:.4f} of uniform, mean largest weight "
                f"{d['max_weight']:.3f} (uniform {d['uniform_weight']:.3f}), logit std "
                f"{d['logit_std']:.3g}; ")
    return (f"class tokens ({d['class_tokens']}): {soft}mean-token swap changes "
            f"{100 * d['swap_changed']:.2f} % of BPM labels (max |ΔZ| {d['swap_max_dz']:.2g}); "
            f"token rms {d['token_rms']:.3f}, patch rms {d['patch_rms']:.3f}; label mAP "
            f"{d['label_map']:.3f}; {'ALIVE' if d['alive'] else 'not alive'}")
