"""Fault injection over every stage: SIGKILL at seeded random moments, full disks, no permission.

    .venv/bin/python benchmarks/fault_bench.py [--out runs/_faults] [--kills 10] [--seed 0]
                                               [--stages train,pseudo,...] [--json FILE]

For each stage (data preparation, stage-1 training, pseudo labels, the dense CRF, DeepLabv2
training and prediction, the batch runner, report writing), on the toy profile at reduced sizes:

1. an uninterrupted reference run, which also counts the stage's atomic writes;
2. ``--kills`` trials, each in a fresh folder: the stage is started and SIGKILLed (the stage's
   own process, not its process group: its workers must follow by themselves), half of the
   trials at a random moment of the reference's duration (for the CRF: of its CRF phase;
   halved, in a fresh folder, when the stage finished before it), half
   during its N-th write (``CPFCTE_FAULT=kill-write:N``, N drawn over the counted writes: the
   new checkpoint, PNG or table is in its temporary file, the old one not yet replaced); then
   rerun to the end. The outputs are compared with the reference's file by file (bytes; a
   checkpoint's tensors with ``torch.equal``; JSON without its timing fields), the folder is
   searched for temporary files, and every process started under the trial (marked by an
   environment variable) must be gone within 5 s of the kill;
3. one trial with a full disk and one without write permission (``CPFCTE_FAULT=ENOSPC-write:N``
   / ``EACCES-write:N``): the error must name the folder, every output already written must be
   readable, no temporary file is left, and a rerun completes identical to the reference.

Everything is drawn from ``--seed``; the table (docs/engineering.md, "Faults") is printed and written as JSON.
The reduced form runs in the tests (``tests/test_faults.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import cpfcte  # noqa: F401  (pins the numerics before numpy/torch)
from cpfcte.machinery.paths import data_dir, project_root

TAG = "CPFCTE_FAULT_TAG"
VOLATILE = {"seconds", "started", "finished", "timing", "hardware", "time", "elapsed",
            "wall_seconds", "written", "skipped", "workers", "log", "executed_notebook",
            "action"}
SKIP_NAMES = {"log.txt", ".lock", "job.json", ".cpfcte-fingerprint.json"}
SKIP_SUFFIXES = {".ipynb"}


# ---------------------------------------------------------------------------------------------
# the stages


@dataclass
class Stage:
    """One stage under test. ``argv(trial)`` is the command (after ``python``) that runs it
    into ``trial``; ``rerun`` the command that finishes a killed one (default: the same);
    ``compare`` the folders of ``trial`` whose files must equal the reference's; ``phase``: a
    file pattern (relative to ``trial``) whose first appearance splits the run in two (the CRF
    phase of a pseudo-label run begins), and ``window`` the part the kills fall in ("before"
    or "after" it); ``write_kills``: half the kills during a write of the stage's process
    (False where its writes happen in pool workers: the CRF's PNGs); ``setup`` prepares a
    fresh trial folder."""

    name: str
    argv: callable
    compare: list[str]
    rerun: callable | None = None
    phase: str | None = None
    window: str = "after"
    write_kills: bool = True
    setup: callable | None = None
    env: dict = field(default_factory=dict)


def stages(work: Path, toy: Path, overrides: tuple[str, ...] = ()) -> dict[str, Stage]:
    py = [sys.executable, "-m", "cpfcte"]
    inputs = work / "_inputs"
    train_ref, deeplab_ref = inputs / "train", inputs / "deeplab"
    fixtures = inputs / "fixtures"
    train = ["--profile", "toy", "--set", *TRAIN_SET, *overrides]

    def copy_deeplab(trial: Path) -> None:
        shutil.copytree(deeplab_ref, trial / "dl", ignore=shutil.ignore_patterns(
            "val", "metrics.json", ".lock", "*.tmp"))

    def mini_batch(trial: Path) -> None:
        nb = trial / "notebooks"
        nb.mkdir(parents=True)
        for name in ("02_train.ipynb", "03_pseudo_labels.ipynb"):
            shutil.copy(project_root() / "notebooks" / name, nb / name)
        (nb / "batches.yaml").write_text(
            "runs:\n"
            "  t: {notebook: 02_train.ipynb, params: {epochs: 2, seed: 1}}\n"
            "  p: {notebook: 03_pseudo_labels.ipynb, needs: [t],\n"
            "      params: {train_run: t, baselines: false, n_show: 1}}\n")

    batch_code = ("import cpfcte, sys; from cpfcte.batch.runner import run_batch; "
                  "r = run_batch('toy', batch_path=sys.argv[1], log=print); "
                  "sys.exit(0 if all(v.get('status') == 'done' for v in r.values()) else 1)")
    return {
        "data prepare": Stage(
            "data prepare",
            lambda t: py + ["data", "prepare", "voc", "--voc-root",
                            str(fixtures / "VOCdevkit" / "VOC2012"), "--sbd-root",
                            str(fixtures / "benchmark_RELEASE" / "dataset"), "--out",
                            str(t / "voc"), "--allow-partial"],
            ["voc/SegmentationClassAug", "voc/ImageSets", "voc/cpfcte_prepare_voc.json"]),
        "training": Stage(
            "training", lambda t: py + ["train", "--run", str(t / "run")] + train,
            ["run"], rerun=lambda t: py + ["train", "--run", str(t / "run"), "--resume"] + train),
        "pseudo labels": Stage(
            "pseudo labels",
            lambda t: py + ["pseudo", "--profile", "toy", "--train-run", str(train_ref),
                            "--run", str(t / "run"), "--set", "crf.workers=2"], ["run"],
            phase="run/crf_*/*.png", window="before"),
        "dense CRF": Stage(
            "dense CRF",
            lambda t: py + ["pseudo", "--profile", "toy", "--train-run", str(train_ref),
                            "--run", str(t / "run"), "--set", "crf.workers=2"], ["run"],
            phase="run/crf_*/*.png", write_kills=False),
        "DeepLabv2 training": Stage(
            "DeepLabv2 training",
            lambda t: py + ["deeplab", "train", "--pseudo", str(pseudo_labels(inputs)), "--run",
                            str(t / "run"), "--profile", "toy", "--set", *DEEPLAB_SET],
            ["run"]),
        "DeepLabv2 prediction": Stage(
            "DeepLabv2 prediction",
            lambda t: py + ["deeplab", "predict", "--profile", "toy", "--run", str(t / "dl")],
            ["dl/val", "dl/metrics.json"], setup=copy_deeplab),
        "batch runner": Stage(
            "batch runner",
            lambda t: [sys.executable, "-c", batch_code, str(t / "notebooks" / "batches.yaml")],
            ["runs/toy/t", "runs/toy/p"], setup=mini_batch,
            env={"CPFCTE_RUNS": "{trial}/runs"}),
        "report writing": Stage(
            "report writing", lambda t: py + ["report", "--profile", "toy"], ["out"],
            env={"CPFCTE_OUT": "{trial}/out", "CPFCTE_RUNS": str(inputs / "report_runs")}),
    }


def pseudo_labels(inputs: Path) -> Path:
    """The CRF pseudo labels of the toy's train split (120 images), which DeepLabv2 trains on
    here (``train_split=train``: the bench needs DeepLabv2's checkpoints, not its score)."""
    return inputs / "pseudo" / "crf_train_160"


NEEDS = {"data prepare": "fixtures", "training": None, "pseudo labels": "train",
         "dense CRF": "train", "DeepLabv2 training": "pseudo", "DeepLabv2 prediction": "deeplab",
         "batch runner": None, "report writing": "report_runs"}
TRAIN_SET = ("seed=1", "epochs=3")
DEEPLAB_SET = ("train_split=train", "deeplab.iterations=40", "deeplab.ckpt_every=10")


def make_inputs(work: Path, toy: Path, names: list[str], overrides: tuple[str, ...] = (),
                log=print) -> None:
    """The inputs the stages ``names`` read, each made once (uninterrupted) and kept: the VOC
    fixtures, a trained model, its pseudo labels, a DeepLabv2 run, and the report's runs."""
    from cpfcte.data.fixtures import make_voc_sbd

    inputs = work / "_inputs"
    py = [sys.executable, "-m", "cpfcte"]
    env = {**os.environ, "CPFCTE_DATA": str(toy.parent)}
    env.pop("CPFCTE_FAULT", None)
    order = ["fixtures", "train", "pseudo", "deeplab", "report_runs"]
    chain = {"fixtures": [], "train": [], "pseudo": ["train"], "deeplab": ["train", "pseudo"],
             "report_runs": ["train", "pseudo"]}
    wanted = {n for name in names if NEEDS[name] for n in chain[NEEDS[name]] + [NEEDS[name]]}
    steps = {
        "train": py + ["train", "--profile", "toy", "--run", str(inputs / "train"), "--set",
                       *TRAIN_SET, *overrides],
        "pseudo": py + ["pseudo", "--profile", "toy", "--train-run", str(inputs / "train"),
                        "--run", str(inputs / "pseudo")],
        "deeplab": py + ["deeplab", "train", "--profile", "toy", "--pseudo",
                         str(pseudo_labels(inputs)), "--run", str(inputs / "deeplab"), "--set",
                         *DEEPLAB_SET],
    }
    for name in (n for n in order if n in wanted):
        done = inputs / f"{name}.done"
        if done.is_file():
            continue
        shutil.rmtree(inputs / name, ignore_errors=True)
        log(f"  inputs: {name}")
        if name == "fixtures":
            make_voc_sbd(inputs / "fixtures", n=24)
        elif name == "report_runs":    # finished runs under names the report reads
            for run, src in (("train_full", "train"), ("pseudo_full", "pseudo")):
                shutil.copytree(inputs / src, inputs / name / "toy" / run,
                                ignore=shutil.ignore_patterns(".lock"))
        else:
            subprocess.run(steps[name], env=env, check=True, capture_output=True)
        done.write_text("")


# ---------------------------------------------------------------------------------------------
# running, killing, comparing


def _env(stage: Stage, trial: Path, toy: Path, tag: str, fault: str | None) -> dict:
    env = {**os.environ, "CPFCTE_DATA": str(toy.parent), TAG: tag,
           "CPFCTE_RUNS": str(trial / "runs"), "PYTHONUNBUFFERED": "1"}
    env.pop("CPFCTE_FAULT", None)
    env.pop("CPFCTE_FAULT_OWNER", None)
    for key, value in stage.env.items():
        env[key] = value.replace("{trial}", str(trial))
    if fault:
        env["CPFCTE_FAULT"] = fault
    return env


def tagged_processes(tag: str) -> list[int]:
    """Processes whose environment carries ``tag`` (a trial's stage and everything it started)."""
    pids = []
    needle = f"{TAG}={tag}".encode()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if needle in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def orphans_after(tag: str, grace: float = 5.0) -> int:
    """How many processes of a killed trial are still alive ``grace`` seconds after the kill
    (they are then killed, so that one trial cannot disturb the next)."""
    deadline = time.time() + grace
    while time.time() < deadline:
        alive = [p for p in tagged_processes(tag) if _running(p)]
        if not alive:
            return 0
        time.sleep(0.1)
    alive = [p for p in tagged_processes(tag) if _running(p)]
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(alive)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start(argv: list[str], env: dict, trial: Path):
    """Start a stage with its output in files beside the trial (not pipes: a process that
    outlives a kill would hold a pipe open, and the bench would wait on it)."""
    logs = trial.parent / "_logs"
    logs.mkdir(exist_ok=True)
    out = open(logs / f"{trial.name}.out", "w+")
    err = open(logs / f"{trial.name}.err", "w+")
    return subprocess.Popen(argv, env=env, cwd=trial, stdout=out, stderr=err), out, err


def _read(fh) -> str:
    fh.flush()
    fh.seek(0)
    text = fh.read()
    fh.close()
    return text


def run(stage: Stage, trial: Path, toy: Path, *, rerun: bool = False, fault: str | None = None,
        kill_after: float | None = None) -> dict:
    """Run the stage once into ``trial``; with ``kill_after``, SIGKILL its process that many
    seconds after it started (after the ``phase`` file appeared, for a phased stage)."""
    argv = (stage.rerun or stage.argv)(trial) if rerun else stage.argv(trial)
    tag = uuid.uuid4().hex
    t0 = time.time()
    proc, out, err = _start(argv, _env(stage, trial, toy, tag, fault), trial)
    killed = False
    phase_at = None
    if kill_after is not None:
        start = t0
        while proc.poll() is None:
            now = time.time()
            if stage.phase and stage.window == "after" and phase_at is None:
                if any(trial.glob(stage.phase)):
                    phase_at = start = now
                else:
                    time.sleep(0.01)
                    continue
            if now - start >= kill_after:
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
            time.sleep(0.005)
    proc.wait()
    result = {"rc": proc.returncode, "seconds": time.time() - t0, "killed": killed,
              "stdout": _read(out), "stderr": _read(err), "tag": tag}
    return result


def run_timed(stage: Stage, trial: Path, toy: Path) -> dict:
    """The reference: one uninterrupted run, counting writes and timing the phase."""
    tag = uuid.uuid4().hex
    t0 = time.time()
    proc, out, err = _start(stage.argv(trial), _env(stage, trial, toy, tag, "count"), trial)
    phase_at = None
    while proc.poll() is None:
        if stage.phase and phase_at is None and any(trial.glob(stage.phase)):
            phase_at = time.time() - t0
        time.sleep(0.01)
    proc.wait()
    seconds, err = time.time() - t0, _read(err)
    if proc.returncode != 0:
        raise RuntimeError(f"{stage.name}: reference run failed:\n{err[-3000:]}")
    writes = sum(int(line.split()[1]) for line in err.splitlines()
                 if line.startswith("cpfcte-faults:"))
    window = None
    if phase_at is not None:
        window = seconds - phase_at if stage.window == "after" else phase_at
    return {"seconds": seconds, "writes": writes, "window": window}


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _same_tensors(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return (isinstance(b, dict) and set(a) == set(b)
                and all(_same_tensors(a[k], b[k]) for k in a if k not in VOLATILE))
    if isinstance(a, (list, tuple)):
        return (isinstance(b, (list, tuple)) and len(a) == len(b)
                and all(_same_tensors(x, y) for x, y in zip(a, b)))
    return _strip(a) == _strip(b)


def files(root: Path) -> dict[str, Path]:
    out = {}
    if root.is_file():
        return {"": root}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name not in SKIP_NAMES and path.suffix not in SKIP_SUFFIXES:
            out[path.relative_to(root).as_posix()] = path
    return out


def same_file(a: Path, b: Path, roots: tuple[Path, Path]) -> bool:
    """Whether two outputs are the same: a checkpoint's tensors equal, a JSON file's values
    equal without its timing fields and with each trial's own folder written as <trial>, any
    other file byte for byte."""
    if a.suffix == ".pt":
        import torch

        return _same_tensors(torch.load(a, map_location="cpu", weights_only=True),
                             torch.load(b, map_location="cpu", weights_only=True))
    if a.suffix in (".json", ".jsonl"):
        ta, tb = (p.read_text().replace(str(r), "<trial>") for p, r in ((a, roots[0]),
                                                                           (b, roots[1])))
        try:
            return (_strip([json.loads(x) for x in ta.splitlines() if x.strip()]) ==
                    _strip([json.loads(x) for x in tb.splitlines() if x.strip()])
                    if a.suffix == ".jsonl" else
                    _strip(json.loads(ta)) == _strip(json.loads(tb)))
        except ValueError:
            return False
    if a.suffix == ".pdf":      # the PDF's own creation date aside
        import re

        date = re.compile(rb"/CreationDate \(D:[^)]*\)")
        return date.sub(b"", a.read_bytes()) == date.sub(b"", b.read_bytes())
    return a.read_bytes() == b.read_bytes()


def differences(stage: Stage, ref: Path, trial: Path) -> list[str]:
    """Files of the compared folders that differ, are missing or are extra."""
    diffs = []
    for sub in stage.compare:
        want, got = files(ref / sub), files(trial / sub)
        for name in sorted(set(want) | set(got)):
            where = f"{sub}/{name}" if name else sub
            if name not in got:
                diffs.append(f"missing {where}")
            elif name not in want:
                diffs.append(f"extra {where}")
            elif not same_file(want[name], got[name], (ref, trial)):
                diffs.append(f"differs {where}")
    return diffs


def leftovers(trial: Path) -> list[str]:
    """Temporary files of an atomic write, or of a toy generation, left in the trial."""
    return [str(p.relative_to(trial)) for p in trial.rglob("*")
            if p.name.endswith(".tmp") or p.name.endswith(".partial")]


def readable(trial: Path) -> list[str]:
    """Outputs that cannot be read back whole (after a refused write)."""
    from PIL import Image

    bad = []
    for path in trial.rglob("*"):
        if not path.is_file() or path.name in SKIP_NAMES:
            continue
        try:
            if path.suffix == ".png":
                with Image.open(path) as im:
                    im.load()
            elif path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".pt":
                import torch

                torch.load(path, map_location="cpu", weights_only=True)
            elif path.suffix == ".npz":
                import numpy as np

                with np.load(path) as z:
                    [z[k] for k in z.files]
        except Exception as e:  # noqa: BLE001 (reported)
            bad.append(f"{path.relative_to(trial)}: {type(e).__name__}")
    return bad


def fresh(stage: Stage, folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if stage.setup:
        stage.setup(folder)
    return folder


def bench_stage(stage: Stage, work: Path, toy: Path, kills: int, rng: random.Random,
                faults: tuple[str, ...] = ("ENOSPC", "EACCES"), log=print) -> dict:
    base = work / stage.name.replace(" ", "_")
    ref = fresh(stage, base / "reference")
    timing = run_timed(stage, ref, toy)
    window = timing["window"] or timing["seconds"]
    row = {"stage": stage.name, "reference_s": round(timing["seconds"], 1),
           "writes": timing["writes"], "kills": 0, "identical": 0, "temporary_left": 0,
           "orphans": 0, "kill_moments": [], "failures": []}
    for i in range(kills):
        trial = fresh(stage, base / f"kill{i}")
        if i % 2 == 1 and timing["writes"] and stage.write_kills:
            n = rng.randint(1, timing["writes"])
            first = run(stage, trial, toy, fault=f"kill-write:{n}")
            moment = f"write {n}/{timing['writes']}"
            killed = first["rc"] == -signal.SIGKILL
        else:        # a moment drawn in the window; halved if the stage finished before it
            at = rng.uniform(0.05, 0.95) * window
            for _ in range(4):
                first = run(stage, trial, toy, kill_after=at)
                if first["killed"]:
                    break
                trial, at = fresh(stage, trial), at / 2
            moment = f"{at:.2f} s"
            killed = first["killed"]
        orphans = orphans_after(first["tag"])
        second = run(stage, trial, toy, rerun=True)
        diffs = differences(stage, ref, trial)
        temp = leftovers(trial)
        ok = killed and second["rc"] == 0 and not diffs and not temp and not orphans
        row["kills"] += killed
        row["identical"] += killed and second["rc"] == 0 and not diffs
        row["temporary_left"] += bool(temp)
        row["orphans"] += orphans
        row["kill_moments"].append(moment + ("" if killed else " (finished first)"))
        if not ok and killed:
            row["failures"].append({"trial": i, "moment": moment, "rerun_rc": second["rc"],
                                    "differs": diffs[:5], "temporary": temp[:5],
                                    "orphans": orphans, "stderr": second["stderr"][-600:]})
        log(f"  {stage.name} kill {i}: {moment}: {'ok' if ok else 'FAIL' if killed else 'not killed'}")
        shutil.rmtree(trial, ignore_errors=True) if ok else None
    for kind in faults:
        trial = fresh(stage, base / kind)
        n = rng.randint(1, max(1, timing["writes"]))
        first = run(stage, trial, toy, fault=f"{kind}-write:{n}")
        message = ([ln for ln in first["stderr"].splitlines() if "error" in ln] or [""])[-1]
        named = first["rc"] != 0 and "cannot write" in message and str(trial) in message
        broken = readable(trial)
        temp = leftovers(trial)
        second = run(stage, trial, toy, rerun=True)
        diffs = differences(stage, ref, trial)
        ok = named and not broken and not temp and second["rc"] == 0 and not diffs
        row[kind] = {"write": n, "error": message[:300], "clear": named, "unreadable": broken,
                     "temporary": temp, "rerun_identical": second["rc"] == 0 and not diffs,
                     "ok": ok}
        log(f"  {stage.name} {kind} at write {n}: {'ok' if ok else 'FAIL'}: {message[:160]}")
        shutil.rmtree(trial, ignore_errors=True) if ok else None
    return row


def table(rows: list[dict]) -> str:
    lines = ["| stage | ref. s | writes | kills | identical after rerun | temp. files left | "
             "orphans | ENOSPC | EACCES |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cell = {k: ("✓" if r.get(k, {}).get("ok") else "✗") if k in r else "–"
                for k in ("ENOSPC", "EACCES")}
        lines.append(f"| {r['stage']} | {r['reference_s']} | {r['writes']} | {r['kills']} | "
                     f"{r['identical']}/{r['kills']} | {r['temporary_left']} | {r['orphans']} | "
                     f"{cell['ENOSPC']} | {cell['EACCES']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(project_root() / "runs" / "_faults"))
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stages", help="comma-separated stage names (default: all)")
    ap.add_argument("--no-faults", action="store_true", help="kills only, no ENOSPC/EACCES")
    ap.add_argument("--faults-on", help="comma-separated stages to run ENOSPC/EACCES on "
                    "(default: every stage benched)")
    ap.add_argument("--toy", help="a toy dataset folder to use as it is (default: data/toy, "
                    "generated if missing)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="training overrides (the tests' tiny model)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    from cpfcte.data.toy import prepare_toy

    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    toy = Path(args.toy) if args.toy else prepare_toy(data_dir() / "toy", progress=False)
    print(f"fault bench in {work}: {args.kills} kills per stage, seed {args.seed}")
    every = stages(work, toy, tuple(args.set))
    names = [s.strip() for s in args.stages.split(",")] if args.stages else list(every)
    unknown = [n for n in names if n not in every]
    if unknown:
        ap.error(f"unknown stage(s) {unknown}; stages: {', '.join(every)}")
    make_inputs(work, toy, names, tuple(args.set))
    rows = []
    for name in names:
        rng = random.Random(f"{args.seed}:{name}")
        with_faults = not args.no_faults and (args.faults_on is None or name in
                                              [n.strip() for n in args.faults_on.split(",")])
        rows.append(bench_stage(every[name], work, toy, args.kills, rng,
                                ("ENOSPC", "EACCES") if with_faults else ()))
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    rows = main()
    sys.exit(0 if all(r["identical"] == r["kills"] and not r["orphans"] and not r["temporary_left"]
                      and all(r.get(k, {"ok": True})["ok"] for k in ("ENOSPC", "EACCES"))
                      for r in rows) else 1)
