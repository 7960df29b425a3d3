"""cpfcte: a reproducible companion to *Context Patch Fusion With Class Token Enhancement for
Weakly Supervised Semantic Segmentation* (CPF-CTE).

The library holds all logic; the numbered notebooks in ``notebooks/`` are thin drivers over it.
Importing it pins the CPU code paths of numpy, torch and MKL (``cpfcte.machinery.numerics``) before they
load, so that a run gives the same bits on every AVX2 machine.
"""

from cpfcte.machinery.numerics import pin_environment as _pin

_LOADED_BEFORE_PINNING = _pin()   # numpy / torch imported before cpfcte: see numerics.check

__version__ = "0.1.0"

from cpfcte.machinery.faults import claim as _claim_faults  # noqa: E402

_claim_faults()                   # fault injection (benchmarks only): this process, not its children

from cpfcte.machinery.errors import CpfcteError  # noqa: E402,F401
