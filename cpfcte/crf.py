"""Dense CRF refinement of pseudo labels (Sec. 3.4, Fig. 3; Table 1: 67.1 → 70.8).

``dense_crf`` wraps pydensecrf (installed as ``pydensecrf2``, same ``import pydensecrf`` API):
the unary is -log of the softmax probabilities, with a Gaussian (smoothness) kernel and a
bilateral (appearance) kernel, and mean-field inference for a fixed number of iterations.

``crf_stage`` refines a folder of baseline pseudo masks: for every image it reads the patch-grid
probabilities saved by the pseudo-label stage (only the classes of the image label), upsamples
them bilinearly to the image size, renormalises, runs the CRF over those classes only (about
twice as fast as over all 21) and writes the argmax as a palette PNG, atomically. It runs in a
process pool over all cores, skips images already written (a killed run resumes), and survives
a crashing worker: the images that failed are reported, the rest are written.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cpfcte.errors import CpfcteError


@dataclass(frozen=True)
class CRFParams:
    """One documented parameter set. The defaults are the values used by pydensecrf's example
    and by AffinityNet/IRN-style WSSS code on VOC-sized images (~500×375): Gaussian sxy=3,
    compat=3; bilateral sxy=80, srgb=13, compat=10; 10 mean-field iterations (DESIGN note 8).
    The toy profile uses them too (on its ~100-pixel images a bilateral sxy of 16 or 30 scored
    within a point of 80)."""

    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 80.0
    bilateral_srgb: float = 13.0
    bilateral_compat: float = 10.0
    iterations: int = 10

    def describe(self) -> str:
        return (f"Gaussian (sxy {self.gaussian_sxy:g}, compat {self.gaussian_compat:g}), "
                f"bilateral (sxy {self.bilateral_sxy:g}, srgb {self.bilateral_srgb:g}, compat "
                f"{self.bilateral_compat:g}), {self.iterations} iterations")


def dense_crf(image: np.ndarray, probs: np.ndarray, *, gaussian: tuple[float, float] = (3, 3),
              bilateral: tuple[float, float, float] = (80, 13, 10),
              iterations: int = 10) -> np.ndarray:
    """Refine ``probs`` (C×H×W, each pixel's column summing to 1) on ``image`` (H×W×3 uint8);
    returns refined C×H×W float32 probabilities."""
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
    if iterations < 1:
        raise CpfcteError(f"dense_crf: iterations must be ≥ 1, got {iterations}")
    sums = probs.sum(axis=0)
    if probs.min() < -1e-6 or not np.allclose(sums, 1.0, atol=1e-3):
        raise CpfcteError("dense_crf: probabilities must be ≥ 0 and sum to 1 over classes at "
                          f"every pixel (sums range {sums.min():.4f}..{sums.max():.4f})")
    c, h, w = probs.shape
    unary = -np.log(np.clip(probs.astype(np.float32), 1e-8, 1.0)).reshape(c, -1)
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.array(unary, dtype=np.float32, order="C"))
    d.addPairwiseGaussian(sxy=gaussian[0], compat=gaussian[1])
    d.addPairwiseBilateral(sxy=bilateral[0], srgb=bilateral[1],
                           rgbim=np.array(image, dtype=np.uint8, order="C"), compat=bilateral[2])
    q = np.asarray(d.inference(int(iterations)), dtype=np.float32)
    return q.reshape(c, h, w)


def refine_with(params: CRFParams, image: np.ndarray, probs: np.ndarray) -> np.ndarray:
    return dense_crf(image, probs, gaussian=(params.gaussian_sxy, params.gaussian_compat),
                     bilateral=(params.bilateral_sxy, params.bilateral_srgb,
                                params.bilateral_compat), iterations=params.iterations)


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


def bilinear_resize(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(K, h, w) → (K, H, W), bilinear with half-pixel centres: the same values as
    ``torch.nn.functional.interpolate(..., mode="bilinear", align_corners=False)`` (tested),
    in numpy so that CRF workers need no torch."""

    def axis(n_out: int, n_in: int):
        src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
        src = np.clip(src, 0, None)
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, (src - i0).astype(np.float32)

    y0, y1, wy = axis(size[0], grid.shape[1])
    x0, x1, wx = axis(size[1], grid.shape[2])
    rows = grid[:, y0] * (1 - wy)[None, :, None] + grid[:, y1] * wy[None, :, None]
    return rows[:, :, x0] * (1 - wx) + rows[:, :, x1] * wx


def upsampled_probs(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of (K, h, w) to (K, H, W) (as for the BPM), renormalised over K."""
    up = np.clip(bilinear_resize(grid.astype(np.float32), size), 0, None)
    return up / np.clip(up.sum(axis=0, keepdims=True), 1e-8, None)


def crf_image(image_path: str, probs_path: str, out_path: str, params: dict) -> str:
    """Worker: one image → one refined PNG. Returns the image id."""
    from cpfcte.io import read_image, save_label_png

    img = np.asarray(read_image(image_path), dtype=np.uint8)
    grid, classes = load_grid_probs(Path(probs_path))
    probs = upsampled_probs(grid, img.shape[:2])
    refined = refine_with(CRFParams(**params), img, probs)
    save_label_png(out_path, classes[refined.argmax(axis=0)].astype(np.uint8))
    return Path(out_path).stem


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A pool whose workers start from a clean forkserver process, not forked from the caller:
    a worker forked from a Jupyter kernel inherits its messaging sockets and, when it exits,
    can garble the kernel's output stream."""
    import multiprocessing

    return ProcessPoolExecutor(max_workers=workers,
                               mp_context=multiprocessing.get_context("forkserver"))


def clean_partial(out_dir: Path) -> int:
    """Remove temporary files a killed run left behind (never a finished PNG)."""
    n = 0
    for tmp in out_dir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        n += 1
    return n


def crf_stage(jobs: list[tuple[str, str, str]], params: CRFParams, *, workers: int = 0,
              progress: bool = True) -> dict:
    """Run ``crf_image`` over ``jobs`` = [(image, probs.npz, out.png)], skipping outputs that
    exist. ``workers`` = 0 uses every core; 1 runs in this process. Returns counts, seconds and
    the images that failed (with their error)."""
    from cpfcte.progress import progress_bar as tqdm

    from cpfcte.guard import refuse_ground_truth

    for folder in {str(Path(out).parent) for _, _, out in jobs}:
        refuse_ground_truth(folder, "CRF output folder")
        Path(folder).mkdir(parents=True, exist_ok=True)
        clean_partial(Path(folder))
    todo = [j for j in jobs if not Path(j[2]).exists()]
    workers = workers or os.cpu_count() or 1
    p = asdict(params)
    failed: dict[str, str] = {}
    t0 = time.time()
    bar = tqdm(total=len(todo), desc="dense CRF", disable=not progress, leave=False)
    if workers == 1:
        for job in todo:
            try:
                crf_image(*job, p)
            except Exception as e:  # report and go on
                failed[Path(job[2]).stem] = f"{type(e).__name__}: {e}"
            bar.update(1)
    else:
        pending = list(todo)
        while pending:
            pending = _run_pool(pending, p, workers, failed, bar)
    bar.close()
    return {"written": len(todo) - len(failed), "skipped": len(jobs) - len(todo),
            "failed": failed, "seconds": round(time.time() - t0, 3), "workers": workers}


def _run_pool(jobs, p, workers, failed, bar) -> list:
    """Run ``jobs`` in one pool; returns the jobs left when a worker process died.

    A pool whose worker dies (a segfault in the C++ CRF, the OOM killer) fails every pending
    job with BrokenProcessPool. The executor hands out jobs in submission order, so the job that
    killed it is among the first 2·workers + 1 of those: they are rerun one per single-worker
    pool (a job that kills that one is the culprit and is reported), the rest go back to a pool.
    """
    broken = []
    with process_pool(workers) as pool:
        futures = [(pool.submit(crf_image, *job, p), job) for job in jobs]
        for fut, job in futures:
            try:
                fut.result()
            except BrokenProcessPool:
                broken.append(job)
                continue
            except Exception as e:  # an error in one image: report it, go on
                failed[Path(job[2]).stem] = f"{type(e).__name__}: {e}"
            bar.update(1)
    if not broken:
        return []
    if len(jobs) == 1:
        failed[Path(jobs[0][2]).stem] = "the CRF worker process died on this image"
        bar.update(1)
        return []
    suspects, rest = broken[:2 * workers + 1], broken[2 * workers + 1:]
    for job in suspects:
        _run_pool([job], p, 1, failed, bar)
    return rest
