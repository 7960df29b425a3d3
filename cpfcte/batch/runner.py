"""The batch runner behind `make paper`: papermill executes each run of the catalog.

The runs, their needs and the groups that feed each table or figure are declared in the
catalog (``cpfcte.batch.catalog``, ``notebooks/batches.yaml``). For each run, in file order:

* its *stamp* hashes the notebook, the parameters, the profile file, the library's code and the
  stamps of the runs it needs;
* a run whose ``run.json`` says ``done`` with the same stamp is skipped;
* a run folder with another stamp is stale and is cleared; one with the same stamp that did not
  finish (killed, failed) is executed again and resumes (training from its checkpoint, pseudo
  labels from the PNGs already written);
* a failing run is recorded (``run.json``: status ``failed`` and the error) and the batch goes
  on; runs that need it are marked ``blocked``. The summary at the end lists them;
* a run may name the profiles it belongs to (``profiles: {toy: toy_coco, coco: coco}``: in a
  toy batch its notebook runs with the toy_coco profile, in a voc batch it does not run);
* on the local executor each worker keeps one Jupyter kernel warm (``WarmKernels``): a run
  starts in a cleared namespace of a kernel whose libraries are already imported, which spares
  the kernel start and the imports (about 4.6 s a run on the toy) and changes no number.

Results pass between runs as files in the run folders, never as notebook outputs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import threading
import time
import traceback
from contextlib import closing, nullcontext
from pathlib import Path
from typing import Any

from cpfcte.batch.catalog import RUN_FILE, Batch, Run, expand, group_reads, load_batch, run_status
from cpfcte.machinery.config import PROFILE_DIR
from cpfcte.machinery.errors import CpfcteError
from cpfcte.machinery.io import write_json
from cpfcte.machinery.paths import runs_dir


def code_version() -> str:
    """Hash of the library's sources, profiles and interpretation notes (the tables' notes files
    list them): a change of code re-runs what it touches."""
    from cpfcte.machinery.notes import notes_file

    h = hashlib.sha256()
    pkg = Path(__file__).resolve().parents[1]          # the cpfcte package
    for p in sorted(list(pkg.rglob("*.py")) + list(PROFILE_DIR.glob("*.yaml"))):
        h.update(str(p.relative_to(pkg)).encode())
        h.update(p.read_bytes())
    h.update(notes_file().read_bytes())
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


def select(batch: Batch, only: list[str] | None, runs: dict[str, Run] | None = None,
           profile: str = "toy") -> list[str]:
    """Run names to execute: all, or those feeding the named groups/runs plus what they need.
    ``runs`` are the concrete (seed-expanded) runs of ``profile``; a group selects every seed
    of the runs it reads for that profile, a template name every seed of its runs."""
    runs = runs if runs is not None else batch.runs
    if not only:
        return list(runs)
    wanted: set[str] = set()

    def add(base: str) -> None:
        wanted.update(n for n in runs if n == base or n.startswith(f"{base}_s"))

    for item in only:
        if item in batch.groups:
            for r in group_reads(batch.groups[item], profile):
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


KERNEL_BYTES = 1.1 * 2**30      # one toy kernel's peak memory (benchmarks/memory_bench.py)


def default_jobs(profile: str) -> int:
    """How many runs ``cpfcte paper`` executes at once unless told: on the toy (CPU), one per
    core the process may use, bounded by the memory available (``KERNEL_BYTES`` a kernel); a
    paper-scale profile, one (its runs share the GPU). A toy run's digits do not depend on it:
    each run has its own kernel and the profile's fixed thread count (numerics)."""
    from cpfcte.machinery.config import base_profile

    if base_profile(profile) != "toy":
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    available = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    by_memory = cores if available is None else int(available // KERNEL_BYTES)
    return max(1, min(cores, by_memory))


def run_batch(profile: str = "toy", *, only: list[str] | None = None, dry_run: bool = False,
              jobs: int = 1, batch_path: str | Path | None = None, log=print,
              executor: str = "local", cluster=None) -> dict[str, dict]:
    """Execute the batch for ``profile``; returns {run: status record}. With ``jobs`` > 1,
    independent runs execute in parallel (each kernel gets cores/jobs threads). With
    ``executor`` slurm (or submitit-local), each run is a job (``cpfcte.batch.cluster``): a run is
    submitted once every run it needs has finished; the rest is the same."""
    import os
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    batch = load_batch(batch_path)
    runs, nb_profiles = expand(batch, profile)
    results: dict[str, dict] = {n: {"status": "not applicable"} for n in batch.runs
                                if n not in runs and not any(r.startswith(f"{n}_s") for r in runs)}
    notebook_dir = batch.path.parent
    code = code_version()
    root = runs_dir() / profile
    order = select(batch, only, runs, profile)
    stamps: dict[str, str] = {}
    for name in order:
        run = runs[name]
        stamps[name] = _stamp(run, nb_profiles[name], notebook_dir, code,
                              [stamps[n] for n in run.needs])
    if jobs > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    pending = list(order)
    priority = critical_path(runs, order)
    running: dict = {}
    launcher, slots = None, max(1, jobs)
    if executor != "local" and not dry_run:
        from cpfcte.batch.cluster import ClusterConfig, JobLauncher, check_executor
        from cpfcte.batch.plan import throughputs

        check_executor(executor)
        launcher = JobLauncher(executor, root / "_slurm", cluster or ClusterConfig())
        slots, tp = len(order) or 1, throughputs()     # every ready run is submitted
    kernels = WarmKernels(notebook_dir) if launcher is None and not dry_run else None
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool, \
            (closing(kernels) if kernels else nullcontext()):
        while pending or running:
            ready = [n for n in pending if all(m in results for m in runs[n].needs)]
            launch = []
            for name in ready:
                run, run_dir = runs[name], root / name
                status = run_status(run_dir)
                if status.get("stamp") == stamps[name] and status.get("status") == "done":
                    pending.remove(name)
                    results[name] = {**status, "action": "skipped (unchanged)"}
                    log(f"[skip] {name}: unchanged")
                    continue
                blocked = [n for n in run.needs if results[n].get("status") != "done"]
                if blocked:
                    pending.remove(name)
                    results[name] = {"status": "blocked", "needs": blocked}
                    log(f"[blocked] {name}: needs {', '.join(blocked)}")
                    continue
                if dry_run:
                    pending.remove(name)
                    results[name] = {"status": "done", "dry_run": True, "stage": run.stage,
                                     "notebook": run.notebook, "profile": nb_profiles[name],
                                     "params": run.params}
                    log(f"[would run] {name}: {run.notebook} ({nb_profiles[name]}) {run.params}")
                    continue
                launch.append(name)
            # as many runs as there are free workers, the longest chain of work first (so
            # DeepLabv2, at the end of the longest chain, does not wait behind every training)
            for name in sorted(launch, key=lambda n: -priority[n])[:slots - len(running)]:
                pending.remove(name)
                run, run_dir = runs[name], root / name
                if run_status(run_dir).get("stamp") not in (None, stamps[name]):
                    shutil.rmtree(run_dir, ignore_errors=True)  # stale: other code or params
                if launcher is None:
                    running[pool.submit(execute_run, run, profile, nb_profiles[name], run_dir,
                                        notebook_dir, stamps[name], log, kernels)] = name
                    continue
                from cpfcte.batch.cluster import job_resources
                from cpfcte.batch.plan import estimate_seconds

                resources = job_resources(run, nb_profiles[name], launcher.cluster,
                                          estimate_seconds(run.stage, nb_profiles[name],
                                                           run.params, tp), log)
                job_id = launcher.submit(name, run_dir, resources, execute_run, run, profile,
                                         nb_profiles[name], run_dir, notebook_dir,
                                         stamps[name], print)
                running[name] = name
                log(f"[submitted] {name}: job {job_id}")
            if running and launcher is not None:
                finished = {}
                while not finished:
                    time.sleep(launcher.cluster.poll_seconds)
                    finished = launcher.finished()
                for name, record in finished.items():
                    running.pop(name)
                    results[name] = record
                    if record.get("status") != "done":
                        log(f"[failed] {name}: {record.get('error')} (log: "
                            f"{record.get('log', root / name / RUN_FILE)})")
                        write_json(root / name / RUN_FILE,
                                   {**run_status(root / name), **record})
                    else:
                        log(f"[done] {name} in {record.get('seconds')} s")
            elif running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    results[running.pop(fut)] = fut.result()
            elif pending and not ready:  # nothing runnable, nothing running: stuck
                for name in pending:
                    results[name] = {"status": "blocked", "needs": runs[name].needs}
                pending = []
    return results


STAGE_WEIGHT = {"train": 25.0, "pseudo": 6.0, "deeplab": 100.0}   # rough toy seconds


def critical_path(runs: dict[str, Run], order: list[str]) -> dict[str, float]:
    """For each run, the work on the longest chain from it to the end of the batch (its own
    stage weight plus the longest chain among the runs that need it)."""
    needed_by: dict[str, list[str]] = {n: [] for n in order}
    for name in order:
        for need in runs[name].needs:
            if need in needed_by:
                needed_by[need].append(name)
    path: dict[str, float] = {}
    for name in reversed(order):
        path[name] = STAGE_WEIGHT.get(runs[name].stage or "", 1.0) + max(
            (path[d] for d in needed_by[name]), default=0.0)
    return path


def notebook_params(run: Run, batch_profile: str, nb_profile: str) -> dict[str, Any]:
    """The parameters a run's notebook gets: its profile, its run folder as
    ``<batch profile>/<run>``, and the run's params, where a value naming a needed run becomes
    that run's folder name too."""
    params = {"profile": nb_profile, "run_name": f"{batch_profile}/{run.name}"}
    for key, value in run.params.items():
        params[key] = f"{batch_profile}/{value}" if value in run.needs else value
    return params


class WarmKernels:
    """One started Jupyter kernel per worker thread of the batch, reused from run to run.

    Before each run the kernel's namespace is cleared (``%reset -f``), its figures closed and
    its garbage collected; what stays is what a fresh kernel would import again: the modules
    (torch, timm, matplotlib, cpfcte with its pinned numerics) and nothing a notebook computed.
    Every stage sets its own seeds, thread count and deterministic flags (``train.set_seed``,
    ``numerics.apply``), so a run gives the same bits in a warm kernel as in a fresh one (the
    toy tables of ``make paper`` were checked equal, cell by cell). A kernel that died, or whose
    run failed, is replaced by a fresh one. Kernels follow the batch process: jupyter_client gives each its parent's pid
    (``JPY_PARENT_PID``) and ipykernel exits when that parent is gone."""

    RESET = ("%reset -f\nimport gc as _gc, sys as _sys\n"
             "if 'matplotlib.pyplot' in _sys.modules:\n"
             "    _sys.modules['matplotlib.pyplot'].close('all')\n"
             "_gc.collect()\ndel _gc, _sys\n")

    def __init__(self, cwd: Path, kernel_name: str = "python3", timeout: float = 120.0):
        self.cwd, self.kernel_name, self.timeout = Path(cwd), kernel_name, timeout
        self._local = threading.local()
        self._started: list = []
        self._guard = threading.Lock()

    def acquire(self) -> tuple:
        """(kernel manager, a new client) for this thread's kernel: the warm one, cleared, or
        a new one. Each run gets its own client (a client that nbclient has executed with
        cannot be used again); ``release`` closes it."""
        km = getattr(self._local, "km", None)
        if km is not None and km.is_alive():
            kc = self._client(km)
            if kc is not None and self._reset(kc):
                return km, kc
            self.release(kc)
        if km is not None:
            self.discard()
        km = ipc_kernel_manager()(kernel_name=self.kernel_name)
        km.start_kernel(cwd=str(self.cwd))
        with self._guard:
            self._started.append(km)
        self._local.km = km
        kc = self._client(km)
        if kc is None:
            self.discard()
            raise CpfcteError(f"a {self.kernel_name} kernel did not start within "
                              f"{self.timeout:.0f} s")
        return km, kc

    def _client(self, km):
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=self.timeout)
        except RuntimeError:
            self.release(kc)
            return None
        return kc

    def _reset(self, kc) -> bool:
        try:
            reply = kc.execute_interactive(self.RESET, store_history=False, timeout=self.timeout,
                                           output_hook=lambda msg: None)
        except Exception:  # timeout, dead channel: the kernel is not usable
            return False
        return reply.get("content", {}).get("status") == "ok"

    @staticmethod
    def release(kc) -> None:
        if kc is not None:
            kc.stop_channels()

    def discard(self) -> None:
        """Shut down this thread's kernel (after a failed run: its state is unknown)."""
        km, self._local.km = getattr(self._local, "km", None), None
        if km is not None and km.has_kernel:
            km.shutdown_kernel(now=True)

    def close(self) -> None:
        with self._guard:
            started, self._started = self._started, []
        for km in started:
            try:
                if km.has_kernel:
                    km.shutdown_kernel(now=True)
            except Exception:  # already gone
                pass


