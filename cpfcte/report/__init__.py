"""Tables and figures from the run folders: ``tables/*.{md,csv,tex}``, each table's notes and
full provenance (``tables/*.notes.md``), ``figures/*.{png,pdf}``.

    results.py     a run's metrics over its seeds, one cell per value (mean ± std)
    provenance.py  code, profile, dataset, configs, seeds, hardware, run time of a table
    tables.py      Tables 1-5, the paper's value beside this run's
    figures.py     Figs. 4-7 (Figs. 6 and 7 through ``cpfcte.plots``)

Everything is read through the catalog (``cpfcte.batch.catalog``), from exactly the runs each
table's or figure's group reads; the report never imports the batch runner. Each artifact is
named as its group in ``notebooks/batches.yaml``.
"""

from __future__ import annotations

from pathlib import Path

from cpfcte.report.figures import fig4, fig5, fig6, fig7
from cpfcte.report.tables import table1, table2, table3, table4, table5

ARTIFACTS = {"table1": table1, "table2": table2, "table3": table3, "table4": table4,
             "table5": table5, "fig4": fig4, "fig5": fig5, "fig6": fig6, "fig7": fig7}


def write(profile: str = "toy", names: str | list[str] | None = None) -> dict[str, dict[str, Path]]:
    """Write the named tables and figures (a list, a comma-separated string, "all" or None for
    all) that this profile's runs can make; returns {name: {format: path}}."""
    from cpfcte.machinery.errors import CpfcteError

    if names is None or names == "all":
        names = list(ARTIFACTS)
    elif isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in ARTIFACTS]
    if unknown:
        raise CpfcteError(f"unknown table or figure {unknown[0]!r} (known: {', '.join(ARTIFACTS)})")
    from cpfcte.machinery.io import clean_partial
    from cpfcte.machinery.paths import output_dir

    for kind in ("tables", "figures"):     # a write of these artifacts cut short by a kill
        clean_partial(output_dir(kind), [f"{n}.{ext}" for n in names for ext in
                                         ("md", "csv", "tex", "notes.md", "png", "pdf")])
    out = {}
    for name in names:
        paths = ARTIFACTS[name](profile)
        if paths:
            out[name] = paths
    return out


def show(outputs: dict[str, dict[str, Path]], names: str | list[str] | None = None) -> None:
    """Display written tables (Markdown) and figures (PNG) in a notebook; name the ones whose
    runs have not been made."""
    from IPython.display import Image, Markdown, display

    for paths in outputs.values():
        display(Markdown(paths["md"].read_text()) if "md" in paths
                else Image(filename=str(paths["png"])))
    wanted = list(ARTIFACTS) if names in (None, "all") else (
        names.split(",") if isinstance(names, str) else names)
    for name in wanted:
        if name.strip() not in outputs:
            print(f"{name.strip()}: its runs have not been made yet")


def show_notes(outputs: dict[str, dict[str, Path]]) -> None:
    """Display each written table's notes file: how it is scored, its full provenance and the
    interpretation notes."""
    from IPython.display import Markdown, display

    for paths in outputs.values():
        if "notes" in paths:
            display(Markdown(paths["notes"].read_text()))


def write_all(profile: str = "toy") -> dict[str, dict[str, Path]]:
    """Every table and figure of the paper that this profile's runs can make."""
    return write(profile)
