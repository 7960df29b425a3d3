"""The numerics fingerprint: do this machine's CPU code paths give the committed bits?

``cpfcte numerics --check`` hashes (sha256, 12 hex digits) the outputs and gradients of every
operation the toy profile's stages run, at the shapes they run at, on fixed inputs, under the
pinned numerics (``cpfcte.machinery.numerics``), and compares them with the reference committed
beside this file (``fingerprint_reference.json``). Two machines that agree on every line give
the same toy tables; the first line that differs names the operation whose code path depends on
the processor. The cases:

- the GEMMs of the toy ViT, class tokens, CF-BiLSTM and classifier at their training (64 px,
  batch 32) and inference (160 px) shapes; the patch-embedding and DeepLabv2 convolutions;
  attention; the LSTM forward and backward; GELU, layer norm, softmax, the losses;
- bilinear interpolation as the BPM and DeepLabv2 use it; Adam and SGD steps; the random
  generators; numpy's maths; the dense CRF (pydensecrf, compiled C++);
- the whole toy CPF-CTE network forward and backward, its inference at 160 px, the toy
  DeepLabv2 forward and backward, and the state digest after one stage-1 training step
  (``cpfcte.stages.train.train_step``, Adam, the MCE loss and the classifier's L2).

The composite cases build the network from the code of this commit, so a change to the model
changes them: ``cpfcte numerics --write`` then rewrites the reference (run it on a pinned x86
machine, and say so in the commit). ``CPFCTE_FINGERPRINT_MKL_CBWR`` tries another MKL branch
than the pinned one (a diagnosis; the reference holds for the pin).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

REFERENCE = Path(__file__).with_name("fingerprint_reference.json")
TRY_BRANCH = "CPFCTE_FINGERPRINT_MKL_CBWR"


def _digest(*arrays) -> str:
    import numpy as np
    import torch

    h = hashlib.sha256()
    for a in arrays:
        if isinstance(a, torch.Tensor):
            a = a.detach().contiguous().cpu().numpy()
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:12]


def _rnd(*shape, seed: int = 0):
    import torch

    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _fwd_bwd(fn: Callable, *shapes, seed: int = 0) -> str:
    xs = [_rnd(*s, seed=seed + i).requires_grad_(True) for i, s in enumerate(shapes)]
    y = fn(*xs)
    y.backward(_rnd(*y.shape, seed=99) if y.dim() else None)
    return _digest(y, *[x.grad for x in xs])


def _module_fwd_bwd(module, *inputs) -> str:
    """Output and every gradient (inputs' and parameters') of a module on fixed inputs."""
    for x in inputs:
        if x.is_floating_point():
            x.requires_grad_(True)
    y = module(*inputs)
    y.backward(_rnd(*y.shape, seed=98))
    grads = [x.grad for x in inputs if x.grad is not None]
    return _digest(y, *grads, *[p.grad for p in module.parameters() if p.grad is not None])


# ---------------------------------------------------------------------------------------------
# the cases: name → a function returning its hash. Shapes are the toy profile's (cpfcte/profiles/
# toy.yaml): ViT width 96, 4 blocks, 3 heads, patch 8; 64 px in training (8×8 = 64 patches + the
# [CLS] token, batch 32), 160 px at inference (20×20 patches, batch 32); class tokens H = 32 over
# C = 11 classes; LSTM hidden 32 over e + H = 128 inputs; DeepLabv2 ResNet-10 at crop 96, batch 10.

def _op_cases() -> dict[str, Callable[[], str]]:
    import torch
    import torch.nn.functional as F

    def linear(m, k, n):
        return lambda: _fwd_bwd(lambda x, w, b: F.linear(x, w, b), (m, k), (n, k), (n,))

    def lstm(dim, hidden, seq, batch):
        def case():
            torch.manual_seed(0)
            net = torch.nn.LSTM(dim, hidden, batch_first=True)
            x = _rnd(batch, seq, dim).requires_grad_(True)
            y, _ = net(x)
            y.backward(_rnd(*y.shape, seed=5))
            return _digest(y, x.grad, *[p.grad for p in net.parameters()])
        return case

    def conv(x_shape, w_shape, **kw):
        return lambda: _fwd_bwd(lambda x, w: F.conv2d(x, w, **kw), x_shape, w_shape)

    def optimiser(kind):
        def case():
            p = torch.nn.Parameter(_rnd(1000))
            opt = (torch.optim.Adam([p], lr=4e-4) if kind == "adam" else
                   torch.optim.SGD([p], lr=1e-2, momentum=0.9, weight_decay=5e-4))
            for i in range(3):
                opt.zero_grad()
                (p * _rnd(1000, seed=10 + i)).sum().backward()
                opt.step()
            return _digest(p)
        return case

    def rng():
        torch.manual_seed(7)
        return _digest(torch.randn(100), torch.empty(100).bernoulli_(0.8), torch.randperm(50),
                       torch.randint(0, 255, (50,)))

    def numpy_rng():
        import numpy as np

        return _digest(np.random.default_rng([0, 1, 2]).normal(size=100),
                       np.random.default_rng(0).random(100), np.random.RandomState(0).rand(100))

    def numpy_maths():
        import numpy as np

        x = np.linspace(0.1, 5, 1001)
        return _digest(np.exp(-x), np.log(x), np.sin(x), np.float32(x).sum(),
                       np.random.default_rng(1).normal(size=(64, 64)) @
                       np.random.default_rng(2).normal(size=(64, 64)))

    return {
        # stage 1 in training: 32 images × 65 tokens = 2080 rows; 32 × 64 patches = 2048
        "vit patch embedding conv 3->96 k8 s8, 32x64x64": conv((32, 3, 64, 64), (96, 3, 8, 8),
                                                                stride=8),
        "vit qkv linear 2080x96->288": linear(2080, 96, 288),
        "vit attention proj linear 2080x96->96": linear(2080, 96, 96),
        "vit mlp linear 2080x96->384": linear(2080, 96, 384),
        "vit mlp linear 2080x384->96": linear(2080, 384, 96),
        "vit attention sdpa 32x3x65x32": lambda: _fwd_bwd(F.scaled_dot_product_attention,
                                                          (32, 3, 65, 32), (32, 3, 65, 32),
                                                          (32, 3, 65, 32)),
        "layer_norm 2080x96": lambda: _fwd_bwd(lambda x: F.layer_norm(x, (96,)), (2080, 96)),
        "gelu (erf) 2080x384": lambda: _fwd_bwd(F.gelu, (2080, 384)),
        "class-token query linear 2048x96->32": linear(2048, 96, 32),
        "class-token scores mm 2048x32x11": lambda: _fwd_bwd(torch.mm, (2048, 32), (32, 11)),
        "class-token mix mm 2048x11x32": lambda: _fwd_bwd(torch.mm, (2048, 11), (11, 32)),
        "softmax 2048x11": lambda: _fwd_bwd(lambda x: x.softmax(-1), (2048, 11)),
        "lstm 128->32, 256 sequences of 8": lstm(128, 32, 8, 256),
        "W_c linear 2048x128->128": linear(2048, 128, 128),
        "classifier linear 2048x128->11": lambda: _fwd_bwd(lambda x, w: F.linear(x, w),
                                                           (2048, 128), (11, 128)),
        "top-k mean, k=4 of 64": lambda: _fwd_bwd(lambda z: z.topk(4, dim=1).values.mean(1),
                                                  (32, 64, 11)),
        "bce (the MCE loss)": lambda: _fwd_bwd(
            lambda s: F.binary_cross_entropy(s.sigmoid(), (_rnd(32, 11, seed=3) > 0).float()),
            (32, 11)),
        "exp, log, sigmoid, tanh, erf": lambda: _fwd_bwd(
            lambda x: torch.exp(x).sum() + torch.log(x.abs() + 0.1).sum() + x.sigmoid().sum()
            + x.tanh().sum() + torch.erf(x).sum(), (4096,)),
        "adam, 3 steps": optimiser("adam"),
        # inference at 160 px: 32 images × 401 tokens
        "vit qkv linear 12832x96->288 (inference)": linear(12832, 96, 288),
        "vit attention sdpa 32x3x401x32 (inference)": lambda: _fwd_bwd(
            F.scaled_dot_product_attention, (32, 3, 401, 32), (32, 3, 401, 32),
            (32, 3, 401, 32)),
        "lstm 128->32, 640 sequences of 20 (inference)": lstm(128, 32, 20, 640),
        "interpolate bilinear, corners aligned, 20x20->160x160": lambda: _fwd_bwd(
            lambda x: F.interpolate(x, size=(160, 160), mode="bilinear", align_corners=True),
            (1, 11, 20, 20)),
        "interpolate bilinear, half-pixel, 12x12->97x131": lambda: _fwd_bwd(
            lambda x: F.interpolate(x, size=(97, 131), mode="bilinear", align_corners=False),
            (10, 11, 12, 12)),
        # DeepLabv2 (ResNet-10, channels 32..256, crop 96, batch 10)
        "deeplab conv 3x3 32->32 on 10x32x48x48": conv((10, 32, 48, 48), (32, 32, 3, 3),
                                                       padding=1),
        "deeplab conv 3x3 dilation 4 256->256 on 10x256x12x12": conv(
            (10, 256, 12, 12), (256, 256, 3, 3), padding=4, dilation=4),
        "deeplab ASPP conv 3x3 dilation 24 256->11": conv((10, 256, 12, 12), (11, 256, 3, 3),
                                                          padding=24, dilation=24),
        "batch_norm (training) 10x64x24x24": lambda: _fwd_bwd(
            lambda x: F.batch_norm(x, None, None, training=True), (10, 64, 24, 24)),
        "max_pool2d 3x3 s2": lambda: _fwd_bwd(lambda x: F.max_pool2d(x, 3, 2, 1),
                                              (10, 32, 48, 48)),
        "cross_entropy, ignore 255": lambda: _fwd_bwd(
            lambda x: F.cross_entropy(x, torch.randint(0, 11, (10, 96, 96),
                                                       generator=torch.Generator().manual_seed(1)),
                                      ignore_index=255), (10, 11, 96, 96)),
        "sgd with momentum, 3 steps": optimiser("sgd"),
        "torch generators": rng,
        "numpy generators": numpy_rng,
        "numpy exp, log, sin, sum, matmul": numpy_maths,
        "dense CRF (pydensecrf), 10 iterations": _crf_case,
    }


def _crf_case() -> str:
    import numpy as np

    from cpfcte.machinery.config import CRFConfig
    from cpfcte.method.crf import dense_crf

    rng = np.random.default_rng(0)
    probs = rng.random((3, 60, 70)).astype(np.float32)
    probs /= probs.sum(0, keepdims=True)
    image = (rng.random((60, 70, 3)) * 255).astype(np.uint8)
    return _digest(dense_crf(image, probs, CRFConfig()))


def _toy_config():
    from cpfcte.machinery.config import load_config

    return load_config("toy", {"data_root": "fingerprint-needs-no-data"})


def _model_cases() -> dict[str, Callable[[], str]]:
    """The toy's networks as this commit builds them."""
    import torch

    from cpfcte.method.deeplabv2 import build_deeplab
    from cpfcte.stages.train import make_model

    cfg = _toy_config()
    classes = 11

    def images(n, size, seed):
        return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8,
                             generator=torch.Generator().manual_seed(seed))

    def cpfcte_fwd_bwd():
        model = make_model(cfg).train()
        torch.manual_seed(1)                                      # the dropout masks
        out = model(images(cfg.batch_size, cfg.img_size, 2))
        out["z"].backward(_rnd(*out["z"].shape, seed=3))
        return _digest(out["z"], *[p.grad for p in model.parameters() if p.grad is not None])

    def cpfcte_inference():
        model = make_model(cfg).eval()
        with torch.no_grad():
            return _digest(model(images(8, cfg.infer_size, 4))["z"])

    def deeplab_fwd_bwd():
        from cpfcte.machinery.numerics import set_seed

        set_seed(cfg.seed)
        model = build_deeplab(cfg, classes).train()
        x = torch.rand(cfg.deeplab.batch, 3, cfg.deeplab.crop, cfg.deeplab.crop,
                       generator=torch.Generator().manual_seed(5))
        return _module_fwd_bwd(model, x)

    def train_step_digest():
        from cpfcte.machinery.finite import FiniteGuard
        from cpfcte.stages.train import optimiser_for, state_digest, train_step

        model = make_model(cfg).train()
        optimizer = optimiser_for(model, cfg, cfg.lr)
        torch.manual_seed(6)
        y = (torch.rand(cfg.batch_size, classes, generator=torch.Generator().manual_seed(7))
             < 0.3).float()
        y[:, 0] = 1.0
        sums = torch.zeros(4)
        guard = FiniteGuard(torch.device("cpu"), "fingerprint", "step", False, 1)
        for step in range(2):
            train_step(model, model, cfg, optimizer, guard, images(cfg.batch_size, cfg.img_size,
                                                                   8 + step), y, step, sums,
                       False)
        return state_digest(model)

    return {"toy CPF-CTE forward and backward (32 images, 64 px)": cpfcte_fwd_bwd,
            "toy CPF-CTE inference (8 images, 160 px)": cpfcte_inference,
            "toy DeepLabv2 forward and backward (10 crops of 96 px)": deeplab_fwd_bwd,
            "toy stage 1: state digest after two training steps": train_step_digest}


