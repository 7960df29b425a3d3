"""Run configuration: one flat dataclass, filled from a profile file and then from overrides.

A profile (``cpfcte/profiles/<name>.yaml``) is one small declarative file; notebook parameters
and ``--set key=value`` on the command line override any field. The dataclass defaults are the
paper's VOC settings (Sec. 4.2); the toy profile shrinks them for a laptop CPU. Unknown field
names and invalid values are refused with the list of valid choices.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cpfcte.crf import CRFParams
from cpfcte.errors import CpfcteError

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"

CLASS_TOKEN_MODES = ("none", "soft", "mean")
CF_BILSTM_MODES = ("none", "hv", "raster")
POOLING_MODES = ("gap", "gmp", "topk")
DATASETS = ("toy", "toy_coco", "voc", "coco")


@dataclass
class Config:
    # --- profile and data ---------------------------------------------------------------
    profile: str = "voc"
    dataset: str = "voc"               # toy | toy_coco | voc | coco
    data_root: str = "VOCdevkit/VOC2012"  # relative to the data folder (CPFCTE_DATA) or absolute
    train_split: str = "train_aug"     # stage 1 trains on these images' image-level labels
    pseudo_split: str = "train"        # pseudo labels are made and scored on VOC train (1,464)
    val_split: str = "val"
    # --- model (Sec. 3, DESIGN notes 1-5) -------------------------------------------------
    backbone: str = "vit_base_patch16_384.augreg_in21k_ft_in1k"  # any timm ViT
    backbone_kwargs: dict = field(default_factory=dict)  # constructor overrides (tiny toy ViT)
    pretrained: bool = True            # load the backbone's weights through timm
    weights: str | None = None         # or from this local checkpoint file (offline clusters)
    random_init_ok: bool = False       # only the toy profile may train a randomly initialised ViT
    class_tokens: str = "soft"         # none | soft | mean (note 1)
    token_dim: int = 256               # H, the class-token width (the paper does not give it)
    project_tokens: bool = False       # project Concat(p, t) back to e (note 2); Eq. 6/7 keep e+H
    cf_bilstm: str = "hv"              # none | hv | raster (note 3)
    lstm_hidden: int = 192             # d, hidden size per direction (note 3)
    pooling: str = "topk"              # gap | gmp | topk (Eq. 8, Table 5)
    k: int = 4                         # top-k (Fig. 4)
    # --- training (Sec. 4.2, note 6) ------------------------------------------------------
    img_size: int = 384
    batch_size: int = 16
    epochs: int = 50
    warmup_epochs: int = 2             # epochs at lr_warmup, then lr
    lr_warmup: float = 1e-3
    lr: float = 1e-4
    freeze_backbone_warmup: bool = True  # freeze the ViT while the 1e-3 phase runs (note 6)
    weight_decay: float = 0.0
    hflip: bool = True
    amp: bool = True                   # bf16 autocast on CUDA (ignored on CPU)
    workers: int = 4                   # DataLoader workers
    seed: int = 0
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    # --- pseudo labels (Sec. 3.4, note 7) -------------------------------------------------
    infer_size: int = 960              # images are resized to infer_size × infer_size
    infer_batch: int = 8
    # --- dense CRF (Sec. 3.4, note 8; cpfcte.crf.CRFParams documents the defaults) ------------
    crf_gaussian_sxy: float = CRFParams.gaussian_sxy
    crf_gaussian_compat: float = CRFParams.gaussian_compat
    crf_bilateral_sxy: float = CRFParams.bilateral_sxy
    crf_bilateral_srgb: float = CRFParams.bilateral_srgb
    crf_bilateral_compat: float = CRFParams.bilateral_compat
    crf_iterations: int = CRFParams.iterations
    crf_workers: int = 0               # processes for the CRF stage; 0 = every core
    # --- DeepLabv2 on the pseudo labels (Sec. 4.2, note 9; cpfcte.deeplab) -------------------
    deeplab_backbone: str = "resnet101.tv_in1k"  # timm ResNet, output stride 8
    deeplab_backbone_kwargs: dict = field(default_factory=dict)  # e.g. narrower toy channels
    deeplab_pretrained: bool = True    # ImageNet weights through timm
    deeplab_init: str | None = None    # or a local init file (e.g. COCO-pretrained DeepLabv2)
    deeplab_rates: list = field(default_factory=lambda: [6, 12, 18, 24])
    deeplab_msc: bool = True           # multi-scale input training (scales 1, 0.75, 0.5 + max)
    deeplab_freeze_bn: bool = True     # keep the backbone's (ImageNet) BatchNorm statistics
    deeplab_crop: int = 321
    deeplab_batch: int = 10
    deeplab_iterations: int = 20000
    deeplab_lr: float = 2.5e-4         # backbone; ASPP weights ×10, biases ×20
    deeplab_momentum: float = 0.9
    deeplab_weight_decay: float = 5e-4
    deeplab_poly_power: float = 0.9
    deeplab_scale_min: float = 0.5
    deeplab_scale_max: float = 1.5
    deeplab_test_scales: list = field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5])
    deeplab_flip_test: bool = True
    deeplab_crf: bool = True           # dense CRF on the test predictions (CRF fields above)
    deeplab_ckpt_every: int = 1000     # iterations between atomic checkpoints
    deeplab_workers: int = 4           # DataLoader workers

    # ------------------------------------------------------------------------------------
    def validate(self) -> "Config":
        def choice(name: str, options: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value not in options:
                raise CpfcteError(f"parameter {name}={value!r} is not one of {list(options)}")

        choice("dataset", DATASETS)
        choice("class_tokens", CLASS_TOKEN_MODES)
        choice("cf_bilstm", CF_BILSTM_MODES)
        choice("pooling", POOLING_MODES)
        for name in ("token_dim", "lstm_hidden", "k", "img_size", "batch_size", "epochs",
                     "infer_size", "infer_batch", "crf_iterations", "deeplab_crop",
                     "deeplab_batch", "deeplab_iterations", "deeplab_ckpt_every"):
            if int(getattr(self, name)) < 1:
                raise CpfcteError(f"parameter {name}={getattr(self, name)!r} must be ≥ 1")
        if self.warmup_epochs < 0 or self.workers < 0 or self.crf_workers < 0:
            raise CpfcteError("parameters warmup_epochs, workers and crf_workers must be ≥ 0")
        for name in ("crf_gaussian_sxy", "crf_gaussian_compat", "crf_bilateral_sxy",
                     "crf_bilateral_srgb", "crf_bilateral_compat"):
            if float(getattr(self, name)) <= 0:
                raise CpfcteError(f"parameter {name}={getattr(self, name)!r} must be > 0")
        if self.lr <= 0 or self.lr_warmup <= 0:
            raise CpfcteError("learning rates lr and lr_warmup must be > 0")
        if not isinstance(self.backbone_kwargs, dict):
            raise CpfcteError("parameter backbone_kwargs must be a mapping")
        if not self.dataset.startswith("toy") and not (self.pretrained or self.weights):
            if not self.random_init_ok:
                raise CpfcteError(
                    f"profile {self.profile!r} would train a randomly initialised backbone: set "
                    "pretrained=true (timm downloads the weights) or weights=PATH to a local "
                    "checkpoint; random_init_ok=true exists for deliberate experiments only")
        return self

    def crf_params(self) -> CRFParams:
        return CRFParams(self.crf_gaussian_sxy, self.crf_gaussian_compat, self.crf_bilateral_sxy,
                         self.crf_bilateral_srgb, self.crf_bilateral_compat, self.crf_iterations)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """A short hash of the fields that shape training: two runs with equal digests trained
        the same model. Inference, CRF and machine settings (``NOT_TRAINING``) are left out, so
        they can change after training."""
        blob = json.dumps({k: v for k, v in self.to_dict().items() if k not in NOT_TRAINING},
                          sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(Config))
NOT_TRAINING = frozenset({"pseudo_split", "val_split", "workers", "device", "infer_size",
                          "infer_batch"} | {n for n in FIELD_NAMES
                                            if n.startswith(("crf_", "deeplab_"))})


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def check_keys(keys: Any, where: str) -> None:
    for key in keys:
        if key not in FIELD_NAMES:
            close = difflib.get_close_matches(str(key), FIELD_NAMES, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise CpfcteError(f"unknown parameter {key!r} in {where}{hint} "
                              f"(valid: {', '.join(FIELD_NAMES)})")


def profile_values(profile: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields a profile file sets; ``extends: NAME`` first takes those of profile NAME."""
    path = Path(profile)
    if not path.suffix:
        path = PROFILE_DIR / f"{profile}.yaml"
    if not path.is_file():
        raise CpfcteError(f"unknown profile {profile!r}: no file {path} "
                          f"(available: {', '.join(available_profiles())})")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise CpfcteError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(values, dict):
        raise CpfcteError(f"{path}: a profile must be a mapping of parameter: value")
    values = dict(values)
    base = values.pop("extends", None)
    check_keys(values, str(path))
    if base is None:
        return values
    if base in _seen:
        raise CpfcteError(f"{path}: profiles extend each other in a loop ({' → '.join(_seen)})")
    return {**profile_values(str(base), _seen + (str(profile),)), **values}


