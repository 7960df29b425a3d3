"""The CPF-CTE network (Sec. 3): ViT → class tokens → CF-BiLSTM → patch classifier, and the
backbone's construction (timm, local weights, never a silent random init).

Shapes (B images, s = h·w patches, e = ViT width, H = class-token width, d = LSTM hidden,
C = classes with background):

    image (B, 3, S, S) ──ViT──► P (B, s, e)                 patch tokens, raster order, prefix dropped
            ──ClassTokens──► F_in (B, s, e+H)               Eq. 2 (or (B, s, e) with class_tokens=none)
            ──CFBiLSTM────► F_out (B, s, e+H)               Eq. 3–6
            ──PatchClassifier──► Z (B, s, C)                Eq. 7, softmax over classes
    Z ──cpfcte.method.topk_pooling──► p (B, C)              Eq. 8
    p ──cpfcte.method.mce_loss──► L                         Eq. 9

The ViT runs under the caller's autocast (bf16 on CUDA); the head (class tokens, CF-BiLSTM with
W_c, classifier, softmax) always in float32 (note 13).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cpfcte.machinery.errors import CpfcteError
from cpfcte.machinery.precision import strict_float32
from cpfcte.method.cf_bilstm import CFBiLSTM
from cpfcte.method.class_tokens import ClassTokens
from cpfcte.method.patch_classifier import PatchClassifier


class CPFCTE(nn.Module):
    """The whole stage-1 network. ``forward`` takes images (uint8 or float in [0, 1], any size
    divisible by the patch size) and returns logits and Z = softmax(logits), both (B, s, C), and
    the patch grid (h, w)."""

    def __init__(self, backbone: nn.Module, num_classes: int, *, class_tokens: str = "soft",
                 token_dim: int = 256, token_init_std: float = 1.0,
                 project_tokens: bool = False, cf_bilstm: str = "hv",
                 lstm_hidden: int = 192, lstm_init: str = "keras", dropout: float = 0.0,
                 lstm_dropout: float = 0.0, classifier_init_std: float = 0.05,
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        embed_dim = int(backbone.embed_dim)
        self.patch_size = _patch_size(backbone)
        self.class_tokens = (ClassTokens(num_classes, embed_dim, token_dim, class_tokens,
                                         token_init_std)
                             if class_tokens != "none" else None)
        dim = embed_dim + (token_dim if self.class_tokens is not None else 0)
        self.token_proj = nn.Linear(dim, embed_dim) if project_tokens and self.class_tokens else None
        if self.token_proj is not None:
            dim = embed_dim
        self.cf_bilstm = (CFBiLSTM(dim, lstm_hidden, cf_bilstm, lstm_dropout, lstm_init)
                          if cf_bilstm != "none" else None)
        # ViT-PCM's dropouts: before its HV-BiLSTM and before its patch classifier (note 21)
        self.drop_context = nn.Dropout(dropout) if self.cf_bilstm is not None else None
        self.drop_classifier = nn.Dropout(dropout)
        self.classifier = PatchClassifier(dim, num_classes, classifier_init_std)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def patch_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """P (B, s, e) in raster order with the prefix (class/register) tokens dropped."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise CpfcteError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
        hh, ww = x.shape[-2:]
        ph, pw = self.patch_size
        if hh % ph or ww % pw:
            raise CpfcteError(f"image size {hh}×{ww} is not divisible by the patch size {ph}×{pw}")
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        x = (x - self.mean) / self.std
        tokens = self.backbone.forward_features(x)
        prefix = int(getattr(self.backbone, "num_prefix_tokens", 0))
        return tokens[:, prefix:], (hh // ph, ww // pw)

    def forward(self, x: torch.Tensor, *, intermediates: bool = False
                ) -> dict[str, torch.Tensor | tuple[int, int]]:
        """``{"logits", "z", "grid"}``; with ``intermediates`` also P (``"p"``), F_in
        (``"f_in"``, after the class tokens and the optional projection) and F_out
        (``"f_out"``, after the CF-BiLSTM; F_in again without it), each (B, s, ·)."""
        p, grid = self.patch_tokens(x)
        with strict_float32(p.device.type):               # the head in float32 (note 13)
            p = p.float()
            f_in = self.f_in(p)
            out = self.head(f_in, grid, intermediates)
        if intermediates:
            out["p"] = p
        return out

    def f_in(self, p: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """P (B, s, e) → F_in: each patch's class token concatenated (Eq. 2; ``tokens``
        (B, s, H) in place of the ones the class tokens give: the diagnostics' swap) and the
        optional projection back to e (note 2); P itself without class tokens."""
        if self.class_tokens is None:
            f = p
        elif tokens is None:
            f = self.class_tokens(p)
        else:
            f = torch.cat([p, tokens.to(p.dtype)], dim=-1)
        return self.token_proj(f) if self.token_proj is not None else f

    def head(self, f_in: torch.Tensor, grid: tuple[int, int], intermediates: bool = False
             ) -> dict[str, torch.Tensor | tuple[int, int]]:
        """F_in (B, s, ·) → the CF-BiLSTM (Eq. 3-6) → the classifier (Eq. 7):
        ``{"logits", "z", "grid"}`` (and ``"f_in"``, ``"f_out"`` with ``intermediates``). The
        class-token diagnostics (``cpfcte.method.diagnostics``) run it on an altered F_in."""
        f = f_in
        if self.cf_bilstm is not None:
            f = self.cf_bilstm(self.drop_context(f), grid)
        logits = self.classifier(self.drop_classifier(f))
        out = {"logits": logits, "z": logits.float().softmax(dim=-1), "grid": grid}
        if intermediates:
            out.update(f_in=f_in, f_out=f)
        return out


def _patch_size(backbone: nn.Module) -> tuple[int, int]:
    ps = getattr(getattr(backbone, "patch_embed", None), "patch_size", None)
    if ps is None:
        raise CpfcteError(f"backbone {type(backbone).__name__} has no patch_embed.patch_size: "
                          "use a timm Vision Transformer")
    return (ps, ps) if isinstance(ps, int) else (int(ps[0]), int(ps[1]))


def build_backbone(cfg) -> nn.Module:
    """A timm ViT with ``dynamic_img_size`` (so inference can run at 960 with interpolated
    position embeddings). Weights: timm's pretrained ones, a local file, or random init where
    the profile allows it; a failure to load is an error, never a silent random init."""
    import timm

    kwargs = dict(num_classes=0, dynamic_img_size=True, img_size=cfg.img_size)
    kwargs.update(cfg.backbone_kwargs or {})
    use_hub = bool(cfg.pretrained) and not cfg.weights
    if not timm.is_model(cfg.backbone):
        raise CpfcteError(f"unknown backbone {cfg.backbone!r}: use a timm ViT name "
                          "(timm.list_models('vit_*'))")
    try:
        backbone = timm.create_model(cfg.backbone, pretrained=use_hub, **kwargs)
    except Exception as e:  # hub unreachable, weights missing from the cache, bad kwargs, ...
        if not use_hub:
            raise CpfcteError(f"cannot build backbone {cfg.backbone!r}: {e}") from None
        raise CpfcteError(
            f"could not load the pretrained weights of {cfg.backbone!r} through timm ({e}). "
            "On a machine with internet, run once: python -c \"import timm; "
            f"timm.create_model('{cfg.backbone}', pretrained=True)\" to fill the Hugging Face "
            "cache (~/.cache/huggingface), or download the weights file and pass "
            "weights=/path/to/file (cpfcte train --weights PATH)") from None
    if cfg.weights:
        load_backbone_weights(backbone, Path(cfg.weights))
    if not (use_hub or cfg.weights) and not cfg.random_init_ok:
        raise CpfcteError(f"profile {cfg.profile!r} asks for a randomly initialised backbone; "
                          "set pretrained=true or weights=PATH")
    return backbone


def load_backbone_weights(backbone: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise CpfcteError(f"{path}: backbone weights not found; download the checkpoint of the "
                          "profile's backbone and point weights= at it")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CpfcteError(f"{path}: cannot read weights ({e})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    own = backbone.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    bad_shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)
                 and k != "pos_embed"]
    if missing or unexpected or bad_shape:
        raise CpfcteError(
            f"{path}: checkpoint does not fit backbone {type(backbone).__name__}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}), {len(bad_shape)} with other shapes (e.g. {bad_shape[:3]})."
            " Use the checkpoint of the profile's backbone")
    if "pos_embed" in state and state["pos_embed"].shape != own["pos_embed"].shape:
        from timm.layers import resample_abs_pos_embed

        prefix = 0 if getattr(backbone, "no_embed_class", False) else backbone.num_prefix_tokens
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], new_size=backbone.patch_embed.grid_size, num_prefix_tokens=prefix)
    backbone.load_state_dict(state, strict=True)


def build_model(cfg, num_classes: int) -> CPFCTE:
    backbone = build_backbone(cfg)
    pcfg = getattr(backbone, "pretrained_cfg", {}) or {}
    return CPFCTE(backbone, num_classes, class_tokens=cfg.class_tokens, token_dim=cfg.token_dim,
                  token_init_std=cfg.token_init_std, project_tokens=cfg.project_tokens,
                  cf_bilstm=cfg.cf_bilstm, lstm_hidden=cfg.lstm_hidden,
                  lstm_init=cfg.lstm_init, dropout=cfg.dropout,
                  lstm_dropout=cfg.lstm_dropout, classifier_init_std=cfg.classifier_init_std,
                  mean=tuple(pcfg.get("mean", (0.5,) * 3)),
                  std=tuple(pcfg.get("std", (0.5,) * 3)))
