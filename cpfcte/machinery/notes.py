"""Our interpretation notes, read from their one home: ``docs/interpretation.md``.

The code cites a note as "note N", each table's notes file lists every note's one-line summary
with its number, and notebook 00 renders the whole file, so all three use the same numbers and
words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cpfcte.machinery.errors import CpfcteError

NOTES_PATH = "docs/interpretation.md"
_HEADING = re.compile(r"^## (\d+)\. (.+)$")
_SHORT = re.compile(r"^\*In short:\* (.+)$")


@dataclass(frozen=True)
class Note:
    number: int
    title: str
    short: str        # the line the tables print
    text: str         # the reasoning (markdown)


def notes_file() -> Path:
    from cpfcte.machinery.paths import project_root

    return project_root() / NOTES_PATH


@lru_cache(maxsize=4)
def _parse(path: str, mtime: float) -> tuple[Note, ...]:
    notes, number, title, short, body = [], None, "", "", []

    def close() -> None:
        if number is not None:
            if not short:
                raise CpfcteError(f"{path}: note {number} has no '*In short:* ...' line")
            notes.append(Note(number, title, short, "\n".join(body).strip()))

    for line in Path(path).read_text().splitlines():
        heading = _HEADING.match(line)
        if heading:
            close()
            number, title, short, body = int(heading[1]), heading[2].strip(), "", []
        elif number is not None and (m := _SHORT.match(line)) and not short:
            short = m[1].strip()
        elif number is not None:
            body.append(line)
    close()
    numbers = [n.number for n in notes]
    if numbers != list(range(1, len(notes) + 1)):
        raise CpfcteError(f"{path}: notes must be numbered 1, 2, 3, ... in order (got {numbers})")
    return tuple(notes)


def all_notes() -> tuple[Note, ...]:
    path = notes_file()
    if not path.is_file():
        raise CpfcteError(f"{path}: the interpretation notes are missing from this checkout "
                          "(restore it with `git checkout -- docs/interpretation.md`)")
    return _parse(str(path), path.stat().st_mtime)


def note(number: int) -> Note:
    for n in all_notes():
        if n.number == number:
            return n
    raise CpfcteError(f"no interpretation note {number} in {notes_file()}")


def markdown() -> str:
    """The whole notes file, for notebook 00."""
    return notes_file().read_text()
