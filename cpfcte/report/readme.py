"""The README's Results table, generated from ``tables/*.csv`` so that it cannot drift from
them: ``cpfcte report`` (and so ``make paper``) rewrites the part of README.md between the two
markers, and tests/test_project.py checks that the committed README holds what the committed
tables give."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from cpfcte.machinery.io import write_text
from cpfcte.machinery.paths import output_dir

BEGIN = ("<!-- results: generated from tables/*.csv by cpfcte report (make paper); "
         "edit cpfcte/report/readme.py, not this table -->")
END = "<!-- /results -->"
# (README label, table, the table's rows (a first cell, or a row index for Tables 4 and 5,
# whose rows carry only ✓), how they join, the paper-scale profile of the table)
ROWS = (
    ("Table 1: pseudo labels on train, BPM", "table1", ["CPF-CTE w/o CRF"], "", "voc"),
    ("Table 1: pseudo labels on train, BPM + CRF", "table1", ["CPF-CTE"], "", "voc"),
    ("Table 2: DeepLabv2 + CRF, VOC val (toy: val)", "table2", ["CPF-CTE (DeepLabv2 + CRF)"],
     "", "voc"),
    ("Table 3: pseudo labels, COCO (toy: COCO path)", "table3", ["CPF-CTE (pseudo-label)"], "",
     "coco"),
    ("Table 3: DeepLabv2 + CRF, COCO val", "table3", ["CPF-CTE (DeepLabv2 + CRF)"], "", "coco"),
    ("Table 4: baseline → CPF-CTE", "table4", [0, 3], " → ", "voc"),
    ("Table 5: gap / gmp / top-k", "table5", [0, 1, 2], " / ", "voc"),
)
SEEDS = re.compile(r"\s*\(n=\d+\)$")


def _read(name: str, profile: str) -> list[list[str]] | None:
    suffix = "" if profile == "toy" else f".{profile}"
    path = output_dir("tables") / f"{name}{suffix}.csv"
    return list(csv.reader(io.StringIO(path.read_text()))) if path.is_file() else None


def _cells(table: list[list[str]] | None, rows: list, column: str) -> list[str] | None:
    """The cells of ``column`` (a header prefix) in ``rows``; None where the table lacks one."""
    if not table:
        return None
    header = table[0]
    col = next((i for i, h in enumerate(header) if h.startswith(column)), None)
    if col is None:
        return None
    found = []
    for row in rows:
        line = (table[1 + row] if isinstance(row, int) and row + 1 < len(table)
                else next((r for r in table[1:] if r and r[0] == row), None))
        if line is None or col >= len(line):
            return None
        found.append(SEEDS.sub("", line[col]) or "—")
    return found


def results_table() -> str:
    """The Markdown table: each measure, the paper's value, the toy's and the paper-scale
    profile's (voc; coco for Table 3) as the tables in ``tables/`` give them."""
    lines = ["| measure | paper | toy | voc / coco |", "|---|---|---|---|"]
    ran = False
    for label, name, rows, join, big in ROWS:
        toy = _read(name, "toy")
        paper = _cells(toy, rows, "mIoU paper")
        here = _cells(toy, rows, "mIoU this run")
        scaled = _cells(_read(name, big), rows, "mIoU this run")
        ran = ran or scaled is not None
        lines.append(f"| {label} | {join.join(paper) if paper else '—'} | "
                     f"{join.join(here) if here else '—'} | "
                     f"{join.join(scaled) if scaled else f'not run here ({big})'} |")
    lines.append("")
    lines.append("The last column is read from tables/*.voc.csv and tables/*.coco.csv.\n"
                 "`make paper PROFILE=voc` (or coco) writes them on a GPU." if ran else
                 "No paper-scale run has been made yet. The last column fills in when you run\n"
                 "`make paper PROFILE=voc` (or coco) on a GPU.")
    return "\n".join(lines)


def readme_path() -> Path:
    """The README beside ``tables/`` (the project's, unless CPFCTE_OUT names another root)."""
    return output_dir("tables").parent / "README.md"


def section(text: str) -> str | None:
    """What a README holds between the markers, or None without them."""
    if BEGIN not in text or END not in text:
        return None
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def in_step() -> bool | None:
    """Whether the README's Results table is what ``tables/`` gives (None: no README with the
    markers beside them)."""
    path = readme_path()
    held = section(path.read_text()) if path.is_file() else None
    return None if held is None else held == results_table()


def update_readme() -> Path | None:
    """Rewrite the README's Results table from ``tables/``; None when there is no README with
    the markers beside them (a test's output root)."""
    path = readme_path()
    if not path.is_file():
        return None
    text = path.read_text()
    if section(text) is None:
        return None
    before, rest = text.split(BEGIN, 1)
    after = rest.split(END, 1)[1]
    new = f"{before}{BEGIN}\n{results_table()}\n{END}{after}"
    if new != text:
        write_text(path, new)
    return path
