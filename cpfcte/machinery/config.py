"""Run configuration: one ``Config``, filled from a profile file and then from overrides, that
reaches every stage unchanged.

Top-level fields describe the data, the CPF-CTE model, its training and the pseudo-label
inference; two nested sections hold the stages that follow: ``cfg.crf`` (the dense CRF, used by
the pseudo labels and, with ``deeplab.test_crf=pseudo``, by DeepLabv2's test-time CRF) and
``cfg.deeplab`` (DeepLabv2). A profile
(``cpfcte/profiles/<name>.yaml``) is one small declarative file with the same nesting; notebook
parameters and ``--set`` override any field, a section's field by its dotted name
(``--set deeplab.iterations=2 crf.bilateral_sxy=50``). The defaults are the paper's VOC settings
(Sec. 4.2); the toy profile shrinks them for a laptop CPU. Unknown names and invalid values are
refused with the list of valid ones.

A run's settings follow its outputs downstream: the pseudo-label stage starts from the config of
the training run it reads, DeepLabv2 from the config of the pseudo-label run it learns from
(``derive``); with ``deeplab.test_crf=pseudo`` a CRF setting given to a run also reaches
DeepLabv2's test-time CRF, which otherwise uses the reference recipe's parameters (note 15).
This module imports no stage.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cpfcte.machinery.errors import CpfcteError

PROFILE_DIR = Path(__file__).resolve().parents[1] / "profiles"

CLASS_TOKEN_MODES = ("none", "soft", "mean")
AUGMENT_MODES = ("pcm", "hflip", "none")
RESIZE_MODES = ("pcm", "pil")
AUGMENT_PLACES = ("loader", "device")
BPM_NORMS = ("pcm", "none")
CF_BILSTM_MODES = ("none", "hv", "raster")
LSTM_INITS = ("keras", "torch")
POOLING_MODES = ("gap", "gmp", "topk")
DATASETS = ("toy", "toy_coco", "voc", "coco", "folder")


def short_digest(values: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class CRFConfig:
    """The dense CRF (Sec. 3.4; note 8): the one home of its defaults. They are ViT-PCM's
    (deepplants/ViT-PCM ``configs/voc12.yaml``, ``CRF``: POS_XY_STD 1, POS_W 3, BI_XY_STD 67,
    BI_RGB_STD 3, BI_W 4, ITER_MAX 10), the code CPF-CTE builds on, and also
    kazuto1011/deeplab-pytorch's test-time CRF. ``PYDENSECRF_EXAMPLE`` is the set this project
    used before (pydensecrf's example, AffinityNet/IRN-style code: 3/3, 80/13/10).
    ``workers`` only says how many processes run it."""

    gaussian_sxy: float = 1.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 67.0
    bilateral_srgb: float = 3.0
    bilateral_compat: float = 4.0
    iterations: int = 10
    # the unary -log max(p, unary_clip): pydensecrf's unary_from_softmax (clip 1e-5), which
    # ViT-PCM's and kazuto1011's DenseCRF (crf.py) call
    unary_clip: float = 1e-5
    # over which classes: all (the references: every class, an absent one at probability 0,
    # so at the finite cost -log 1e-5 = 11.5) or image (only the image's classes: an absent one
    # can never appear; about twice as fast)
    classes: str = "all"
    # how the pseudo labels' patch grid is upsampled for the CRF: half_pixel (ViT-PCM's CRF
    # path: scikit-image's resize, order 1, in main.py test --crf) or corners (as the BPM)
    upsample: str = "half_pixel"
    workers: int = 0                   # processes for the CRF; 0 = every core

    PARAMETERS = ("gaussian_sxy", "gaussian_compat", "bilateral_sxy", "bilateral_srgb",
                  "bilateral_compat", "iterations", "unary_clip", "classes", "upsample")
    CLASSES = ("all", "image")
    UPSAMPLES = ("half_pixel", "corners")

    def parameters(self) -> dict[str, float]:
        """The CRF's parameters (what its result depends on; not ``workers``)."""
        return {name: getattr(self, name) for name in self.PARAMETERS}

    def describe(self) -> str:
        return (f"Gaussian (sxy {self.gaussian_sxy:g}, compat {self.gaussian_compat:g}), "
                f"bilateral (sxy {self.bilateral_sxy:g}, srgb {self.bilateral_srgb:g}, compat "
                f"{self.bilateral_compat:g}), {self.iterations} iterations; unary clipped at "
                f"{self.unary_clip:g}, over {self.classes} classes"
                + ("; the patch grid upsampled with "
                   f"{'half-pixel centres' if self.upsample == 'half_pixel' else 'aligned corners'}"))

    def validate(self) -> None:
        for name in self.PARAMETERS[:5]:                 # the kernels' widths and weights
            if float(getattr(self, name)) <= 0:
                raise CpfcteError(f"parameter crf.{name}={getattr(self, name)!r} must be > 0")
        if self.iterations < 1:
            raise CpfcteError(f"parameter crf.iterations={self.iterations!r} must be ≥ 1")
        if not 0 < float(self.unary_clip) < 1:
            raise CpfcteError(f"parameter crf.unary_clip={self.unary_clip!r} must be in (0, 1)")
        for name, options in (("classes", self.CLASSES), ("upsample", self.UPSAMPLES)):
            if getattr(self, name) not in options:
                raise CpfcteError(f"parameter crf.{name}={getattr(self, name)!r} is not one of "
                                  f"{list(options)}")
        if self.workers < 0:
            raise CpfcteError(f"parameter crf.workers={self.workers!r} must be ≥ 0")


@dataclass
class DeepLabConfig:
    """DeepLabv2 on the pseudo labels (Sec. 4.2; notes 9, 15, 16; ``cpfcte.method.deeplabv2``)."""

    backbone: str = "resnet101.tv_in1k"  # timm ResNet at output stride 8, or caffe_resnet101:
                                       # kazuto1011's, for his COCO-pretrained inits (note 16)
    backbone_kwargs: dict = field(default_factory=dict)  # e.g. narrower toy channels
    pretrained: bool = True            # ImageNet weights through timm
    init: str | None = None            # or a local init file (e.g. COCO-pretrained DeepLabv2)
    rates: list = field(default_factory=lambda: [6, 12, 18, 24])
    msc: bool = True                   # multi-scale input training (scales 1, 0.75, 0.5 + max)
    freeze_bn: bool = True             # keep the backbone's (ImageNet) BatchNorm statistics
    crop: int = 321
    batch: int = 10
    iterations: int = 20000
    lr: float = 2.5e-4                 # backbone; ASPP weights ×10, biases ×20
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    scale_min: float = 0.5
    scale_max: float = 1.5
    # the training scales drawn from (kazuto1011's SCALES); empty: uniform in [scale_min, max]
    scale_choices: list = field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5])
    loss_size: str = "logits"          # logits: labels resized to each MSC output (reference);
                                       # labels: outputs upsampled to the labels (note 16)
    test_views: str = "msc_max"        # msc_max: the MSC max over 1, 0.75, 0.5 (reference);
                                       # mean: softmax mean over test_scales × flip
    test_scales: list = field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5])
    flip_test: bool = True
    crf: bool = True                   # dense CRF on the test predictions (note 15)
    test_crf: str = "reference"        # its parameters: the reference recipe's (REFERENCE_TEST_CRF)
                                       # or "pseudo": the run's cfg.crf, as the pseudo labels'
    msc_loss: str = "sum"              # MSC: sum of the 4 losses (the reference) or their "mean"
    amp: bool = True                   # bf16 autocast on CUDA (the reference trains in float32)
    ckpt_every: int = 1000             # iterations between atomic checkpoints
    workers: int = 4                   # DataLoader workers

    # what does not shape the trained network (may change after training)
    NOT_TRAINING = frozenset({"workers", "ckpt_every", "test_scales", "flip_test", "crf",
                              "test_crf", "test_views"})
    TEST_CRF_MODES = ("reference", "pseudo")
    MSC_LOSS_MODES = ("sum", "mean")
    LOSS_SIZES = ("logits", "labels")
    TEST_VIEWS = ("msc_max", "mean")

    def largest_scale(self) -> float:
        return max(self.scale_choices) if self.scale_choices else self.scale_max

    def level_labels(self) -> dict[str, str]:
        """The label of each test-time level (``DEEPLAB_TEST_LEVELS``) under ``test_views``."""
        if self.test_views == "msc_max":
            return {"single_scale": "single scale", "multi_scale": "multi-scale (MSC max)",
                    "crf": "multi-scale (MSC max) + dense CRF"}
        return dict(DEEPLAB_TEST_LEVELS)

    def validate(self) -> None:
        for name in ("crop", "batch", "iterations", "ckpt_every"):
            if int(getattr(self, name)) < 1:
                raise CpfcteError(f"parameter deeplab.{name}={getattr(self, name)!r} must be ≥ 1")
        if self.lr <= 0:
            raise CpfcteError(f"parameter deeplab.lr={self.lr!r} must be > 0")
        if not 0 < self.scale_min <= self.scale_max:
            raise CpfcteError("parameters deeplab.scale_min and deeplab.scale_max must satisfy "
                              f"0 < scale_min ≤ scale_max (got {self.scale_min}, {self.scale_max})")
        if not self.test_scales or any(float(s) <= 0 for s in self.test_scales):
            raise CpfcteError(f"parameter deeplab.test_scales={self.test_scales!r} must be a "
                              "non-empty list of positive scales")
        if self.workers < 0:
            raise CpfcteError(f"parameter deeplab.workers={self.workers!r} must be ≥ 0")
        if self.test_crf not in self.TEST_CRF_MODES:
            raise CpfcteError(f"parameter deeplab.test_crf={self.test_crf!r} is not one of "
                              f"{list(self.TEST_CRF_MODES)}")
        if self.msc_loss not in self.MSC_LOSS_MODES:
            raise CpfcteError(f"parameter deeplab.msc_loss={self.msc_loss!r} is not one of "
                              f"{list(self.MSC_LOSS_MODES)}")
        for name, options in (("loss_size", self.LOSS_SIZES), ("test_views", self.TEST_VIEWS)):
            if getattr(self, name) not in options:
                raise CpfcteError(f"parameter deeplab.{name}={getattr(self, name)!r} is not one "
                                  f"of {list(options)}")
        if any(float(c) <= 0 for c in self.scale_choices):
            raise CpfcteError(f"parameter deeplab.scale_choices={self.scale_choices!r} must be "
                              "positive scales (or [] for uniform in [scale_min, scale_max])")


