"""cpfcte: a reproducible companion to *Context Patch Fusion With Class Token Enhancement for
Weakly Supervised Semantic Segmentation* (CPF-CTE).

The library holds all logic; the numbered notebooks in ``notebooks/`` are thin drivers over it.
"""

__version__ = "0.1.0"

from cpfcte.errors import CpfcteError  # noqa: E402,F401
