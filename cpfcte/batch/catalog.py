"""The catalog of runs: which runs exist for a profile, which runs each table and figure reads,
and what a run folder holds. The batch runner (``cpfcte.batch``) executes the catalog's runs;
the report (``cpfcte.report``) reads their results; neither imports the other.

The catalog is declared in one file, ``notebooks/batches.yaml``:

* ``runs``: name → notebook, parameters, the runs it ``needs``, optionally the batch profiles it
  belongs to (``profiles: {batch profile: notebook profile}``) and ``seeds`` per profile (seed 0
  keeps the plain name, seed s becomes ``<name>_s<s>``). A report run declares the tables and
  figures it writes (``reports: [table4, fig7]`` or ``all``) instead of ``needs``: its needs
  are the runs those groups read, so it cannot start before one of them.
* ``groups``: table or figure → the runs it reads (``runs``, or ``rows``: label → run per
  level) and the level at which they are scored per profile. ``group_reads`` is the one answer
  to "which runs does this table read", used by the report to read and by the batch to wait.

Each run executes into ``runs/<profile>/<name>/``; its ``run.json`` (written by the batch) says
whether it is done, and its ``metrics.json`` (written by the stage) holds the scores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from cpfcte.machinery.config import base_profile
from cpfcte.machinery.errors import CpfcteError
from cpfcte.machinery.io import read_json
from cpfcte.machinery.paths import project_root, runs_dir

RUN_FILE = "run.json"
STAGES = ("overview", "data", "train", "pseudo", "deeplab", "report", "explore")


@dataclass
class Run:
    name: str
    notebook: str
    params: dict[str, Any] = field(default_factory=dict)
    needs: list[str] = field(default_factory=list)
    profiles: dict[str, str] | None = None   # batch profile → notebook profile; None: same
    seeds: dict[str, list[int]] | None = None  # batch profile → seeds; None: one run
    reports: list[str] | None = None         # a report run: the groups it writes
    stage: str | None = None                 # the stage its notebook drives (its metadata)

    def profile_for(self, batch_profile: str) -> str | None:
        """The profile the notebook runs with, or None when the run is not part of this
        batch profile (e.g. the COCO runs of a voc batch). A profile of yours runs as the
        built-in profile it extends, with itself in place of that profile; the runs that
        use another profile there (the toy's COCO twin) are not part of it."""
        if self.profiles is None:
            return batch_profile
        if batch_profile in self.profiles:
            return self.profiles[batch_profile]
        base = base_profile(batch_profile)
        return batch_profile if self.profiles.get(base) == base else None


@dataclass
class Batch:
    runs: dict[str, Run]
    groups: dict[str, dict[str, Any]]
    path: Path


def batch_file() -> Path:
    return project_root() / "notebooks" / "batches.yaml"


def notebook_stage(path: Path) -> str | None:
    """The stage a notebook drives, from its metadata (``"cpfcte": {"stage": ...}``)."""
    if not path.is_file():
        raise CpfcteError(f"{path}: notebook not found")
    return _notebook_stage(str(path), path.stat().st_mtime)


@lru_cache(maxsize=64)
def _notebook_stage(path: str, mtime: float) -> str | None:
    try:
        meta = json.loads(Path(path).read_text()).get("metadata", {})
    except json.JSONDecodeError as e:
        raise CpfcteError(f"{path}: not a valid notebook ({e})") from None
    stage = (meta.get("cpfcte") or {}).get("stage")
    if stage is not None and stage not in STAGES:
        raise CpfcteError(f"{path}: metadata cpfcte.stage={stage!r} is not one of {STAGES}")
    return stage


def load_batch(path: str | Path | None = None) -> Batch:
    path = Path(path) if path else batch_file()
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise CpfcteError(f"{path}: batch file not found") from None
    except yaml.YAMLError as e:
        raise CpfcteError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict) or "runs" not in raw:
        raise CpfcteError(f"{path}: a batch file needs a 'runs' mapping")
    groups = raw.get("groups") or {}
    runs: dict[str, Run] = {}
    keys = {"notebook", "params", "needs", "profiles", "seeds", "reports"}
    for name, spec in raw["runs"].items():
        spec = spec or {}
        unknown = set(spec) - keys
        if unknown or "notebook" not in spec:
            raise CpfcteError(f"{path}: run {name!r} needs 'notebook' and may have "
                              f"{', '.join(repr(k) for k in sorted(keys - {'notebook'}))} "
                              f"(unknown: {sorted(unknown)})")
        for need in spec.get("needs", []):
            if need not in runs:
                raise CpfcteError(f"{path}: run {name!r} needs {need!r}, which is not declared "
                                  "above it")
        reports = spec.get("reports")
        if reports is not None:
            reports = list(groups) if reports == "all" else list(reports)
            for group in reports:
                if group not in groups:
                    raise CpfcteError(f"{path}: run {name!r} reports {group!r}, which is not a "
                                      f"group (groups: {', '.join(groups)})")
        nb = path.parent / spec["notebook"]
        runs[name] = Run(name, spec["notebook"], dict(spec.get("params") or {}),
                         list(spec.get("needs") or []), spec.get("profiles"), spec.get("seeds"),
                         reports, notebook_stage(nb) if nb.is_file() else None)
    order = list(runs)
    for gname, group in groups.items():
        for r in group_runs(group):
            if r not in runs:
                raise CpfcteError(f"{path}: group {gname!r} names unknown run {r!r}")
    for run in runs.values():
        for gname in run.reports or []:
            late = [r for r in group_runs(groups[gname])
                    if order.index(r) > order.index(run.name)]
            if late:
                raise CpfcteError(f"{path}: report run {run.name!r} reports {gname!r}, which "
                                  f"reads {late[0]!r}, declared below it")
    return Batch(runs, groups, path)