# DeepLabv2's test-time levels, each scored on its own (Tables 2 and 3; cpfcte.method.deeplabv2)
DEEPLAB_TEST_LEVELS = {"single_scale": "single scale", "multi_scale": "multi-scale + flip",
                       "crf": "multi-scale + flip + dense CRF"}

# kazuto1011/deeplab-pytorch's test-time CRF for VOC (configs/voc12.yaml): POS_W 3,
# POS_XY_STD 1, BI_W 4, BI_XY_STD 67, BI_RGB_STD 3, ITER_MAX 10 (note 15); ViT-PCM's pseudo-label
# CRF has the same values, so it equals CRFConfig's defaults
REFERENCE_TEST_CRF = CRFConfig(gaussian_sxy=1.0, gaussian_compat=3.0, bilateral_sxy=67.0,
                               bilateral_srgb=3.0, bilateral_compat=4.0, iterations=10)
# the CRF this project used before it followed ViT-PCM (note 8): pydensecrf's example
PYDENSECRF_EXAMPLE = CRFConfig(gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_sxy=80.0,
                               bilateral_srgb=13.0, bilateral_compat=10.0, iterations=10)


SECTIONS = {"crf": CRFConfig, "deeplab": DeepLabConfig}


@dataclass
class Config:
    # --- profile and data ---------------------------------------------------------------
    profile: str = "voc"
    dataset: str = "voc"               # toy | toy_coco | voc | coco
    data_root: str = "VOCdevkit/VOC2012"  # relative to the data folder (CPFCTE_DATA) or absolute
    train_split: str = "train_aug"     # stage 1 trains on these images' image-level labels
    pseudo_split: str = "train"        # pseudo labels are made and scored on VOC train (1,464)
    val_split: str = "val"
    # --- model (Sec. 3, notes 1-5, 11, 20) --------------------------------------------------
    # the original ViT-B/16 (ImageNet-21k, then 1k, at 384), as ViT-PCM loads it (note 20)
    backbone: str = "vit_base_patch16_384.orig_in21k_ft_in1k"  # any timm ViT
    # constructor overrides (the tiny toy ViT); proj_drop_rate 0.1 is vit_keras's dropout in
    # every transformer block, which ViT-PCM trains with (note 21)
    backbone_kwargs: dict = field(default_factory=lambda: {"proj_drop_rate": 0.1})
    pretrained: bool = True            # load the backbone's weights through timm
    weights: str | None = None         # or from this local checkpoint file (offline clusters)
    random_init_ok: bool = False       # only the toy profile may train a randomly initialised ViT
    class_tokens: str = "soft"         # none | soft | mean (note 1)
    token_dim: int = 256               # H, the class-token width (note 11)
    token_init_std: float = 1.0        # the tokens start from N(0, std²): the patch features'
                                       # scale; 0.02 (ViT's) leaves the assignment uniform (note 23)
    project_tokens: bool = False       # project Concat(p, t) back to e (note 2); Eq. 6/7 keep e+H
    cf_bilstm: str = "hv"              # none | hv | raster (note 3)
    lstm_hidden: int = 192             # d, hidden size per direction (note 3)
    lstm_init: str = "keras"           # keras (ViT-PCM's: glorot, orthogonal, forget bias 1) |
                                       # torch (torch's defaults) (note 3)
    dropout: float = 0.2               # before the CF-BiLSTM and before the classifier (note 21)
    lstm_dropout: float = 0.2          # on the BiLSTMs' inputs, one mask per sequence (note 21)
    classifier_init_std: float = 0.05  # the patch classifier starts from N(0, std²) (note 4)
    classifier_l2: float = 0.01        # L2 penalty λ·ΣW² on the classifier, added to the loss
    pooling: str = "topk"              # gap | gmp | topk (Eq. 8, Table 5)
    k: int = 4                         # top-k (Fig. 4)
    # --- training (Sec. 4.2, notes 6, 12, 13) ---------------------------------------------
    img_size: int = 384
    batch_size: int = 16
    epochs: int = 50
    warmup_epochs: int = 2             # epochs at lr_warmup, then lr
    lr_warmup: float = 1e-3
    lr: float = 1e-4
    freeze_backbone_warmup: bool = True  # freeze the ViT while the 1e-3 phase runs (note 6)
    unfreeze_blocks: int | None = 5    # after it, train only the ViT's last N blocks and its
                                       # final norm (ViT-PCM); None: every block and embedding
    weight_decay: float = 0.0
    adam_eps: float = 1e-7             # Keras's Adam epsilon (ViT-PCM); torch's default is 1e-8
    optimizer_per_phase: bool = True   # a fresh Adam when the phase changes, as ViT-PCM compiles
                                       # one after unfreeze() (main.py); false: one Adam throughout
    augment: str = "pcm"               # pcm (ViT-PCM's flips, transpose, colour) | hflip | none
    resize: str = "pcm"                # pcm (bilinear, corners aligned, float) | pil (note 12)
    augment_on: str = "loader"         # where pcm's colour ops run: loader (numpy, in the
                                       # workers, as ViT-PCM's tf.data map) | device (the batch
                                       # on the GPU; the loader only decodes, resizes, flips)
    amp: bool = True                   # bf16 autocast on CUDA (ignored on CPU)
    workers: int = 4                   # DataLoader workers
    seed: int = 0
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    skip_nonfinite: bool = False       # skip (and count) steps whose loss is not finite, instead
                                       # of stopping the run (stage 1 and DeepLabv2)
    diagnostic_images: int = 64        # training images the mechanisms are measured on after
                                       # every epoch (cpfcte.method.diagnostics); 0: none
    threads: int = 0                   # CPU threads of a run (0: every core); fixed, the split
                                       # of reductions (and so the bits) does not depend on the
                                       # machine (cpfcte.machinery.numerics)
    # --- pseudo labels (Sec. 3.4, note 7) -------------------------------------------------
    infer_size: int = 960              # images are resized to infer_size × infer_size
    infer_scale: float | None = None   # or infer_scale × img_size, in whole patches (Fig. 5)
    infer_batch: int = 8
    bpm_norm: str = "pcm"              # pcm: ViT-PCM's per-class max normalisation; none: Eq. 10
    infer_workers: int = 0             # DataLoader workers decoding and resizing at inference
    # --- the stages after stage 1 -----------------------------------------------------------
    crf: CRFConfig = field(default_factory=CRFConfig)
    deeplab: DeepLabConfig = field(default_factory=DeepLabConfig)

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
        choice("augment", AUGMENT_MODES)
        choice("resize", RESIZE_MODES)
        choice("augment_on", AUGMENT_PLACES)
        from cpfcte.machinery.safety import plain_name

        for name in ("train_split", "pseudo_split", "val_split"):   # each becomes a path part
            plain_name(getattr(self, name), f"parameter {name}")
        choice("bpm_norm", BPM_NORMS)
        choice("lstm_init", LSTM_INITS)
        if not self.token_init_std > 0 or not self.adam_eps > 0:
            raise CpfcteError("parameters token_init_std and adam_eps must be > 0")
        if self.diagnostic_images < 0:
            raise CpfcteError(f"parameter diagnostic_images={self.diagnostic_images!r} must be "
                              "≥ 0 (0: no per-epoch measurement of the mechanisms)")
        for name in ("dropout", "lstm_dropout"):
            if not 0.0 <= float(getattr(self, name)) < 1.0:
                raise CpfcteError(f"parameter {name}={getattr(self, name)!r} must be in [0, 1)")
        if self.classifier_init_std <= 0 or self.classifier_l2 < 0:
            raise CpfcteError("parameters classifier_init_std must be > 0 and classifier_l2 "
                              "≥ 0")
        if self.unfreeze_blocks is not None and self.unfreeze_blocks < 0:
            raise CpfcteError(f"parameter unfreeze_blocks={self.unfreeze_blocks!r} must be ≥ 0 "
                              "(or null: every block trains)")
        for name in ("token_dim", "lstm_hidden", "k", "img_size", "batch_size", "epochs",
                     "infer_size", "infer_batch"):
            if int(getattr(self, name)) < 1:
                raise CpfcteError(f"parameter {name}={getattr(self, name)!r} must be ≥ 1")
        if min(self.warmup_epochs, self.workers, self.threads, self.infer_workers) < 0:
            raise CpfcteError("parameters warmup_epochs, workers, infer_workers and threads "
                              "must be ≥ 0")
        if self.infer_scale is not None and self.infer_scale <= 0:
            raise CpfcteError(f"parameter infer_scale={self.infer_scale!r} must be > 0")
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
        self.crf.validate()
        self.deeplab.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def training_fields(self) -> dict[str, Any]:
        """The fields that shape the stage-1 network: everything but the inference and machine
        settings (``NOT_TRAINING``) and the later stages' sections."""
        return {k: v for k, v in self.to_dict().items()
                if k not in NOT_TRAINING and k not in SECTIONS}

    def digest(self) -> str:
        """A short hash of ``training_fields``: two runs with equal digests trained the same
        model, so inference, CRF, DeepLabv2 and machine settings can change after training."""
        return short_digest(self.training_fields())

    def deeplab_fields(self) -> dict[str, Any]:
        """The fields that shape a trained DeepLabv2: its section (but for test-time and
        machine settings) and the data and seed it is trained with."""
        # keyed deeplab_<name>, as in the flat configs before the sections, so that the
        # digests of DeepLabv2 runs made then stay valid
        section = {f"deeplab_{k}": v for k, v in dataclasses.asdict(self.deeplab).items()
                   if k not in DeepLabConfig.NOT_TRAINING}
        return {**section, **{k: getattr(self, k) for k in DEEPLAB_SHARED}}

    def deeplab_digest(self) -> str:
        return short_digest(self.deeplab_fields())

    def init_stamp(self) -> str:
        """Where the networks start from, as the outputs are stamped: ``random init`` for a
        network without pretrained or local weights (the toy; a smoke run with
        ``random_init_ok``: not a result)."""
        vit = ("local weights" if self.weights else "pretrained" if self.pretrained
               else "random init")
        dl = self.deeplab
        res = "local init" if dl.init else "pretrained" if dl.pretrained else "random init"
        return f"stage 1: {vit}; DeepLabv2: {res}"

    def test_crf(self) -> CRFConfig:
        """The dense CRF that refines DeepLabv2's predictions (note 15): the reference recipe's
        parameters (``deeplab.test_crf=reference``) or the run's own ``cfg.crf``
        (``pseudo``); ``cfg.crf.workers`` processes either way."""
        if self.deeplab.test_crf == "pseudo":
            return self.crf
        return dataclasses.replace(REFERENCE_TEST_CRF, workers=self.crf.workers)


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(Config))
# where a step runs (device, threads, workers, augment_on) moves float rounding, not the recipe
NOT_TRAINING = frozenset({"pseudo_split", "val_split", "workers", "device", "threads",
                          "augment_on", "skip_nonfinite",
                          "infer_size", "infer_scale", "infer_batch", "bpm_norm",
                          "infer_workers", "diagnostic_images"})
