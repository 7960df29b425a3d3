"""The batch runner behind `make paper`: papermill executes each run of the batch file.

The batch file (``notebooks/batches.yaml``) declares runs (a notebook, its parameters, the runs
it needs) and groups (which runs feed which table or figure). For each run, in file order:

* its *stamp* hashes the notebook, the parameters, the profile file, the library's code and the
  stamps of the runs it needs;
* a run whose ``run.json`` says ``done`` with the same stamp is skipped;
* a run folder with another stamp is stale and is cleared; one with the same stamp that did not
  finish (killed, failed) is executed again and resumes (training from its checkpoint, pseudo
  labels from the PNGs already written);
* a failing run is recorded (``run.json``: status ``failed`` and the error) and the batch goes
  on; runs that need it are marked ``blocked``. The summary at the end lists them;
* a run may name the profiles it belongs to (``profiles: {toy: toy_coco, coco: coco}``: in a
  toy batch its notebook runs with the toy_coco profile, in a voc batch it does not run).

Results pass between runs as files in the run folders, never as notebook outputs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cpfcte.config import PROFILE_DIR
from cpfcte.errors import CpfcteError
from cpfcte.io import read_json, write_json
from cpfcte.paths import project_root, runs_dir

RUN_FILE = "run.json"


@dataclass
class Run:
    name: str
    notebook: str
    params: dict[str, Any] = field(default_factory=dict)
    needs: list[str] = field(default_factory=list)
    profiles: dict[str, str] | None = None   # batch profile → notebook profile; None: same
    seeds: dict[str, list[int]] | None = None  # batch profile → seeds; None: one run

    def profile_for(self, batch_profile: str) -> str | None:
        """The profile the notebook runs with, or None when the run is not part of this
        batch profile (e.g. the COCO runs of a voc batch)."""
        if self.profiles is None:
            return batch_profile
        return self.profiles.get(batch_profile)


@dataclass
class Batch:
    runs: dict[str, Run]
    groups: dict[str, dict[str, Any]]
    path: Path


def batch_file() -> Path:
    return project_root() / "notebooks" / "batches.yaml"


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
    runs: dict[str, Run] = {}
    for name, spec in raw["runs"].items():
        spec = spec or {}
        unknown = set(spec) - {"notebook", "params", "needs", "profiles", "seeds"}
        if unknown or "notebook" not in spec:
            raise CpfcteError(f"{path}: run {name!r} needs 'notebook' and may have 'params', "
                              f"'needs', 'profiles' and 'seeds' (unknown: {sorted(unknown)})")
        for need in spec.get("needs", []):
            if need not in runs:
                raise CpfcteError(f"{path}: run {name!r} needs {need!r}, which is not declared "
                                  "above it")
        runs[name] = Run(name, spec["notebook"], dict(spec.get("params") or {}),
                         list(spec.get("needs") or []), spec.get("profiles"), spec.get("seeds"))
    groups = raw.get("groups") or {}
    for gname, group in groups.items():
        for r in group_runs(group):
            if r not in runs:
                raise CpfcteError(f"{path}: group {gname!r} names unknown run {r!r}")
    return Batch(runs, groups, path)


def group_runs(group: dict) -> list[str]:
    """Every run a group reads: its ``runs`` list and the runs named in its ``rows``."""
    names = list(group.get("runs", []))
    for row in (group.get("rows") or {}).values():
        names += list(row.values()) if isinstance(row, dict) else [row]
    return list(dict.fromkeys(names))


def seeded_name(name: str, seed: int) -> str:
    """Seed 0 keeps the plain name; other seeds get ``_s<seed>``."""
    return name if seed == 0 else f"{name}_s{seed}"


def expand(batch: Batch, profile: str) -> tuple[dict[str, Run], dict[str, str]]:
    """The concrete runs of a batch profile: seeded runs expanded per seed (a need that is
    seeded too follows the same seed), each with the profile its notebook runs with. Returns
    (runs, {name: notebook profile}); runs outside the profile are left out."""
    runs: dict[str, Run] = {}
    profiles: dict[str, str] = {}
    seeds_of: dict[str, list[int]] = {}
    for name, run in batch.runs.items():
        nb_profile = run.profile_for(profile)
        if nb_profile is None or any(n not in seeds_of for n in run.needs):
            continue
        seeds = (run.seeds or {}).get(profile, [0]) if run.seeds is not None else [0]
        seeds_of[name] = seeds
        for seed in seeds:
            needs = []
            for n in run.needs:
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
            concrete = seeded_name(name, seed) if run.seeds is not None else name
            runs[concrete] = Run(concrete, run.notebook, params, needs, run.profiles)
            profiles[concrete] = nb_profile
    return runs, profiles


def code_version() -> str:
    """Hash of the library's sources and profiles: a change of code re-runs what it touches."""
    h = hashlib.sha256()
    pkg = Path(__file__).resolve().parent
    for p in sorted(list(pkg.rglob("*.py")) + list(PROFILE_DIR.glob("*.yaml"))):
        h.update(str(p.relative_to(pkg)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _stamp(run: Run, profile: str, notebook_dir: Path, code: str, need_stamps: list[str]) -> str:
    h = hashlib.sha256()
    nb = notebook_dir / run.notebook
    if not nb.is_file():
        raise CpfcteError(f"{nb}: notebook named by run {run.name!r} not found")
    profile_file = PROFILE_DIR / f"{profile}.yaml"
    for part in (nb.read_bytes(), json.dumps(run.params, sort_keys=True).encode(),
                 profile_file.read_bytes() if profile_file.exists() else profile.encode(),
                 code.encode(), *[s.encode() for s in need_stamps]):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def run_status(run_dir: Path) -> dict:
    path = run_dir / RUN_FILE
    if not path.exists():
        return {}
    try:
        return read_json(path)
    except CpfcteError:
        return {}


def select(batch: Batch, only: list[str] | None, runs: dict[str, Run] | None = None) -> list[str]:
    """Run names to execute: all, or those feeding the named groups/runs plus what they need.
    ``runs`` are the concrete (seed-expanded) runs; a group or template name selects every
    seed of its runs."""
    runs = runs if runs is not None else batch.runs
    if not only:
        return list(runs)
    wanted: set[str] = set()

    def add(base: str) -> None:
        wanted.update(n for n in runs if n == base or n.startswith(f"{base}_s"))

    for item in only:
        if item in batch.groups:
            for r in group_runs(batch.groups[item]):
                add(r)
        elif item in batch.runs or item in runs:
            add(item)
        else:
            raise CpfcteError(f"--only {item!r}: no such group or run in {batch.path} (groups: "
                              f"{', '.join(batch.groups)})")
    stack = list(wanted)
    while stack:
        for need in runs[stack.pop()].needs:
            if need not in wanted:
                wanted.add(need)
                stack.append(need)
    return [name for name in runs if name in wanted]


def run_batch(profile: str = "toy", *, only: list[str] | None = None, dry_run: bool = False,
              jobs: int = 1, batch_path: str | Path | None = None, log=print) -> dict[str, dict]:
    """Execute the batch for ``profile``; returns {run: status record}. With ``jobs`` > 1,
    independent runs execute in parallel (each kernel gets cores/jobs threads)."""
    import os
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    batch = load_batch(batch_path)
    runs, nb_profiles = expand(batch, profile)
    results: dict[str, dict] = {n: {"status": "not applicable"} for n in batch.runs
                                if n not in runs and not any(r.startswith(f"{n}_s") for r in runs)}
    notebook_dir = batch.path.parent
    code = code_version()
    root = runs_dir() / profile
    order = select(batch, only, runs)
    stamps: dict[str, str] = {}
    for name in order:
        run = runs[name]
        stamps[name] = _stamp(run, nb_profiles[name], notebook_dir, code,
                              [stamps[n] for n in run.needs])
    if jobs > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    pending = list(order)
    running: dict = {}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        while pending or running:
            ready = [n for n in pending if all(m in results for m in runs[n].needs)]
            for name in ready:
                pending.remove(name)
                run, run_dir = runs[name], root / name
                status = run_status(run_dir)
                if status.get("stamp") == stamps[name] and status.get("status") == "done":
                    results[name] = {**status, "action": "skipped (unchanged)"}
                    log(f"[skip] {name}: unchanged")
                    continue
                blocked = [n for n in run.needs if results[n].get("status") != "done"]
                if blocked:
                    results[name] = {"status": "blocked", "needs": blocked}
                    log(f"[blocked] {name}: needs {', '.join(blocked)}")
                    continue
                if dry_run:
                    results[name] = {"status": "done", "dry_run": True,
                                     "notebook": run.notebook, "profile": nb_profiles[name],
                                     "params": run.params}
                    log(f"[would run] {name}: {run.notebook} ({nb_profiles[name]}) {run.params}")
                    continue
                if status and status.get("stamp") != stamps[name]:
                    shutil.rmtree(run_dir, ignore_errors=True)  # stale: other code or params
                running[pool.submit(execute_run, run, profile, nb_profiles[name], run_dir,
                                    notebook_dir, stamps[name], log)] = name
            if running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    results[running.pop(fut)] = fut.result()
            elif pending and not ready:  # nothing runnable, nothing running: stuck
                for name in pending:
                    results[name] = {"status": "blocked", "needs": runs[name].needs}
                pending = []
    return results


def notebook_params(run: Run, batch_profile: str, nb_profile: str) -> dict[str, Any]:
    """The parameters a run's notebook gets: its profile, its run folder as
    ``<batch profile>/<run>``, and the run's params, where a value naming a needed run becomes
    that run's folder name too."""
    params = {"profile": nb_profile, "run_name": f"{batch_profile}/{run.name}"}
    for key, value in run.params.items():
        params[key] = f"{batch_profile}/{value}" if value in run.needs else value
    return params


def execute_run(run: Run, profile: str, nb_profile: str, run_dir: Path, notebook_dir: Path,
                stamp: str, log=print) -> dict:
    import papermill as pm

    run_dir.mkdir(parents=True, exist_ok=True)
    params = notebook_params(run, profile, nb_profile)
    record = {"run": run.name, "notebook": run.notebook, "params": params, "stamp": stamp,
              "status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "hardware": hardware()}
    write_json(run_dir / RUN_FILE, record)
    out_nb = run_dir / run.notebook
    log(f"[run] {run.name}: {run.notebook} {run.params}")
    t0 = time.time()
    try:
        pm.execute_notebook(str(notebook_dir / run.notebook), str(out_nb), parameters=params,
                            kernel_name="python3", cwd=str(notebook_dir), progress_bar=False)
        record.update(status="done")
    except Exception as e:  # a failed cell, a dead kernel, ...
        record.update(status="failed", error=_short_error(e), executed_notebook=str(out_nb))
        log(f"[failed] {run.name}: {record['error']} (see {out_nb})")
    except KeyboardInterrupt:
        record.update(status="interrupted")
        write_json(run_dir / RUN_FILE, {**record, "seconds": round(time.time() - t0, 1)})
        raise
    record["seconds"] = round(time.time() - t0, 1)
    write_json(run_dir / RUN_FILE, record)
    if record["status"] == "done":
        log(f"[done] {run.name} in {record['seconds']} s")
    return record


def hardware() -> str:
    """One line naming the machine a run executed on (CPU cores, GPU if any)."""
    import os
    import platform

    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:  # a broken CUDA install must not stop the batch
        gpu = "GPU unknown"
    return f"{platform.machine()} {os.cpu_count()} cores, {gpu}"


def _short_error(e: Exception) -> str:
    text = str(e).strip().splitlines()
    lines = [ln for ln in text if ln.strip()]
    tail = lines[-1] if lines else traceback.format_exception_only(type(e), e)[-1].strip()
    return f"{type(e).__name__}: {tail}"[:500]
