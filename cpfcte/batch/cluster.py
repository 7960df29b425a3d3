"""``make paper`` on a cluster: each run of the batch as a SLURM job, through submitit.

    cpfcte paper --profile voc --executor slurm [--cluster cluster.yaml] [--partition P]
                 [--account A] [--qos Q] [--status]

The batch runner (``cpfcte.batch``) keeps its order and its guarantees; only where a run
executes changes. Dependencies are handled by **waiting per level**: a run is submitted when
every run it needs has finished (so a failed or cancelled need stops its dependants before
they are submitted, and the scheduler sees only runnable jobs). Each job gets the resources of
its stage from ``cluster.yaml`` (GPUs, CPUs, memory; a training run with ``nproc`` > 1 gets
that many GPUs and runs torchrun inside its job), and a time limit from the plan's estimate
(``cpfcte.batch.plan``) times ``time_margin``, at least ``min_minutes``. Every job writes its
stdout/stderr under ``runs/<profile>/_slurm/``; the run folder's ``job.json`` names the job id
and those logs, for ``--status`` and for the table cell of a failed run.

``executor: local`` (the default) runs in this machine's process pool; ``submitit-local`` runs
through submitit's local executor (the same submission machinery as SLURM, used by the tests).
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cpfcte.machinery.errors import CpfcteError

EXECUTORS = ("local", "slurm", "submitit-local")
JOB_FILE = "job.json"


@dataclass
class ClusterConfig:
    """What the jobs ask of the cluster (``cluster.yaml``, then flags)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    sbatch: list = field(default_factory=list)      # extra sbatch options: ["--constraint=a100"]
    gpus: dict = field(default_factory=lambda: {"train": 1, "pseudo": 1, "deeplab": 1})
    cpus_per_task: int = 8
    mem_gb: int = 64
    time_margin: float = 2.0                        # × the plan's estimate
    min_minutes: int = 30
    nodes: int = 1                                  # > 1: multi-node torchrun for training
    poll_seconds: float = 5.0

    @classmethod
    def load(cls, path: str | Path | None, **flags) -> "ClusterConfig":
        values: dict[str, Any] = {}
        if path:
            p = Path(path)
            if not p.is_file():
                raise CpfcteError(f"{p}: cluster file not found")
            values = yaml.safe_load(p.read_text()) or {}
            if not isinstance(values, dict):
                raise CpfcteError(f"{p}: a cluster file is a mapping of field: value")
            unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
            if unknown:
                raise CpfcteError(f"{p}: unknown field {unknown[0]!r}; the fields are "
                                  f"{[f.name for f in dataclasses.fields(cls)]}")
        values.update({k: v for k, v in flags.items() if v is not None})
        return cls(**values)


def check_executor(executor: str) -> None:
    """Refuse, before anything is submitted, an executor this machine cannot use."""
    if executor not in EXECUTORS:
        raise CpfcteError(f"--executor {executor!r}: one of {list(EXECUTORS)}")
    if executor == "slurm":
        missing = [c for c in ("sbatch", "squeue", "scancel") if shutil.which(c) is None]
        if missing:
            raise CpfcteError(f"--executor slurm: {', '.join(missing)} not on the PATH; run on a "
                              "SLURM login node, or use --executor local")


def job_resources(run, nb_profile: str, cluster: ClusterConfig, estimate_s: float,
                  log=print) -> dict[str, Any]:
    """submitit parameters of one run: GPUs of its stage (``nproc`` for a multi-GPU training,
    none for the toy), CPUs, memory, time limit from the estimate with the margin."""
    from cpfcte.machinery.config import load_config

    cfg = load_config(nb_profile)
    gpus = 0 if cfg.dataset.startswith("toy") else int(cluster.gpus.get(run.stage or "", 0))
    nproc = int(run.params.get("nproc", 1) or 1)
    if nproc > 1:
        if gpus and nproc > gpus * cluster.nodes:
            raise CpfcteError(f"run {run.name}: nproc={nproc} exceeds the {gpus} GPU(s) × "
                              f"{cluster.nodes} node(s) requested; raise gpus.{run.stage} in "
                              "the cluster file")
    minutes = max(cluster.min_minutes, int(estimate_s * cluster.time_margin / 60) + 1)
    if estimate_s and minutes * 60 < estimate_s:
        log(f"[warn] {run.name}: time limit {minutes} min is below the plan's estimate "
            f"{estimate_s / 60:.0f} min")
    params: dict[str, Any] = {"timeout_min": minutes, "cpus_per_task": cluster.cpus_per_task,
                              "mem_gb": cluster.mem_gb, "name": f"cpfcte-{run.name}"}
    if gpus:
        params["gpus_per_node"] = gpus
    return params