DEEPLAB_SHARED = ("dataset", "data_root", "train_split", "seed", "random_init_ok")


def _valid_names() -> list[str]:
    names = [n for n in FIELD_NAMES if n not in SECTIONS]
    for section, kind in SECTIONS.items():
        names += [section] + [f"{section}.{f.name}" for f in dataclasses.fields(kind)]
    return names


def _unknown(key: Any, where: str) -> CpfcteError:
    valid = _valid_names()
    close = difflib.get_close_matches(str(key), valid, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return CpfcteError(f"unknown parameter {key!r} in {where}{hint} (valid: {', '.join(valid)})")


def nest(values: dict[str, Any], where: str) -> dict[str, Any]:
    """Check the names of ``values`` and return them nested: ``{"deeplab.iterations": 2}`` and
    ``{"deeplab": {"iterations": 2}}`` both become the latter."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        section, _, name = str(key).partition(".")
        if section in SECTIONS:
            fields = {f.name for f in dataclasses.fields(SECTIONS[section])}
            if name:
                if name not in fields:
                    raise _unknown(key, where)
                out.setdefault(section, {})[name] = value
            elif isinstance(value, dict):
                for sub in value:
                    if sub not in fields:
                        raise _unknown(f"{section}.{sub}", where)
                out.setdefault(section, {}).update(value)
            else:
                raise CpfcteError(f"parameter {key!r} in {where} is a section: give a mapping "
                                  f"or set its fields as {key}.NAME=VALUE")
        elif key in FIELD_NAMES and not name:
            out[key] = value
        else:
            raise _unknown(key, where)
    return out


def check_keys(keys: Any, where: str) -> None:
    nest({k: None for k in keys}, where)


def merge(base: dict[str, Any], top: dict[str, Any], *, skip_none: bool = False) -> dict[str, Any]:
    """``top`` over ``base``, section by section (with ``skip_none``, a None in ``top`` keeps
    the base value: notebook parameters default to None)."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if key in SECTIONS and isinstance(value, dict):
            section = dict(out.get(key) or {})
            section.update({k: v for k, v in value.items() if not (skip_none and v is None)})
            out[key] = section
        elif not (skip_none and value is None):
            out[key] = value
    return out


BASE_PROFILES = ("toy", "voc", "coco")


def user_profile_dir() -> Path:
    """Your own profiles: ``profiles/<name>.yaml`` at the project root (or ``CPFCTE_PROFILES``);
    a name there that is also a built-in profile's is refused."""
    import os

    from cpfcte.machinery.paths import project_root

    env = os.environ.get("CPFCTE_PROFILES")
    return Path(env) if env else project_root() / "profiles"


def available_profiles() -> list[str]:
    return sorted({p.stem for d in (PROFILE_DIR, user_profile_dir()) for p in d.glob("*.yaml")})


def profile_file(profile: str) -> Path:
    """The file of a profile name (built-in, then yours) or a path to a YAML file."""
    path = Path(profile)
    if path.suffix:
        return path
    builtin, user = PROFILE_DIR / f"{profile}.yaml", user_profile_dir() / f"{profile}.yaml"
    if builtin.is_file() and user.is_file():
        raise CpfcteError(f"{user}: profile {profile!r} is a built-in name; rename your file")
    return builtin if builtin.is_file() else user


def base_profile(profile: str) -> str:
    """The built-in profile (toy, voc or coco) a profile extends, through its ``extends``
    chain: the batch runs a profile of yours as it runs that one."""
    seen = []
    while profile not in BASE_PROFILES:
        path = profile_file(profile)
        if not path.is_file() or profile in seen:
            return profile
        seen.append(profile)
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict) or "extends" not in values:
            return profile
        profile = str(values["extends"])
    return profile