MODEL_CASE_PREFIX = "toy "


def is_model_case(name: str) -> bool:
    """A case that builds a toy network from this checkout's code (``_model_cases``), rather
    than one operation on fixed inputs."""
    return name.startswith(MODEL_CASE_PREFIX)


def fingerprint(progress: bool = False) -> dict:
    """{"meta": the machine and its code paths, "ops": {case: hash}} under the pinned numerics
    (one thread, oneDNN off, deterministic algorithms; ``numerics.apply``)."""
    if os.environ.get(TRY_BRANCH):                   # before MKL's first call reads MKL_CBWR
        os.environ["MKL_CBWR"] = os.environ[TRY_BRANCH]
    import torch

    from cpfcte.machinery import numerics
    from cpfcte.machinery.progress import progress_bar

    cfg = _toy_config()
    if not os.environ.get(TRY_BRANCH):
        numerics.apply(cfg)                           # refuses a process with other paths
    else:
        torch.set_num_threads(1)
        torch.backends.mkldnn.enabled = False
        torch.use_deterministic_algorithms(True)
    cases = {**_op_cases(), **_model_cases()}
    ops = {}
    for name, case in progress_bar(cases.items(), desc="fingerprint", total=len(cases),
                                   disable=not progress):
        try:
            ops[name] = case()
        except Exception as e:  # noqa: BLE001  (a case that fails is reported, not hidden)
            ops[name] = f"error {type(e).__name__}: {e}"[:160]
    return {"meta": {"cpu": numerics.cpu_model(), "vendor": numerics.cpu_vendor(),
                     "paths": numerics.active_paths(), "torch": torch.__version__},
            "ops": ops}