def group_runs(group: dict) -> list[str]:
    """Every run a group names, at every level: its ``runs`` and the runs of its ``rows``."""
    names = list(group.get("runs", []))
    for row in (group.get("rows") or {}).values():
        names += list(row.values()) if isinstance(row, dict) else [row]
    return list(dict.fromkeys(names))


def group_level(group: dict, profile: str) -> str:
    """The level at which a group is scored for a batch profile."""
    levels = group.get("level") or {}
    return levels.get(profile, levels.get(base_profile(profile), "pseudo-label"))


def group_rows(group: dict, profile: str) -> dict[str, str]:
    """{row label: run} of a group with rows, at the profile's level."""
    level = group_level(group, profile)
    return {label: (row[level] if isinstance(row, dict) else row)
            for label, row in (group.get("rows") or {}).items()}


def group_reads(group: dict, profile: str) -> list[str]:
    """The runs (before seed expansion) whose results a group's table or figure reads for a
    batch profile. The report reads exactly these; a report run waits for exactly these."""
    return list(dict.fromkeys(list(group.get("runs", [])) +
                              list(group_rows(group, profile).values())))


def seeded_name(name: str, seed: int) -> str:
    """Seed 0 keeps the plain name; other seeds get ``_s<seed>``."""
    return name if seed == 0 else f"{name}_s{seed}"


def expand(batch: Batch, profile: str) -> tuple[dict[str, Run], dict[str, str]]:
    """The concrete runs of a batch profile: seeded runs expanded per seed (a need that is
    seeded too follows the same seed), report runs given the runs their groups read as needs,
    each with the profile its notebook runs with. Returns (runs, {name: notebook profile});
    runs outside the profile are left out."""
    runs: dict[str, Run] = {}
    profiles: dict[str, str] = {}
    seeds_of: dict[str, list[int]] = {}
    for name, run in batch.runs.items():
        nb_profile = run.profile_for(profile)
        if nb_profile is None:
            continue
        declared = list(run.needs)
        if run.reports is not None:
            declared += [r for g in run.reports for r in group_reads(batch.groups[g], profile)
                         if r in seeds_of]            # the runs of this profile
            declared = list(dict.fromkeys(declared))
        if any(n not in seeds_of for n in declared):
            continue
        seeds = ((run.seeds or {}).get(profile, run.seeds.get(base_profile(profile), [0]))
                 if run.seeds is not None else [0])
        seeds_of[name] = seeds
        for seed in seeds:
            needs = []
            for n in declared:
                if batch.runs[n].seeds is None:
                    needs.append(n)
                elif run.seeds is not None:          # a seeded run follows its own seed
                    needs.append(seeded_name(n, seed))
                else:                                # an unseeded run waits for every seed
                    needs += [seeded_name(n, s) for s in seeds_of[n]]
            if any(n not in runs for n in needs):
                continue
            params = {k: (seeded_name(v, seed) if v in run.needs and batch.runs[v].seeds
                          is not None else v) for k, v in run.params.items()}
            if run.seeds is not None:
                params["seed"] = seed
            if run.reports is not None:
                params["reports"] = ",".join(run.reports)
            concrete = seeded_name(name, seed) if run.seeds is not None else name
            runs[concrete] = Run(concrete, run.notebook, params, needs, run.profiles,
                                 reports=run.reports, stage=run.stage)
            profiles[concrete] = nb_profile
    return runs, profiles


def seed_runs(profile: str, base: str, batch: Batch | None = None) -> list[str]:
    """The run names of ``base`` in this profile's batch: base, base_s1, ... (seeds); empty
    when the run is not part of the profile."""
    runs, _ = expand(batch or load_batch(), profile)
    return [n for n in runs if n == base or (n.startswith(f"{base}_s") and
                                             n[len(base) + 2:].isdigit())]


# ---------------------------------------------------------------------------------------------
# run folders


def run_dir(profile: str, run: str) -> Path:
    return runs_dir() / profile / run


def run_status(folder: Path) -> dict:
    """The batch's record of a run (``run.json``), or {} when there is none."""
    path = folder / RUN_FILE
    if not path.exists():
        return {}
    try:
        return read_json(path)
    except CpfcteError:
        return {}


def run_metrics(profile: str, run: str) -> tuple[dict | None, str]:
    """(metrics, note): the metrics.json of a run, or None and why it is missing."""
    folder = run_dir(profile, run)
    status = run_status(folder)
    if status.get("status") == "failed":
        return None, f"failed: see runs/{profile}/{run}/{status.get('notebook', '')}"
    path = folder / "metrics.json"
    if not path.exists():
        return None, f"not run (runs/{profile}/{run})"
    return read_json(path), ""
