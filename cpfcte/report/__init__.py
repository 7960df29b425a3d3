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
        if not has_runs(name, profile):     # never replace a table with an emptier one
            continue
        paths = ARTIFACTS[name](profile)
        if paths:
            record_written(name, profile, paths)
            out[name] = paths
    if out:                               # the README's Results table follows the tables
        from cpfcte.report.readme import update_readme

        update_readme()
    return out


def artifacts_for(only: list[str] | None, profile: str) -> list[str]:
    """The tables and figures a batch limited to ``only`` (groups or run names; None: all)
    makes: the groups named, and those that read a run named."""
    from cpfcte.batch import catalog

    if not only:
        return list(ARTIFACTS)
    import re

    groups = catalog.load_batch().groups
    runs = {re.sub(r"_s\d+$", "", o) for o in only if o not in ARTIFACTS}   # a seed's base
    return [name for name in ARTIFACTS if name in only or
            runs & set(catalog.group_reads(groups[name], profile))]


def missing_runs(name: str, profile: str) -> list[str]:
    """The runs that the table or figure ``name`` reads for ``profile`` (every seed) and that
    were never made: neither results (metrics.json) nor a recorded failure."""
    from cpfcte.batch import catalog

    batch = catalog.load_batch()
    reads = catalog.group_reads(batch.groups[name], profile)
    # the profile's runs of those (a run outside the profile, as the COCO-init DeepLabv2 on the
    # toy, is not applicable); a profile outside the batch: the runs by their plain names
    runs = [r for base in reads for r in catalog.seed_runs(profile, base, batch)] or reads
    missing = []
    for run in runs:
        metrics, why = catalog.run_metrics(profile, run)
        if metrics is None and not why.startswith("failed"):
            missing.append(run)
    return missing


def has_runs(name: str, profile: str) -> bool:
    """Whether every run that the table or figure ``name`` reads has been made for
    ``profile`` (results, or a failure the table points to). Otherwise the report leaves the
    file as it is: the committed table stays, never replaced by one with emptier cells."""
    return not missing_runs(name, profile)


def written_record(name: str, profile: str) -> Path:
    """Where the report notes what it wrote of ``name`` for ``profile`` (the files and their
    sha256): ``runs/<profile>/.report/<name>.json``. ``paper --check`` compares only the tables
    a report of this machine wrote from its runs."""
    from cpfcte.machinery.paths import runs_dir

    return runs_dir() / profile / ".report" / f"{name}.json"


def record_written(name: str, profile: str, paths: dict[str, Path]) -> None:
    from cpfcte.machinery.io import sha256_file, write_json

    record = written_record(name, profile)
    record.parent.mkdir(parents=True, exist_ok=True)
    write_json(record, {"name": name, "profile": profile,
                        "files": {kind: {"path": str(Path(p).resolve()),
                                         "sha256": sha256_file(p)}
                                  for kind, p in paths.items()}})


def show(outputs: dict[str, dict[str, Path]], names: str | list[str] | None = None,
         profile: str = "toy") -> None:
    """Display written tables (Markdown) and figures (PNG) in a notebook. A table or figure
    whose runs are not here is shown as it stands in tables/ or figures/ (the committed one, on
    a fresh clone), and said to be so; one that does not exist is named."""
    from IPython.display import Image, Markdown, display

    from cpfcte.machinery.paths import output_dir
    from cpfcte.report.tables import suffix

    wanted = list(ARTIFACTS) if names in (None, "all") else [
        n.strip() for n in (names.split(",") if isinstance(names, str) else names)]
    for name in wanted:
        paths = outputs.get(name)
        if paths is None:
            md = output_dir("tables") / f"{name}{suffix(profile)}.md"
            png = output_dir("figures") / f"{name}{suffix(profile)}.png"
            found = md if md.is_file() else png if png.is_file() else None
            if found is None:
                print(f"{name}: its runs have not been made yet (make paper makes them)")
                continue
            missing = missing_runs(name, profile)
            some = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more"
                                             if len(missing) > 4 else "")
            display(Markdown(f"*{name}: the committed {found.parent.name}/{found.name}, not "
                             f"regenerated here: {len(missing)} of its runs are not in "
                             f"runs/{profile} ({some}; `make paper` makes them)*"))
            paths = {"md": found} if found is md else {"png": found}
        display(Markdown(paths["md"].read_text()) if "md" in paths
                else Image(filename=str(paths["png"])))


def show_notes(outputs: dict[str, dict[str, Path]], names: str | list[str] | None = None,
               profile: str = "toy") -> None:
    """Display each table's notes file (the written one, else the one in tables/): how it is
    scored and its full provenance; then the interpretation notes, once (every notes file
    ends with the same list)."""
    from IPython.display import Markdown, display

    from cpfcte.machinery.paths import output_dir
    from cpfcte.report.tables import suffix

    wanted = list(ARTIFACTS) if names in (None, "all") else [
        n.strip() for n in (names.split(",") if isinstance(names, str) else names)]
    tail = None
    for name in wanted:
        path = (outputs.get(name) or {}).get("notes") or (
            output_dir("tables") / f"{name}{suffix(profile)}.notes.md")
        if not Path(path).is_file():
            continue
        text = Path(path).read_text()
        head, sep, rest = text.partition("\n## Interpretation notes")
        display(Markdown(head))
        tail = tail or (sep + rest if sep else None)
    if tail:
        display(Markdown(tail.lstrip("\n")))


def write_all(profile: str = "toy") -> dict[str, dict[str, Path]]:
    """Every table and figure of the paper that this profile's runs can make."""
    return write(profile)