def slurm_parameters(cluster: ClusterConfig) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if cluster.partition:
        params["slurm_partition"] = cluster.partition
    extra = {}
    if cluster.account:
        extra["account"] = cluster.account
    if cluster.qos:
        extra["qos"] = cluster.qos
    for opt in cluster.sbatch:
        key, _, value = str(opt).lstrip("-").partition("=")
        extra[key.replace("-", "_")] = value or True
    if extra:
        params["slurm_additional_parameters"] = extra
    return params


class JobLauncher:
    """Submits runs as jobs (submitit) and reports finished ones, like the local pool."""

    def __init__(self, executor: str, folder: Path, cluster: ClusterConfig):
        import submitit

        self.kind = executor
        self.cluster = cluster
        folder.mkdir(parents=True, exist_ok=True)
        if executor == "slurm":
            self.executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        else:
            self.executor = submitit.LocalExecutor(folder=folder)
        self.jobs: dict[str, Any] = {}

    def submit(self, name: str, run_dir: Path, resources: dict, fn, *args) -> str:
        params = dict(resources)
        if self.kind == "slurm":
            params.update(slurm_parameters(self.cluster))
        else:                                 # the local executor knows no GPUs or memory
            params = {"timeout_min": params["timeout_min"]}
        self.executor.update_parameters(**params)
        try:
            job = self.executor.submit(fn, *args)
        except Exception as e:                # sbatch's own message, whole
            raise CpfcteError(f"submitting {name} failed: {e}") from None
        self.jobs[name] = job
        from cpfcte.machinery.io import write_json

        write_json(run_dir / JOB_FILE, {"job_id": str(job.job_id), "executor": self.kind,
                                        "stdout": str(job.paths.stdout),
                                        "stderr": str(job.paths.stderr)})
        return str(job.job_id)

    def _ended(self, job) -> bool:
        if job.paths.result_pickle.exists():
            return True
        if self.kind == "slurm":              # squeue: not needing SLURM's accounting (sacct)
            return job_state(str(job.job_id)) in (None, *ENDED)
        return job.done()

    def finished(self) -> dict[str, dict]:
        """{run: record} of the jobs that ended since the last call. A job that ended without
        a result (cancelled, killed, over its time limit) is a failed run naming its log."""
        out = {}
        for name, job in list(self.jobs.items()):
            if not self._ended(job):
                continue
            del self.jobs[name]
            failed = {"run": name, "status": "failed", "log": str(job.paths.stderr),
                      "job_id": str(job.job_id)}
            if not job.paths.result_pickle.exists() and self.kind == "slurm":
                state = job_state(str(job.job_id)) or "ended"
                out[name] = {**failed, "error": f"job {job.job_id} {state} without a result "
                                                "(cancelled, killed or over its time limit)"}
                continue
            try:
                out[name] = job.result()
            except Exception as e:            # the run raised, or the job was killed
                first = str(e).strip().splitlines()
                out[name] = {**failed, "error": f"job {job.job_id}: "
                                                f"{(first[-1] if first else type(e).__name__)[:300]}"}
        return out


ENDED = ("completed", "failed", "cancelled", "timeout", "node_fail", "out_of_memory",
         "boot_fail", "deadline", "preempted")


def job_state(job_id: str) -> str | None:
    """SLURM's state of a job (squeue, then sacct), or None when SLURM does not know it."""
    for cmd in (["squeue", "-h", "-j", job_id, "-o", "%T"],
                ["sacct", "-n", "-X", "-j", job_id, "-o", "State"]):
        if shutil.which(cmd[0]) is None:
            continue
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            continue
        if out:
            return out.split()[0].lower()
    return None


def status_lines(profile: str, runs: list[str]) -> list[str]:
    """One line per run: pending/running/done/failed and its job id (``--status``)."""
    from cpfcte.batch.catalog import run_dir, run_status
    from cpfcte.machinery.io import read_json

    lines = []
    for name in runs:
        folder = run_dir(profile, name)
        record = run_status(folder)
        job = read_json(folder / JOB_FILE) if (folder / JOB_FILE).is_file() else {}
        state = record.get("status", "pending")
        if job and state not in ("done", "failed"):
            slurm = job_state(job["job_id"]) if job.get("executor") == "slurm" else None
            state = slurm or state
        where = f" job {job['job_id']}" if job else ""
        extra = f" (log {job['stderr']})" if state == "failed" and job else ""
        lines.append(f"{name:<24} {state:<10}{where}{extra}")
    return lines