def compare(mine: dict, other: dict) -> list[str]:
    """The cases whose hashes differ (or that one side lacks)."""
    names = list(mine["ops"]) + [k for k in other["ops"] if k not in mine["ops"]]
    return [k for k in names if mine["ops"].get(k) != other["ops"].get(k)]


def reference() -> dict:
    from cpfcte.machinery.errors import CpfcteError

    if not REFERENCE.is_file():
        raise CpfcteError(f"{REFERENCE}: the committed numerics reference is missing; restore it "
                          "with git checkout, or write it on a pinned x86 machine with "
                          "cpfcte numerics --write")
    return json.loads(REFERENCE.read_text())


def report(mine: dict, other: dict, label: str) -> tuple[bool, list[str]]:
    """(equal, lines): one line per case, then a verdict naming the cases that differ."""
    bad = compare(mine, other)
    lines = [f"this machine: {mine['meta']['cpu']} ({mine['meta'].get('vendor', '?')}), MKL "
             f"branch {mine['meta']['paths'].get('mkl_cbwr')}; {label}: "
             f"{other['meta']['cpu']} ({other['meta'].get('vendor', '?')}), MKL branch "
             f"{other['meta']['paths'].get('mkl_cbwr')}"]
    lines += [("DIFFERS " if k in bad else "same    ") + k for k in mine["ops"]]
    lines += [f"MISSING {k} (in the {label} only)" for k in bad if k not in mine["ops"]]
    if bad:
        lines.append(f"{len(bad)} of {len(mine['ops'])} operations differ from the {label}: "
                     + "; ".join(bad))
    else:
        lines.append(f"all {len(mine['ops'])} operations give the {label}'s bits")
    return not bad, lines
