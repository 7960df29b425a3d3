"""Fault injection at the moment a stage's output is written, for ``benchmarks/fault_bench.py``
and the fault tests; without the variable below every function here does nothing.

    CPFCTE_FAULT=kill-write:N      SIGKILL this process during its N-th atomic write: the new
                                   file's bytes are in its temporary file, the target is not
                                   replaced yet (the worst moment for a checkpoint, a PNG, a
                                   table)
    CPFCTE_FAULT=ENOSPC-write:N    the N-th write fails as on a full disk
    CPFCTE_FAULT=EACCES-write:N    the N-th write fails as in a folder without write permission
    CPFCTE_FAULT=count             print "cpfcte-faults: N writes" to stderr at exit (how the
                                   benchmark learns the range to draw N from)

Writes are counted in the first process that imports cpfcte with the variable set (the
stage the benchmark started; ``claim`` records its pid in ``CPFCTE_FAULT_OWNER``); the processes
it starts (CRF pool workers, a batch's notebook kernels) inherit the variable but not the role,
and never fail here: a kill of the stage while they write is what the benchmark's kills at
random moments cover.
"""

from __future__ import annotations

import errno
import os
import signal

VARIABLE = "CPFCTE_FAULT"
OWNER = "CPFCTE_FAULT_OWNER"
KINDS = ("kill", "ENOSPC", "EACCES")
_writes = 0


def parse(spec: str) -> tuple[str, int]:
    """``"kill-write:3"`` → ``("kill", 3)``, ``"count"`` → ``("count", 0)``; anything else is
    a ``ValueError`` naming the forms."""
    if spec == "count":
        return "count", 0
    kind, sep, n = spec.partition("-write:")
    if not sep or kind not in KINDS or not n.isdigit() or int(n) < 1:
        raise ValueError(f"{VARIABLE}={spec!r}: expected one of "
                         f"{', '.join(k + '-write:N' for k in KINDS)} with N ≥ 1")
    return kind, int(n)


def claim() -> None:
    """Make this process the one whose writes fail, unless a parent already is (called when
    cpfcte is imported)."""
    if os.environ.get(VARIABLE) and not os.environ.get(OWNER):
        os.environ[OWNER] = str(os.getpid())


def on_write(target: os.PathLike | str) -> None:
    """Called by every atomic write just before its temporary file replaces ``target``."""
    global _writes
    spec = os.environ.get(VARIABLE)
    if not spec or os.environ.get(OWNER) != str(os.getpid()):
        return
    kind, n = parse(spec)
    _writes += 1
    if kind == "count":
        if _writes == 1:
            import atexit
            import sys

            atexit.register(lambda: print(f"cpfcte-faults: {_writes} writes", file=sys.stderr))
        return
    if _writes != n:
        return
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    code = errno.ENOSPC if kind == "ENOSPC" else errno.EACCES
    raise OSError(code, os.strerror(code), str(target))