def load_config(profile: str = "toy", overrides: dict[str, Any] | None = None) -> Config:
    """The profile's settings with ``overrides`` applied on top, validated. ``None`` values in
    ``overrides`` mean "keep the profile's value" (so notebook parameters can default to None)."""
    values = profile_values(profile)
    for key, value in (overrides or {}).items():
        check_keys([key], "overrides")
        if value is not None:
            values[key] = value
    cfg = Config(**values)
    return _coerce(cfg).validate()


def config_from_dict(values: dict[str, Any], source: Path | str = "config") -> Config:
    """A Config from a saved config.json (fields added since it was written take defaults)."""
    check_keys(values, str(source))
    return _coerce(Config(**values))


def _coerce(cfg: Config) -> Config:
    """Cast fields to their declared types (YAML and papermill may give ints for floats)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        try:
            if kind == "int" and not isinstance(value, bool):
                value = int(value)
            elif kind == "float":
                value = float(value)
            elif kind == "bool" and not isinstance(value, bool):
                if str(value).lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                value = str(value).lower() in ("true", "1")
            elif kind == "str":
                value = str(value)
        except (TypeError, ValueError):
            raise CpfcteError(f"parameter {f.name}={value!r} must be of type {kind}") from None
        setattr(cfg, f.name, value)
    return cfg


def parse_set_args(pairs: list[str] | None) -> dict[str, Any]:
    """``["k=8", "pooling=gmp"]`` → ``{"k": 8, "pooling": "gmp"}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise CpfcteError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw)
    check_keys(out, "--set")
    return out
