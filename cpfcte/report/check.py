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


@dataclass
class Comparison:
    """Two versions of one table, cell by cell: ``equal`` and ``differ`` count the cells both
    give; ``missing`` the committed cells with a number for which this machine has none (their
    runs are not here), which cannot be compared."""

    equal: int = 0
    differ: list = None
    missing: list = None

    def __post_init__(self):
        self.differ = self.differ or []
        self.missing = self.missing or []

    @property
    def compared(self) -> int:
        return self.equal + len(self.differ)


def compare(name: str, committed: str, here: str) -> Comparison:
    """Compare two CSV tables; rows matched by their first cells."""
    old, new = (list(csv.reader(io.StringIO(t))) for t in (committed, here))
    header = new[0] if new else []
    result = Comparison()
    if not old or old[0] != header:
        result.differ.append(Difference(name, "header", "", " | ".join(old[0] if old else []),
                                        " | ".join(header)))
        return result
    width = _key_width(header)
    old_rows = {tuple(r[:width]): r for r in old[1:]}
    for row in new[1:]:
        key = tuple(row[:width])
        before = old_rows.pop(key, None)
        label = _row_label(header, key)
        if before is None:
            result.differ.append(Difference(name, label, "", "(no such row)", " | ".join(row)))
            continue
        for column, a, b in zip(header[width:], before[width:], row[width:]):
            if a == b:
                result.equal += 1
            elif _first_number(a) is not None and _first_number(b) is None:
                result.missing.append(Difference(name, label, column, a, b))
            else:
                result.differ.append(Difference(name, label, column, a, b))
    for key in old_rows:
        result.differ.append(Difference(name, _row_label(header, key), "", "(row)",
                                        "(missing here)"))
    return result


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


def regenerated_here(name: str, profile: str, path: Path) -> bool:
    """Whether ``path`` is the file a report of this machine wrote from its runs (the record in
    ``runs/<profile>/.report/``, with the file's sha256): not the committed table, nor one
    edited since."""
    from cpfcte.machinery.io import read_json, sha256_file
    from cpfcte.report import written_record

    record = written_record(name, profile)
    if not (record.is_file() and path.is_file()):
        return False
    try:
        csv_file = read_json(record)["files"]["csv"]
    except (KeyError, TypeError, ValueError, CpfcteError):
        return False
    return (csv_file.get("path") == str(path.resolve())
            and csv_file.get("sha256") == sha256_file(path))


def check(profile: str = "toy") -> tuple[bool, list[str]]:
    """(reproduced, report lines) for the tables of ``profile``: each table this machine
    regenerated from its runs, compared with the committed one cell by cell, and the counts."""
    from cpfcte.machinery.paths import runs_dir
    from cpfcte.report.tables import suffix

    folder = output_dir("tables")
    lines, any_reference, regenerated = [], False, 0
    total = Comparison()
    for name in TABLES:
        file = f"{name}{suffix(profile)}.csv"
        here_path = folder / file
        reference = committed_text(f"tables/{file}")
        if reference is None:
            lines.append(f"{name}: no committed reference for profile {profile}")
            continue
        any_reference = True
        if not regenerated_here(name, profile, here_path):
            lines.append(f"{name}: not regenerated on this machine (no report of its runs in "
                         f"{runs_dir() / profile}): not compared")
            continue
        regenerated += 1
        result = compare(name, reference, here_path.read_text())
        total.equal += result.equal
        total.differ += result.differ
        total.missing += result.missing
        parts = [f"{result.compared} cells compared, {result.equal} equal, "
                 f"{len(result.differ)} differ"]
        if result.missing:
            parts.append(f"{len(result.missing)} not compared (their runs are not here)")
        lines.append(f"{name}: " + ", ".join(parts))
        lines += [f"  DIFFERS {d}" for d in result.differ]
        lines += [f"  not run here: {d}" for d in result.missing]
    counts = (f"{regenerated} of {len(TABLES)} tables regenerated here; {total.compared} cells "
              f"compared, {total.equal} equal, {len(total.differ)} differ, "
              f"{len(total.missing)} not compared (not run here)")
    if not any_reference:
        return False, [f"no committed tables for profile {profile} to compare with"] + lines
    if regenerated == 0:
        return False, [f"nothing to compare: no table of profile {profile} was regenerated on "
                       f"this machine (runs/{profile} holds no run they read). Run make paper "
                       f"(or cpfcte paper --profile {profile} --only table1) first; the "
                       "tables in tables/ are the committed ones"] + lines
    ok = not total.differ
    if ok and (total.missing or regenerated < len(TABLES)):
        head = f"reproduced where compared, partly: {counts}"
    elif ok:
        head = f"reproduced: every cell of every table as committed ({counts})"
    else:
        head = f"NOT reproduced: {counts}"
    from cpfcte.report.readme import in_step

    if in_step() is False:
        lines.append("README.md: its Results table is not what tables/ gives; cpfcte report "
                     "writes it again")
    from cpfcte.machinery.numerics import native_reason

    reason = native_reason()
    if reason and not ok:                      # not a failure of reproduction on this machine
        ok = True
        head = (f"differences expected on this machine: numerics native ({reason}); the "
                "committed tables come from the pinned code paths, so digits may differ "
                f"here, as the tables' provenance lines say ({counts})")
    return ok, [head] + lines