def profile_values(profile: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields a profile file sets (nested); ``extends: NAME`` first takes those of
    profile NAME, section by section."""
    path = profile_file(profile)
    if not path.is_file():
        raise CpfcteError(f"unknown profile {profile!r}: no file {path} "
                          f"(available: {', '.join(available_profiles())})")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise CpfcteError(f"{path}: not valid YAML ({e})") from None
    if values is None:
        raise CpfcteError(f"{path}: the profile file is empty; write its settings (at least "
                          "`extends: voc` or `extends: toy`, then what differs)")
    if not isinstance(values, dict):
        raise CpfcteError(f"{path}: a profile must be a mapping of parameter: value")
    values = dict(values)
    name = Path(profile).stem if Path(profile).suffix else str(profile)
    said = values.get("profile", name)
    if said != name:
        raise CpfcteError(f"{path}: says profile: {said}, but the file is profile {name!r}; "
                          f"its runs would go to runs/{said}/. Set profile: {name} (or remove "
                          "the line: a profile is named by its file)")
    values["profile"] = name
    base = values.pop("extends", None)
    values = nest(values, str(path))
    if base is None:
        return values
    if base in _seen:
        raise CpfcteError(f"{path}: profiles extend each other in a loop ({' → '.join(_seen)})")
    return merge(profile_values(str(base), _seen + (str(profile),)), values)


def load_config(profile: str = "toy", overrides: dict[str, Any] | None = None) -> Config:
    """The profile's settings with ``overrides`` applied on top, validated. ``None`` values in
    ``overrides`` mean "keep the profile's value" (so notebook parameters can default to None)."""
    given = (overrides or {}).get("profile")
    if given is not None and given != profile:
        raise CpfcteError(f"--set profile={given}: a run's profile is chosen by --profile "
                          f"(here {profile!r}) alone; pass --profile {given} instead")
    values = merge(profile_values(profile), nest(overrides or {}, "overrides"), skip_none=True)
    return config_from_dict(values, f"profile {profile}").validate()


def derive(cfg: Config, overrides: dict[str, Any] | None = None) -> Config:
    """A downstream stage's config: ``cfg`` (the upstream run's) with ``overrides`` on top
    (None keeps the upstream value), validated. ``cfg`` itself is not changed."""
    values = merge(cfg.to_dict(), nest(overrides or {}, "overrides"), skip_none=True)
    return config_from_dict(values, "overrides").validate()


def config_from_dict(values: dict[str, Any], source: Path | str = "config") -> Config:
    """A Config from nested values (a saved config.json, a merged profile); fields added since
    it was written take their defaults."""
    if not isinstance(values, dict):
        raise CpfcteError(f"{source}: the config must be a mapping of parameters, got "
                          f"{type(values).__name__}; delete the file and rerun the stage that "
                          "writes it")
    values = nest(values, str(source))
    sections = {name: _coerce(kind(**values.pop(name, {})), f"{name}.")
                for name, kind in SECTIONS.items()}
    return _coerce(Config(**values, **sections))


def config_from_file(path: str | Path) -> Config:
    """A Config from a JSON file: a whole config (``launch_config.json``) or a run folder's
    ``config.json`` (``{"stage", "digest", "config": {...}}``), validated."""
    from cpfcte.machinery.io import read_json

    values = read_json(Path(path))
    if isinstance(values, dict) and "config" in values and "stage" in values:
        values = values["config"]                 # a run folder's record
    return config_from_dict(values, path).validate()


def _coerce(obj, prefix: str = ""):
    """Cast fields to their declared types (YAML and papermill may give ints for floats)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        optional = kind.endswith(" | None")
        kind = kind.removesuffix(" | None")
        if kind in ("CRFConfig", "DeepLabConfig") or (optional and value is None):
            continue
        try:
            if kind == "int":
                if isinstance(value, bool) or (isinstance(value, float)
                                               and not value.is_integer()):
                    raise ValueError(value)            # true is not 1; 1.7 is not 1
                if isinstance(value, str) and not value.strip().lstrip("+-").isdigit():
                    raise ValueError(value)
                value = int(value)
            elif kind == "float":
                if isinstance(value, bool):
                    raise ValueError(value)
                value = float(value)
                if not math.isfinite(value):
                    raise CpfcteError(f"parameter {prefix}{f.name}={value!r} must be a finite "
                                      "number")
            elif kind == "bool" and not isinstance(value, bool):
                if str(value).lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                value = str(value).lower() in ("true", "1")
            elif kind == "str":
                value = str(value)
            elif kind in ("list", "dict") and not isinstance(value, (list, dict)):
                raise ValueError(value)
        except (TypeError, ValueError):
            raise CpfcteError(f"parameter {prefix}{f.name}={value!r} must be of type "
                              f"{kind}") from None
        setattr(obj, f.name, value)
    return obj


def parse_set_args(pairs: list[str] | None) -> dict[str, Any]:
    """``["k=8", "deeplab.iterations=2"]`` → ``{"k": 8, "deeplab.iterations": 2}`` (values
    parsed as YAML; names checked)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise CpfcteError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        if not raw.strip():
            raise CpfcteError(f"--set {pair}: no value after '='; give one (null keeps none)")
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise CpfcteError(f"--set {pair}: {raw!r} is not a value (numbers, true/false, "
                              "null, [lists], {mappings} or text)") from None
    check_keys(out, "--set")
    return out
