"""The CRF over a folder (``crf_stage``): one process pool, for the pseudo labels and for
DeepLabv2's test-time CRF (note 15).

``crf_stage`` refines a stream of ``CRFJob``s, one image each: either the patch-grid
probabilities saved by the pseudo-label stage (only the classes of the image label), upsampled
bilinearly to the image size and renormalised (``cpfcte.method.crf.crf_input``), or
probabilities already at the image size (DeepLabv2's multi-scale prediction). The CRF
(``cpfcte.method.crf``) runs over every class (``crf.classes=all``, the references) or the
image's only, and the argmax is written as a palette PNG, atomically. The stage runs in a process pool over all cores with a bounded number of jobs in
flight, skips images already written (a killed run resumes), and survives a crashing worker:
the images that failed are reported, the rest are written.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cpfcte.machinery.config import CRFConfig
from cpfcte.machinery.errors import CpfcteError
from cpfcte.machinery.io import clean_partial, pid_alive
from cpfcte.method.crf import crf_input, crf_labels, load_grid_probs


@dataclass(frozen=True)
class CRFJob:
    """One image for the CRF. ``image``: a file or an H×W×3 uint8 array. ``probs``: the
    ``.npz`` of patch-grid probabilities written by ``save_grid_probs`` (upsampled to the image
    size in the worker), or K×H×W probabilities at the image size, each pixel summing to 1,
    with ``classes`` the label of each of the K maps. ``out``: the PNG to write.
    ``num_classes``: the dataset's, for a CRF over all classes (``crf.classes=all``)."""

    out: str
    image: str | np.ndarray = field(repr=False)
    probs: str | np.ndarray = field(repr=False)
    classes: np.ndarray | None = field(default=None, repr=False)
    num_classes: int = 0

    @property
    def name(self) -> str:
        return Path(self.out).stem


