"""Dense CRF refinement (Sec. 3.4, Fig. 3; Table 1: 67.1 → 70.8; note 8) and the one process
pool that runs it, for the pseudo labels and for DeepLabv2's test-time CRF (note 15).

``dense_crf`` wraps pydensecrf (installed as ``pydensecrf2``, same ``import pydensecrf`` API):
the unary is -log of the softmax probabilities, with a Gaussian (smoothness) kernel and a
bilateral (appearance) kernel, and mean-field inference for a fixed number of iterations. Its
parameters are a ``cpfcte.config.CRFConfig`` (``cfg.crf``), the one home of their defaults.

``crf_stage`` refines a stream of ``CRFJob``s, one image each: either the patch-grid
probabilities saved by the pseudo-label stage (only the classes of the image label), upsampled
bilinearly to the image size and renormalised, or probabilities already at the image size
(DeepLabv2's multi-scale prediction). The CRF runs over those classes only (about twice as fast
as over all 21) and the argmax is written as a palette PNG, atomically. The stage runs in a
process pool over all cores with a bounded number of jobs in flight, skips images already
written (a killed run resumes), and survives a crashing worker: the images that failed are
reported, the rest are written.
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

from cpfcte.config import CRFConfig
from cpfcte.errors import CpfcteError
from cpfcte.io import clean_partial, pid_alive


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CRFConfig = CRFConfig()) -> np.ndarray:
    """Refine ``probs`` (C×H×W, each pixel's column summing to 1) on ``image`` (H×W×3 uint8)
    with the CRF ``params``; returns refined C×H×W float32 probabilities."""
    import pydensecrf.densecrf as dcrf

    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise CpfcteError(f"dense_crf: image must be a uint8 array, got "
                          f"{getattr(image, 'dtype', type(image).__name__)}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise CpfcteError(f"dense_crf: image must be H×W×3, got shape {image.shape}")
    probs = np.asarray(probs)
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise CpfcteError(f"dense_crf: probabilities {probs.shape} do not match the image "
                          f"{image.shape[:2]} (expected C×H×W)")
    if not np.issubdtype(probs.dtype, np.floating):
        raise CpfcteError(f"dense_crf: probabilities must be floats, got {probs.dtype}")
    if params.iterations < 1:
        raise CpfcteError(f"dense_crf: iterations must be ≥ 1, got {params.iterations}")
    sums = probs.sum(axis=0)
    if probs.min() < -1e-6 or not np.allclose(sums, 1.0, atol=1e-3):
        raise CpfcteError("dense_crf: probabilities must be ≥ 0 and sum to 1 over classes at "
                          f"every pixel (sums range {sums.min():.4f}..{sums.max():.4f})")
    c, h, w = probs.shape
    unary = -np.log(np.clip(probs.astype(np.float32), 1e-8, 1.0)).reshape(c, -1)
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.array(unary, dtype=np.float32, order="C"))
    d.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    d.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb,
                           rgbim=np.array(image, dtype=np.uint8, order="C"),
                           compat=params.bilateral_compat)
    q = np.asarray(d.inference(int(params.iterations)), dtype=np.float32)
    return q.reshape(c, h, w)


# ---------------------------------------------------------------------------------------------
# the stage over a folder


def save_grid_probs(path: Path, probs, labels) -> None:
    """Save the patch-grid probabilities (C, h, w) of the classes present in ``labels`` (C,)."""
    from cpfcte.io import atomic_path

    present = np.flatnonzero(np.asarray(labels) > 0)
    grid = np.asarray(probs)[present].astype(np.float16)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, probs=grid, classes=present.astype(np.int16))


def load_grid_probs(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path) as data:
            return data["probs"].astype(np.float32), data["classes"].astype(np.int64)
    except Exception as e:
        raise CpfcteError(f"{path}: cannot read saved probabilities ({e}); delete it and rerun "
                          "the pseudo-label stage") from None


def bilinear_resize(grid: np.ndarray, size: tuple[int, int],
                    align_corners: bool = False) -> np.ndarray:
    """(K, h, w) → (K, H, W), bilinear: with half-pixel centres, the same values as
    ``torch.nn.functional.interpolate(..., mode="bilinear", align_corners=False)``, or with
    ``align_corners`` those of ``align_corners=True`` (ViT-PCM's resize) (both tested), in
    numpy so that CRF workers need no torch."""

    def axis(n_out: int, n_in: int):
        if align_corners:
            step = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
            src = np.arange(n_out, dtype=np.float64) * step
        else:
            src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
            src = np.clip(src, 0, None)
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, (src - i0).astype(np.float32)

    y0, y1, wy = axis(size[0], grid.shape[1])
    x0, x1, wx = axis(size[1], grid.shape[2])
    rows = grid[:, y0] * (1 - wy)[None, :, None] + grid[:, y1] * wy[None, :, None]
    return rows[:, :, x0] * (1 - wx) + rows[:, :, x1] * wx


def crf_labels(image: np.ndarray, probs: np.ndarray, classes, params: CRFConfig) -> np.ndarray:
    """The label map of the CRF refinement of K×H×W ``probs`` whose maps are ``classes``."""
    return np.asarray(classes)[dense_crf(image, probs, params).argmax(axis=0)].astype(np.uint8)


def upsampled_probs(grid: np.ndarray, size: tuple[int, int],
                    align_corners: bool = False) -> np.ndarray:
    """Bilinear upsampling of (K, h, w) to (K, H, W) (as for the BPM), renormalised over K."""
    up = np.clip(bilinear_resize(grid.astype(np.float32), size, align_corners), 0, None)
    return up / np.clip(up.sum(axis=0, keepdims=True), 1e-8, None)


@dataclass(frozen=True)
class CRFJob:
    """One image for the CRF. ``image``: a file or an H×W×3 uint8 array. ``probs``: the
    ``.npz`` of patch-grid probabilities written by ``save_grid_probs`` (upsampled to the image
    size in the worker), or K×H×W probabilities at the image size, each pixel summing to 1,
    with ``classes`` the label of each of the K maps. ``out``: the PNG to write.
    ``align_corners``: how the patch grid is upsampled (``bilinear_resize``)."""

    out: str
    image: str | np.ndarray = field(repr=False)
    probs: str | np.ndarray = field(repr=False)
    classes: np.ndarray | None = field(default=None, repr=False)
    align_corners: bool = False

    @property
    def name(self) -> str:
        return Path(self.out).stem


def crf_image(job: CRFJob, params: dict) -> str:
    """Worker: one job → one refined PNG. Returns the image id."""
    from cpfcte.io import read_image, save_label_png

    if isinstance(job.image, np.ndarray):
        img = job.image
    else:
        img = np.asarray(read_image(job.image), dtype=np.uint8)
    if isinstance(job.probs, np.ndarray):
        probs, classes = job.probs, np.asarray(job.classes)
    else:
        grid, classes = load_grid_probs(Path(job.probs))
        probs = upsampled_probs(grid, img.shape[:2], job.align_corners)
    save_label_png(job.out, crf_labels(img, probs, classes, CRFConfig(**params)))
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
    from cpfcte.guard import refuse_ground_truth
    from cpfcte.progress import progress_bar

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
