"""Does this machine reproduce the committed tables? ``cpfcte paper --check`` (and the last lines
of ``make paper``) compare the tables this machine wrote (``tables/*.csv``) with the ones
committed in git (``HEAD``), cell by cell, and name each cell that differs and by how much."""

from __future__ import annotations

import csv
import io
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cpfcte.machinery.errors import CpfcteError
from cpfcte.machinery.paths import output_dir, project_root

NUMBER = re.compile(r"[-+−]?\d+(?:\.\d+)?")
TABLES = ("table1", "table2", "table3", "table4", "table5")


@dataclass
class Difference:
    table: str
    row: str
    column: str
    committed: str
    here: str

    @property
    def delta(self) -> str:
        a, b = _first_number(self.committed), _first_number(self.here)
        return "" if a is None or b is None else f" (Δ {b - a:+.1f})"

    def __str__(self) -> str:
        return (f"{self.table}, row {self.row!r}, column {self.column!r}: committed "
                f"{self.committed!r}, this machine {self.here!r}{self.delta}")


def _first_number(text: str) -> float | None:
    found = NUMBER.search(text)
    return float(found[0].replace("−", "-")) if found else None


def committed_text(relative: str, root: Path | None = None) -> str | None:
    """A file as committed at git HEAD, or None when it is not committed."""
    root = root or project_root()
    try:
        done = subprocess.run(["git", "show", f"HEAD:{relative}"], cwd=root,
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        raise CpfcteError(f"cannot run git to read the committed tables ({e}); --check compares "
                          "with the tables committed in a git clone of the project") from None
    if done.returncode != 0:
        if "not a git repository" in done.stderr:
            raise CpfcteError(f"{root} is not a git clone: --check compares with the tables "
                              "committed in git; clone the repository to use it")
        return None
    return done.stdout


def compare(name: str, committed: str, here: str) -> tuple[int, list[Difference]]:
    """(cells compared, differences) of two CSV tables; rows matched by their first cells."""
    old, new = (list(csv.reader(io.StringIO(t))) for t in (committed, here))
    header = new[0] if new else []
    if not old or old[0] != header:
        return 1, [Difference(name, "header", "", " | ".join(old[0] if old else []),
                              " | ".join(header))]
    width = _key_width(header)
    old_rows = {tuple(r[:width]): r for r in old[1:]}
    cells, diffs = 0, []
    for row in new[1:]:
        key = tuple(row[:width])
        before = old_rows.pop(key, None)
        label = _row_label(header, key)
        if before is None:
            diffs.append(Difference(name, label, "", "(no such row)", " | ".join(row)))
            continue
        for column, a, b in zip(header[width:], before[width:], row[width:]):
            cells += 1
            if a != b:
                diffs.append(Difference(name, label, column, a, b))
    for key in old_rows:
        diffs.append(Difference(name, _row_label(header, key), "", "(row)", "(missing here)"))
    return cells, diffs


def _row_label(header: list[str], key: tuple[str, ...]) -> str:
    """A row's name for the reader: its label cells, a ✓ named by its column (Tables 4 and 5
    mark their rows with ✓ only)."""
    parts = [column if cell == "✓" else cell for column, cell in zip(header, key) if cell]
    return (" + ".join(parts) if any(c == "✓" for c in key) else " ".join(parts)) or "(row)"


def _key_width(header: list[str]) -> int:
    """How many leading columns name a row: everything before the first mIoU column."""
    for i, column in enumerate(header):
        if column.startswith("mIoU"):
            return i
    return 1


def check(profile: str = "toy") -> tuple[bool, list[str]]:
    """(reproduced, report lines) for the tables of ``profile``."""
    from cpfcte.report.tables import suffix

    folder = output_dir("tables")
    lines, ok, any_reference = [], True, False
    for name in TABLES:
        file = f"{name}{suffix(profile)}.csv"
        here_path = folder / file
        reference = committed_text(f"tables/{file}")
        if reference is None:
            lines.append(f"{name}: no committed reference for profile {profile}")
            continue
        any_reference = True
        if not here_path.is_file():
            lines.append(f"{name}: not written on this machine ({here_path})")
            ok = False
            continue
        cells, diffs = compare(name, reference, here_path.read_text())
        if diffs:
            ok = False
            lines.append(f"{name}: {len(diffs)} of {cells} cells differ from the committed table")
            lines += [f"  {d}" for d in diffs]
        else:
            lines.append(f"{name}: all {cells} cells as committed")
    if not any_reference:
        ok = False
    head = ("reproduced: every table equals the committed one, cell by cell" if ok else
            "NOT reproduced: see the cells below" if any_reference else
            f"no committed tables for profile {profile} to compare with")
    from cpfcte.machinery.numerics import native_reason

    reason = native_reason()
    if reason and any_reference and not ok:     # not a failure of reproduction on this machine
        ok = True
        head = (f"differences expected on this machine: numerics native ({reason}); the "
                "committed tables come from the pinned AVX2 code paths, so digits may differ "
                "here (the cells below), as the tables' provenance lines say")
    return ok, [head] + lines