def crf_image(job: CRFJob, params: dict) -> str:
    """Worker: one job → one refined PNG. Returns the image id."""
    from cpfcte.machinery.io import read_image, save_label_png

    if isinstance(job.image, np.ndarray):
        img = job.image
    else:
        img = np.asarray(read_image(job.image), dtype=np.uint8)
    crf = CRFConfig(**params)
    if isinstance(job.probs, np.ndarray):
        probs, classes = job.probs, np.asarray(job.classes)
    else:
        grid, present = load_grid_probs(Path(job.probs))
        probs, classes = crf_input(grid, present, img.shape[:2], crf, job.num_classes)
    save_label_png(job.out, crf_labels(img, probs, classes, crf))
    return job.name


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A pool whose workers start from a clean forkserver process, not forked from the caller:
    a worker forked from a Jupyter kernel inherits its messaging sockets and, when it exits,
    can garble the kernel's output stream. Each worker watches the process that made the pool
    and exits when it is gone (``_exit_with_owner``), so a killed stage leaves no orphan."""
    import multiprocessing

    return ProcessPoolExecutor(max_workers=workers,
                               mp_context=multiprocessing.get_context("forkserver"),
                               initializer=_exit_with_owner, initargs=(os.getpid(),))


def _exit_with_owner(owner: int) -> None:
    """Worker initializer: a daemon thread that ends this worker as soon as process ``owner``
    (the stage) ends. Without it a SIGKILLed stage leaves its workers blocked on their job queue
    for ever, and the forkserver with them (it lives while any of its children does)."""
    import threading

    def watch() -> None:
        import select

        try:
            fd = os.pidfd_open(owner)          # readable once the process has exited
            select.select([fd], [], [])
        except OSError:                        # gone already, or no pidfd: poll
            while pid_alive(owner):
                time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="cpfcte-owner-watch").start()


@dataclass
class _Tally:
    written: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)

    def outcome(self, job: CRFJob, error: Exception | None, bar) -> None:
        if error is None:
            self.written += 1
        else:  # an error in one image: report it, go on
            self.failed[job.name] = f"{type(error).__name__}: {error}"
        bar.update(1)


def crf_stage(jobs: Iterable[CRFJob], params: CRFConfig, *, progress: bool = True,
              total: int | None = None, desc: str = "dense CRF") -> dict:
    """Run ``crf_image`` over ``jobs`` with ``params`` (``params.workers`` processes; 0: every
    core; 1: in this process), skipping jobs whose output exists. ``jobs`` may be a list or a
    generator (consumed lazily, at most 2·workers + 1 jobs in flight, so a producer such as
    DeepLabv2's prediction holds only that many probability maps). Returns counts, seconds and
    the images that failed (with their error)."""
    from cpfcte.machinery.guard import refuse_ground_truth
    from cpfcte.machinery.progress import progress_bar

    tally = _Tally()
    folders: set[Path] = set()

    def pending(stream: Iterable[CRFJob]) -> Iterator[CRFJob]:
        for job in stream:
            folder = Path(job.out).parent
            if folder not in folders:
                refuse_ground_truth(folder, "CRF output folder")
                folder.mkdir(parents=True, exist_ok=True)
                clean_partial(folder)
                folders.add(folder)
            if Path(job.out).exists():
                tally.skipped += 1
                continue
            yield job

    if isinstance(jobs, (list, tuple)):
        todo: Iterator[CRFJob] = iter(list(pending(jobs)))
        total = len(jobs) - tally.skipped
    else:
        todo = pending(jobs)
    workers = params.workers or os.cpu_count() or 1
    p = params.parameters()
    t0 = time.time()
    bar = progress_bar(total=total, desc=desc, disable=not progress, leave=False)
    if workers == 1:
        for job in todo:
            try:
                crf_image(job, p)
                tally.outcome(job, None, bar)
            except Exception as e:  # noqa: BLE001 (reported per image)
                tally.outcome(job, e, bar)
    else:
        _run_pool(todo, p, workers, tally, bar)
    bar.close()
    return {"written": tally.written, "skipped": tally.skipped, "failed": tally.failed,
            "seconds": round(time.time() - t0, 3), "workers": workers}


def _run_pool(jobs: Iterator[CRFJob], p: dict, workers: int, tally: _Tally, bar) -> None:
    """Run ``jobs`` in a pool, at most 2·workers + 1 in flight.

    A pool whose worker dies (a segfault in the C++ CRF, the OOM killer) fails every job in
    flight with BrokenProcessPool, and the one that killed it is among them: each is rerun alone
    in a single-worker pool (a job that kills that one is the culprit and is reported), then
    the stream goes on in a new pool.
    """
    window = 2 * workers + 1
    while True:
        broken: list[CRFJob] = []
        with process_pool(workers) as pool:
            running: dict = {}
            exhausted = False
            while not broken:
                while not exhausted and len(running) < window:
                    job = next(jobs, None)
                    if job is None:
                        exhausted = True
                    else:
                        running[pool.submit(crf_image, job, p)] = job
                if not running:
                    break
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for fut in [f for f in running if f in done]:   # in submission order
                    broken += _settle(fut, running.pop(fut), tally, bar)
            for fut, job in list(running.items()):              # the pool is broken
                broken += _settle(fut, job, tally, bar)
        if not broken:
            return
        for job in broken:
            _run_alone(job, p, tally, bar)


def _settle(fut, job: CRFJob, tally: _Tally, bar) -> list[CRFJob]:
    """Record a finished future; return [job] when its pool broke under it."""
    try:
        fut.result()
    except BrokenProcessPool:
        return [job]
    except Exception as e:  # noqa: BLE001 (reported per image)
        tally.outcome(job, e, bar)
        return []
    tally.outcome(job, None, bar)
    return []


def _run_alone(job: CRFJob, p: dict, tally: _Tally, bar) -> None:
    """Rerun a suspect in a pool of its own: if that pool breaks too, the job killed it."""
    with process_pool(1) as pool:
        if _settle(pool.submit(crf_image, job, p), job, tally, bar):
            tally.outcome(job, RuntimeError("the CRF worker process died on this image"), bar)


def raise_on_failures(run: dict, out_dir: Path) -> None:
    """A CRF stage with failed images is an error naming them (the others are written)."""
    if run["failed"]:
        first = next(iter(run["failed"].items()))
        raise CpfcteError(f"dense CRF failed on {len(run['failed'])} image(s), e.g. {first[0]}: "
                          f"{first[1]}; the others are written to {out_dir}; rerun to retry")
