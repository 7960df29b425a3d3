"""Pinned CPU numerics: the same commit and seed give the same bits on any x86-64 machine with
AVX2 and the pinned requirements.

Floating-point results on a CPU depend on the code path each library picks for the processor
and on how many threads split a reduction; a difference in the last bit grows through training
into different tables. ``import cpfcte`` therefore pins, before numpy or torch load:

    ATEN_CPU_CAPABILITY=avx2        ATen's vectorised kernels: the AVX2 build, also on AVX-512
    MKL_CBWR=COMPATIBLE             MKL's conditional numerical reproducibility on its
                                    COMPATIBLE branch: the one branch MKL takes on every x86-64
                                    processor, Intel's and AMD's alike (see below)
    NPY_DISABLE_CPU_FEATURES=...    numpy's SIMD dispatch capped at X86_V3 (AVX2): its AVX-512
                                    log, exp and power differ from the AVX2 ones in the last bits
    OMP_NUM_THREADS, MKL_NUM_THREADS the run's thread count (``threads`` in the profile)

and every stage calls ``apply(cfg)`` first: a fixed thread count (``cfg.threads``; the toy uses
1, so the split of a reduction never depends on the machine's cores), oneDNN off (its kernels
choose their blocking from the caches of the processor, so convolutions and LSTMs run on ATen's
own paths over MKL instead), deterministic algorithms on CPU runs. ``CPFCTE_NUMERICS=native``
keeps the machine's own code paths (faster on AVX-512; not reproducible across machines).

Why COMPATIBLE and not AVX2: MKL grants its Intel branches (``MKL_CBWR=AVX2``, ``AVX512``,
``SSE4_2``) only on Intel processors. On an AMD processor it ignores them and dispatches by the
processor (``MKL_VERBOSE=1`` logs ``CNR:AUTO``), so ``AVX2,STRICT`` was one code path on Intel
and another on AMD: every MKL-backed operation (GEMM, hence linear, conv through im2col,
attention, the LSTM; MKL's vector maths behind exp, log and erf; Adam's step) differed in the
last bits, and the toy's tables by up to 11.5 points. COMPATIBLE is granted on both vendors
(``mkl_branch()`` reads the branch MKL took): the numerics fingerprint (``cpfcte numerics
--check``, ``cpfcte.machinery.fingerprint``) gives the same bits on an Intel Xeon and an AMD EPYC
for every operation the toy runs. It costs about 1.5× in GEMM time.

What is left outside: the C++ dense CRF (pydensecrf) is compiled when installed; the same
compiler and C library give the same results, and glibc's ``exp`` is not bound to the
processor's vector units.

A processor without AVX2 (Apple Silicon, an ARM server such as a GH200, an old x86) cannot take
the pinned paths. It runs with its own (``mode`` "native (no AVX2)"), says so once at the start
of a stage, its provenance says "numerics native", and ``cpfcte paper --check`` reports its
differences from the committed tables as expected on that machine, not as a failure to
reproduce. A pinned x86 run whose pins did not take effect (numpy imported before cpfcte)
still refuses (``check``).
"""

from __future__ import annotations

import os
import sys

# numpy 2.4 dispatches to X86_V3 (AVX2, FMA3), X86_V4 (AVX-512) and AVX512_ICL / AVX512_SPR
NUMPY_ABOVE_AVX2 = "X86_V4 AVX512_ICL AVX512_SPR"
PINS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE",
        "NPY_DISABLE_CPU_FEATURES": NUMPY_ABOVE_AVX2}
MODE_VARIABLE = "CPFCTE_NUMERICS"
MODES = ("pinned", "native")
FAKE_CPU = "CPFCTE_FAKE_CPU"     # tests: "arm64" or "x86_64-noavx2" fakes the processor


