"""The CPF-CTE model (Sec. 3): ViT → class tokens → CF-BiLSTM → patch classifier.

Shapes (B images, s = h·w patches, e = ViT width, H = class-token width, d = LSTM hidden,
C = classes with background):

    image (B, 3, S, S) ──ViT──► P (B, s, e)                 patch tokens, raster order, prefix dropped
            ──ClassTokens──► F_in (B, s, e+H)               Eq. 2 (or (B, s, e) with class_tokens=none)
            ──CFBiLSTM────► F_out (B, s, e+H)               Eq. 3–6
            ──PatchClassifier──► Z (B, s, C)                Eq. 7, softmax over classes
    Z ──cpfcte.pooling──► p (B, C)                          Eq. 8
    p ──cpfcte.losses.mce_loss──► L                         Eq. 9
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from cpfcte.errors import CpfcteError


class ClassTokens(nn.Module):
    """Learnable class tokens T = {t_1..t_C} ∈ R^{C×H} (Sec. 3.2), concatenated to each patch
    after the ViT (Eq. 2): f_i = Concat(p_i, t(i)).

    The paper pairs each patch with "its corresponding class token" but never says which one
    (note 1). ``soft`` (default): t(i) = Σ_c softmax_c(q(p_i)·t_c / √H) t_c, a
    differentiable, patch-dependent choice. ``mean``: every patch gets the mean token. ``none``
    is the ablation without class tokens (Table 4)."""

    def __init__(self, num_classes: int, embed_dim: int, token_dim: int, mode: str = "soft"):
        super().__init__()
        if mode not in ("soft", "mean"):
            raise CpfcteError(f"ClassTokens mode must be soft or mean, got {mode!r}")
        self.mode = mode
        self.token_dim = token_dim
        self.tokens = nn.Parameter(torch.randn(num_classes, token_dim) * 0.02)
        self.query = nn.Linear(embed_dim, token_dim) if mode == "soft" else None

    def assignment(self, p: torch.Tensor) -> torch.Tensor:
        """(B, s, C) soft assignment of patches to class tokens (``soft`` mode)."""
        assert self.query is not None
        scores = self.query(p) @ self.tokens.t() / math.sqrt(self.token_dim)
        return scores.softmax(dim=-1)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        b, s, _ = p.shape
        if self.mode == "soft":
            t = self.assignment(p) @ self.tokens                       # (B, s, H)
        else:
            t = self.tokens.mean(dim=0).expand(b, s, self.token_dim)   # (B, s, H)
        return torch.cat([p, t.to(p.dtype)], dim=-1)                   # (B, s, e+H)


class SequenceDropout(nn.Module):
    """Dropout on an LSTM's inputs with one mask per sequence, the same at every step: what a
    Keras ``LSTM(dropout=p)`` does to its inputs (ViT-PCM's HV-BiLSTM; note 21). Input
    (N, L, F); identity in eval mode or with p = 0."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty((x.shape[0], 1, x.shape[2]), device=x.device, dtype=x.dtype)
        return x * keep.bernoulli_(1.0 - self.p).div_(1.0 - self.p)


class BiLSTM(nn.Module):
    """A bidirectional LSTM (Eq. 3-5) as two one-directional ones, so that each direction gets
    its own input-dropout mask, as each copy of a Keras ``Bidirectional(LSTM(dropout=p))``
    does. (N, L, F) → (N, L, 2d): [→h_i; ←h_i] at every position i."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.forward_lstm = nn.LSTM(dim, hidden, batch_first=True)   # →LSTM, Eq. 3
        self.backward_lstm = nn.LSTM(dim, hidden, batch_first=True)  # ←LSTM, Eq. 4
        self.drop_forward = SequenceDropout(dropout)
        self.drop_backward = SequenceDropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in float32 outside autocast (note 13): under CUDA autocast cuDNN's LSTM would run in
        # float16 whatever the autocast dtype (ATen's AutocastRNN), without loss scaling
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            ahead, _ = self.forward_lstm(self.drop_forward(x))
            back, _ = self.backward_lstm(self.drop_backward(x).flip(1))
            return torch.cat([ahead, back.flip(1)], dim=-1)          # Eq. 5


class CFBiLSTM(nn.Module):
    """Contextual-Fusion BiLSTM (Sec. 3.3, Fig. 2; Eq. 3–6).

    ``hv`` (default, Fig. 2): BiLSTM_H runs along each row of the h×w patch grid and BiLSTM_V
    along each column; their forward and backward states are concatenated and W_c maps them back
    to the input width (Eq. 6). ``raster``: one BiLSTM over the row-major sequence of s patches,
    as the text of Sec. 3.3 reads (note 3). ``dropout`` acts on the BiLSTMs' inputs, one mask
    per sequence and direction (ViT-PCM's ``LSTM(dropout=0.2)``; note 21)."""

    def __init__(self, dim: int, hidden: int, mode: str = "hv", dropout: float = 0.0):
        super().__init__()
        if mode not in ("hv", "raster"):
            raise CpfcteError(f"CFBiLSTM mode must be hv or raster, got {mode!r}")
        self.mode = mode
        if mode == "hv":
            self.lstm_h = BiLSTM(dim, hidden, dropout)
            self.lstm_v = BiLSTM(dim, hidden, dropout)
            self.proj = nn.Linear(4 * hidden, dim)                     # W_c, b_c
        else:
            self.lstm = BiLSTM(dim, hidden, dropout)
            self.proj = nn.Linear(2 * hidden, dim)

    def forward(self, f: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, s, dim = f.shape
        h, w = grid
        if h * w != s:
            raise CpfcteError(f"CF-BiLSTM: grid {h}×{w} does not hold {s} patches")
        if self.mode == "raster":
            return self.proj(self.lstm(f))                             # (B, s, 2d) → (B, s, dim)
        x = f.reshape(b, h, w, dim)
        rows = self.lstm_h(x.reshape(b * h, w, dim))                   # (B·h, w, 2d)
        cols = self.lstm_v(x.transpose(1, 2).reshape(b * w, h, dim))   # (B·w, h, 2d)
        rows = rows.reshape(b, h, w, -1)
        cols = cols.reshape(b, w, h, -1).transpose(1, 2)
        fused = torch.cat([rows, cols], dim=-1).reshape(b, s, -1)     # (B, s, 4d)
        return self.proj(fused)                                        # (B, s, dim)


class PatchClassifier(nn.Module):
    """One linear layer W ∈ R^{(e+H)×C}, without bias as in Eq. 7 (Z = softmax(F W)), and a
    softmax over classes. W starts from N(0, ``init_std``²): 0.05, as ViT-PCM's patch
    classifier (``RandomNormal(stddev=0.05)`` in its ``model.py``), which also carries an L2
    penalty of 0.01 on W (``l2_penalty``, added to the loss by ``cpfcte.train``; note 4)."""

    def __init__(self, dim: int, num_classes: int, init_std: float = 0.05):
        super().__init__()
        self.fc = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.fc.weight, std=init_std)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(f)  # logits; Z = softmax(logits, -1)

    def l2_penalty(self) -> torch.Tensor:
        """ΣW², in float32 (Keras's ``L2(λ)`` regulariser is λ·ΣW²)."""
        return self.fc.weight.float().pow(2).sum()


class CPFCTE(nn.Module):
    """The whole stage-1 network. ``forward`` takes images (uint8 or float in [0, 1], any size
    divisible by the patch size) and returns logits and Z = softmax(logits), both (B, s, C), and
    the patch grid (h, w)."""

    def __init__(self, backbone: nn.Module, num_classes: int, *, class_tokens: str = "soft",
                 token_dim: int = 256, project_tokens: bool = False, cf_bilstm: str = "hv",
                 lstm_hidden: int = 192, dropout: float = 0.0, lstm_dropout: float = 0.0,
                 classifier_init_std: float = 0.05, mean=(0.5, 0.5, 0.5),
                 std=(0.5, 0.5, 0.5)):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        embed_dim = int(backbone.embed_dim)
        self.patch_size = _patch_size(backbone)
        self.class_tokens = (ClassTokens(num_classes, embed_dim, token_dim, class_tokens)
                             if class_tokens != "none" else None)
        dim = embed_dim + (token_dim if self.class_tokens is not None else 0)
        self.token_proj = nn.Linear(dim, embed_dim) if project_tokens and self.class_tokens else None
        if self.token_proj is not None:
            dim = embed_dim
        self.cf_bilstm = (CFBiLSTM(dim, lstm_hidden, cf_bilstm, lstm_dropout)
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

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | tuple[int, int]]:
        p, grid = self.patch_tokens(x)
        f = self.class_tokens(p) if self.class_tokens is not None else p
        if self.token_proj is not None:
            f = self.token_proj(f)
        if self.cf_bilstm is not None:
            f = self.cf_bilstm(self.drop_context(f), grid)
        logits = self.classifier(self.drop_classifier(f))
        return {"logits": logits, "z": logits.float().softmax(dim=-1), "grid": grid}


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
                  project_tokens=cfg.project_tokens, cf_bilstm=cfg.cf_bilstm,
                  lstm_hidden=cfg.lstm_hidden, dropout=cfg.dropout,
                  lstm_dropout=cfg.lstm_dropout, classifier_init_std=cfg.classifier_init_std,
                  mean=tuple(pcfg.get("mean", (0.5,) * 3)),
                  std=tuple(pcfg.get("std", (0.5,) * 3)))
