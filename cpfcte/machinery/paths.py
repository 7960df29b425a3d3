"""Where things live: the project root, the data folder and the runs folder.

Notebooks run with their own folder as working directory (JupyterLab, nbval, papermill), so
every default path is resolved from the project root, found by walking up to ``pyproject.toml``.
``CPFCTE_DATA`` and ``CPFCTE_RUNS`` override the two data-carrying folders and ``CPFCTE_OUT``
the root of ``tables/`` and ``figures/`` (tests use them).
"""

from __future__ import annotations

import os
from pathlib import Path


def project_root(start: Path | None = None) -> Path:
    """The folder holding the project's ``pyproject.toml`` (searched from ``start`` or the cwd
    upwards, then from this file); falls back to the current directory."""
    candidates = [Path(start or Path.cwd()).resolve(), Path(__file__).resolve().parent]
    for here in candidates:
        for folder in (here, *here.parents):
            if (folder / "pyproject.toml").is_file() and (folder / "cpfcte").is_dir():
                return folder
    return Path.cwd().resolve()


def data_dir() -> Path:
    """Root of the datasets (``data/`` in the project unless ``CPFCTE_DATA`` is set)."""
    env = os.environ.get("CPFCTE_DATA")
    return Path(env).resolve() if env else project_root() / "data"


def runs_dir() -> Path:
    """Root of the run folders (``runs/`` in the project unless ``CPFCTE_RUNS`` is set)."""
    env = os.environ.get("CPFCTE_RUNS")
    return Path(env).resolve() if env else project_root() / "runs"


def output_dir(kind: str) -> Path:
    """Where the report writes ``tables`` and ``figures``: the project's own folders unless
    ``CPFCTE_OUT`` names another root (the notebook tests use one, so that running the report
    notebooks never overwrites the project's tables and figures)."""
    env = os.environ.get("CPFCTE_OUT")
    return (Path(env).resolve() if env else project_root()) / kind


def resolve(path: str | Path, base: Path) -> Path:
    """``path`` as given if absolute, else relative to ``base``."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base / p)


def cache_dir() -> Path:
    """Where fetched release bundles are kept, keyed by sha256 (``CPFCTE_CACHE``, else
    ``$XDG_CACHE_HOME/cpfcte``, else ``~/.cache/cpfcte``)."""
    env = os.environ.get("CPFCTE_CACHE")
    if env:
        return Path(env).resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "cpfcte"


def code_commit() -> str:
    """The project's git commit (short), with ``+dirty`` when ``cpfcte/`` or ``notebooks/``
    hold uncommitted changes; ``unknown`` outside a git clone."""
    import subprocess

    root = project_root()
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "cpfcte", "notebooks"],
                               cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_path(profile: str, run_name: str) -> Path:
    """The folder of a run: ``runs/<profile>/<run_name>`` for a plain name, ``runs/<run_name>``
    for a name with a slash (``toy/train_full``: the batch runner names runs so; a leading
    ``runs/``, as a path from the project's root, is the same folder), or the path itself when
    absolute."""
    if not str(run_name).strip() or str(run_name) != str(run_name).strip():
        from cpfcte.machinery.errors import CpfcteError

        raise CpfcteError(f"run name {run_name!r}: give a name without leading or trailing "
                          "spaces (it names a folder under runs/)")
    p = Path(run_name)
    if p.is_absolute():
        return p
    for name, what in ((run_name, "run name"), (profile, "profile name")):
        if ".." in Path(name).parts or Path(name).is_absolute() and what == "profile name":
            from cpfcte.machinery.errors import CpfcteError

            raise CpfcteError(f"{what} {name!r} would leave runs/: use a plain name (or an "
                              "absolute folder for a run)")
    if len(p.parts) > 1 and p.parts[0] == "runs":  # runs/toy/train_full, as ls shows it
        p = Path(*p.parts[1:])
    if len(p.parts) > 1:
        return runs_dir() / p
    return runs_dir() / profile / run_name