def cpu_has_avx2(machine: str | None = None, flags: str | None = None) -> bool:
    """Whether the processor can take the pinned AVX2 paths: x86-64 with AVX2 (from
    ``platform.machine()`` and the flags of /proc/cpuinfo; without /proc, an x86-64 is taken to
    have AVX2, as every x86 Mac and PC since 2013 does). Reads no numpy or torch. Tests fake
    the processor with CPFCTE_FAKE_CPU=arm64 | x86_64 | x86_64-noavx2."""
    import platform

    fake = os.environ.get(FAKE_CPU)
    if fake:
        machine = fake.split("-")[0]
        flags = "" if fake.endswith("-noavx2") else "avx2"
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "x64"):
        return False
    if flags is None:
        try:
            with open("/proc/cpuinfo") as info:
                flags = next((line for line in info if line.startswith("flags")), "avx2")
        except OSError:
            return True
    return "avx2" in flags.replace(":", " ").split()


def mode() -> str:
    """``pinned``; ``native`` (asked for: CPFCTE_NUMERICS=native); ``native (no AVX2)`` (a
    processor that cannot take the pinned paths)."""
    asked = os.environ.get(MODE_VARIABLE, "pinned") or "pinned"
    if asked not in MODES:
        from cpfcte.machinery.errors import CpfcteError

        raise CpfcteError(f"{MODE_VARIABLE}={asked!r}: must be one of {', '.join(MODES)} "
                          f"(unset it for the pinned code paths)")
    if asked == "native":
        return "native"
    return "pinned" if cpu_has_avx2() else "native (no AVX2)"


def pinned() -> bool:
    return mode() == "pinned"


def native_reason() -> str | None:
    """Why this process runs native numerics, for the one warning a stage gives; None when
    pinned."""
    m = mode()
    if m == "pinned":
        return None
    if m == "native":
        return f"{MODE_VARIABLE}=native is set"
    import platform

    return (f"this processor ({platform.machine()}) has no AVX2, so the pinned x86 code paths "
            "cannot run")


def warn_native() -> None:
    """Say once per process that the digits may differ from the committed tables."""
    import warnings

    reason = native_reason()
    if reason:
        warnings.warn(f"cpfcte numerics native: {reason}; the digits may differ from the "
                      "committed tables (paper --check reports that as expected here)",
                      NativeNumerics, stacklevel=2)


class NativeNumerics(UserWarning):
    pass


def pin_environment() -> list[str]:
    """Set the pinned code paths in the environment (for this process, before numpy and torch
    load, and for every process it starts). Returns the libraries already loaded with the
    machine's own paths (their pins cannot take effect in this process)."""
    from cpfcte.machinery.errors import CpfcteError

    try:
        if not pinned():
            return []
    except CpfcteError:     # a bad CPFCTE_NUMERICS: pin anyway; a stage refuses it (apply)
        pass
    late = [name for name in ("numpy", "torch") if name in sys.modules]
    os.environ.update(PINS)
    return late


def apply(cfg) -> None:
    """The per-run part of the pinning, at the start of a stage: the thread count, oneDNN off,
    deterministic algorithms for a run on the CPU (keyed on the run's device: a toy run on a
    GPU machine is a CPU run). Refuses a pinned run whose process loaded numpy or torch with
    other code paths."""
    import torch

    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    if not pinned():
        warn_native()
        return
    check()
    torch.backends.mkldnn.enabled = False
    from cpfcte.machinery.distributed import resolve_device

    torch.use_deterministic_algorithms(resolve_device(cfg.device).type == "cpu")


def active_paths() -> dict[str, str]:
    """The code paths in effect in this process."""
    import numpy as np
    import torch

    try:
        from numpy._core._multiarray_umath import __cpu_features__ as npy
    except ImportError:  # pragma: no cover (numpy < 2)
        npy = {}
    numpy_max = next((f for f in ("AVX512_SPR", "AVX512_ICL", "X86_V4", "X86_V3", "X86_V2")
                      if npy.get(f)), "?")
    return {"aten": torch.backends.cpu.get_cpu_capability(),
            "mkl_cbwr": mkl_branch(), "numpy": numpy_max,
            "onednn": "on" if torch.backends.mkldnn.enabled else "off",
            "threads": str(torch.get_num_threads()), "numpy_version": np.__version__}


# MKL's branch codes (mkl_cbwr_get; mkl_service.h): the value MKL_CBWR selects
MKL_BRANCHES = {0: "OFF", 1: "BRANCH_OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3",
                7: "SSE4_1", 8: "SSE4_2", 9: "AVX", 10: "AVX2", 11: "AVX512_MIC", 12: "AVX512",
                13: "AVX512_MIC_E1", 14: "AVX512_E1"}