@functools.lru_cache(maxsize=1)
def ipc_kernel_manager():
    """The Jupyter kernel manager class of the batch: its kernels talk over IPC sockets in a
    private temporary folder (removed at shutdown), not over TCP on localhost. No other user of
    the machine can reach them, and they do not print "Kernel is running over TCP without
    encryption" at their start (once per kernel, once per cluster job). Their real errors still
    show."""
    import tempfile

    from jupyter_client.manager import KernelManager

    class IPCKernelManager(KernelManager):
        def __init__(self, **kw):
            kw.setdefault("transport", "ipc")
            kw.setdefault("ip", str(Path(tempfile.mkdtemp(prefix="cpfcte-kernel-")) / "k"))
            super().__init__(**kw)

        async def _async_cleanup_resources(self, restart: bool = False) -> None:
            await super()._async_cleanup_resources(restart=restart)
            if not restart:
                shutil.rmtree(Path(self.ip).parent, ignore_errors=True)

    return IPCKernelManager


def execute_run(run: Run, profile: str, nb_profile: str, run_dir: Path, notebook_dir: Path,
                stamp: str, log=print, kernels: WarmKernels | None = None) -> dict:
    """Execute one run's notebook with papermill: in a warm kernel of ``kernels`` when given
    (the local executor), else in a kernel of its own (a cluster job)."""
    import papermill as pm

    run_dir.mkdir(parents=True, exist_ok=True)
    params = notebook_params(run, profile, nb_profile)
    record = {"run": run.name, "notebook": run.notebook, "stage": run.stage, "params": params,
              "stamp": stamp, "status": "running",
              "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "hardware": hardware()}
    write_json(run_dir / RUN_FILE, record)
    out_nb = run_dir / run.notebook
    log(f"[run] {run.name}: {run.notebook} {run.params}")
    t0 = time.time()
    try:
        if kernels is None:
            pm.execute_notebook(str(notebook_dir / run.notebook), str(out_nb), parameters=params,
                                kernel_name="python3", cwd=str(notebook_dir), progress_bar=False,
                                kernel_manager_class=ipc_kernel_manager())
        else:
            km, kc = kernels.acquire()
            try:
                pm.execute_notebook(str(notebook_dir / run.notebook), str(out_nb),
                                    parameters=params, kernel_name=kernels.kernel_name,
                                    progress_bar=False, km=km, kc=kc)
            finally:
                kernels.release(kc)
        record.update(status="done")
    except Exception as e:  # a failed cell, a dead kernel, ...
        if kernels is not None:
            kernels.discard()
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


def stage_times(results: dict[str, dict]) -> list[str]:
    """Where the minutes went: runs and seconds per stage of the runs this batch executed (each
    run's own wall time; with --jobs N they overlap)."""
    per: dict[str, list[float]] = {}
    for record in results.values():
        if record.get("seconds") is not None and not record.get("action"):
            per.setdefault(record.get("stage") or "?", []).append(float(record["seconds"]))
    if not per:
        return []
    total = sum(sum(v) for v in per.values())
    lines = [f"{'stage':<10}{'runs':>6}{'seconds':>10}{'per run':>10}{'share':>8}"]
    for stage, secs in sorted(per.items(), key=lambda kv: -sum(kv[1])):
        lines.append(f"{stage:<10}{len(secs):>6}{sum(secs):>10.0f}{sum(secs) / len(secs):>10.1f}"
                     f"{sum(secs) / total:>8.0%}")
    lines.append(f"{'all':<10}{sum(len(v) for v in per.values()):>6}{total:>10.0f}")
    return lines


def hardware() -> str:
    """One line naming the machine a run executed on (CPU model and cores, GPU if any); the
    stages record their code paths and versions themselves (``numerics.describe``)."""
    import os
    import platform

    from cpfcte.machinery.numerics import cpu_model

    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:  # a broken CUDA install must not stop the batch
        gpu = "GPU unknown"
    return f"{cpu_model()}, {platform.machine()} {os.cpu_count()} cores, {gpu}"


def _short_error(e: Exception) -> str:
    text = str(e).strip().splitlines()
    lines = [ln for ln in text if ln.strip()]
    tail = lines[-1] if lines else traceback.format_exception_only(type(e), e)[-1].strip()
    return f"{type(e).__name__}: {tail}"[:500]
