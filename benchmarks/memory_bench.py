"""Peak memory of `make paper` (toy) and of one notebook kernel.

    .venv/bin/python benchmarks/memory_bench.py [--only GROUP ...] [--jobs 2]

Runs ``cpfcte paper --profile toy`` into a fresh temporary runs folder (the dataset in data/ is
reused) and samples, every 0.2 s, the resident memory of the whole process tree (the batch
runner, every notebook kernel and the CRF workers, summed) and of each kernel alone. Prints the
peaks next to the budgets (4 GB for the whole batch, 2 GB for one kernel) and the wall time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import psutil


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    runs = tempfile.mkdtemp(prefix="mem-bench-runs-")
    cmd = [sys.executable, "-m", "cpfcte", "paper", "--profile", "toy", "--jobs", str(args.jobs)]
    if args.only:
        cmd += ["--only", *args.only]
    env = {**os.environ, "CPFCTE_RUNS": runs}
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = psutil.Process(proc.pid)
    peak_tree = peak_kernel = 0
    while proc.poll() is None:
        try:
            procs = [root] + root.children(recursive=True)
            rss = {}
            for p in procs:
                try:
                    rss[p.pid] = (p.memory_info().rss, " ".join(p.cmdline()))
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            peak_tree = max(peak_tree, sum(r for r, _ in rss.values()))
            kernels = [r for r, c in rss.values() if "ipykernel" in c]
            peak_kernel = max([peak_kernel] + kernels)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    wall = time.time() - t0
    gib = 1024 ** 3
    print(f"cpfcte paper --profile toy{' --only ' + ' '.join(args.only) if args.only else ''} "
          f"--jobs {args.jobs}: exit {proc.returncode}, {wall / 60:.1f} min")
    print(f"peak RSS, whole process tree: {peak_tree / gib:.2f} GiB (budget 4 GiB)")
    print(f"peak RSS, one notebook kernel: {peak_kernel / gib:.2f} GiB (budget 2 GiB)")


if __name__ == "__main__":
    main()