MKL_STRICT = 0x10000


def mkl_branch() -> str:
    """The branch of MKL's conditional numerical reproducibility in effect in this process, as
    MKL itself reports it (``mkl_cbwr_get``, which torch's statically linked MKL exports as
    ``mkl_serv_cbwr_get``): ``COMPATIBLE``, ``AVX2,STRICT``; ``AUTO,STRICT`` where MKL refused
    the branch asked for (an Intel branch on an AMD processor). Where the function cannot be
    reached: the MKL_CBWR asked for, marked "(asked)"; ``no MKL`` without MKL."""
    import ctypes

    import torch

    if not torch.backends.mkl.is_available():
        return "no MKL"
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib",
                                       "libtorch_cpu.so"))
        get = lib.mkl_serv_cbwr_get
    except (OSError, AttributeError):
        return f"{os.environ.get('MKL_CBWR', 'unset')} (asked)"
    get.restype, get.argtypes = ctypes.c_int, [ctypes.c_int]
    value = get(-1)                                   # MKL_CBWR_ALL: branch and flags
    name = MKL_BRANCHES.get(value & 0xFFFF, f"branch {value & 0xFFFF}")
    return name + (",STRICT" if value & MKL_STRICT else "")


def cpu_vendor() -> str:
    """``Intel``, ``AMD`` or the processor's own vendor string (/proc/cpuinfo's vendor_id)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("vendor_id"):
                vendor = line.split(":", 1)[1].strip()
                return {"GenuineIntel": "Intel", "AuthenticAMD": "AMD"}.get(vendor, vendor)
    except OSError:
        pass
    import platform

    return platform.machine()


def check() -> None:
    """Raise when the pinned paths are not in effect (numpy or torch imported before cpfcte
    set them, or a processor without AVX2)."""
    from cpfcte.machinery.errors import CpfcteError

    paths = active_paths()
    wrong = []
    if paths["aten"] != "AVX2":
        wrong.append(f"ATen uses {paths['aten']}")
    if paths["numpy"] not in ("X86_V3",):
        wrong.append(f"numpy dispatches to {paths['numpy']}")
    if paths["mkl_cbwr"] not in (PINS["MKL_CBWR"], "no MKL") and "(asked)" not in paths["mkl_cbwr"]:
        wrong.append(f"MKL runs its {paths['mkl_cbwr']} branch")
    if wrong:
        raise CpfcteError(
            "the pinned CPU numerics are not in effect in this process (" + "; ".join(wrong) +
            "): import cpfcte before numpy and torch (restart the kernel and run the notebook "
            "from the top), or export " + " ".join(f"{k}='{v}'" for k, v in PINS.items()) +
            f"; on a processor without AVX2, or to accept the machine's own paths, set "
            f"{MODE_VARIABLE}=native (the numbers may then differ from the committed ones)")


def describe(device=None) -> str:
    """One line for the provenance of a run: CPU (and GPU), code paths, threads, versions."""
    import platform

    import torch

    paths = active_paths()
    mkl = "MKL " + _mkl_version() if torch.backends.mkl.is_available() else "no MKL"
    gpu = ""
    if device is not None and torch.device(device).type == "cuda":
        gpu = f"GPU {torch.cuda.get_device_name(torch.device(device))}; "
    return (f"{gpu}{cpu_model()} ({cpu_vendor()}); numerics "
            f"{'pinned' if pinned() else 'native'} (ATen "
            f"{paths['aten']}, MKL CBWR {paths['mkl_cbwr']}, numpy ≤ {paths['numpy']}, oneDNN "
            f"{paths['onednn']}), {paths['threads']} thread(s); torch {torch.__version__}, {mkl}, "
            f"numpy {paths['numpy_version']}, Python {platform.python_version()}")


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _mkl_version() -> str:
    import re

    import torch

    found = re.search(r"Math Kernel Library Version ([\d.]+)", torch.__config__.show())
    return found[1] if found else "?"


def set_seed(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (model initialisation)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
