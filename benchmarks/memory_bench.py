"""Peak memory of `make paper` (toy) and of one notebook kernel.

    .venv/bin/python benchmarks/memory_bench.py [--only GROUP ...] [--jobs 2]

Runs ``cpfcte paper --profile toy`` into a fresh temporary runs folder, with its tables and
figures in another (the committed ones in tables/ and figures/ are not touched; the dataset in
data/ is reused) and samples, every 0.5 s, the memory of the whole process tree (the batch runner, every
notebook kernel and the CRF workers) and of each kernel alone. The tree's total is the sum of
PSS (proportional set size: a page shared by forked CRF workers counts once overall; a plain
RSS sum counts it once per process and overstates the total) and, for reference, of RSS.
Prints the peaks next to the budgets (4 GB for the whole batch, 2 GB for one kernel, RSS).
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
    env = {**os.environ, "CPFCTE_RUNS": runs, "CPFCTE_OUT": tempfile.mkdtemp(prefix="mem-bench-out-")}
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = psutil.Process(proc.pid)
    peak_tree = peak_rss = peak_kernel = 0
    while proc.poll() is None:
        try:
            procs = [root] + root.children(recursive=True)
            mem = {}
            for p in procs:
                try:
                    full = p.memory_full_info()
                    mem[p.pid] = (full.pss, full.rss, " ".join(p.cmdline()))
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            peak_tree = max(peak_tree, sum(m[0] for m in mem.values()))
            peak_rss = max(peak_rss, sum(m[1] for m in mem.values()))
            peak_kernel = max([peak_kernel] + [m[1] for m in mem.values() if "ipykernel" in m[2]])
        except psutil.NoSuchProcess:
            break
        time.sleep(0.5)
    wall = time.time() - t0
    gib = 1024 ** 3
    print(f"cpfcte paper --profile toy{' --only ' + ' '.join(args.only) if args.only else ''} "
          f"--jobs {args.jobs}: exit {proc.returncode}, {wall / 60:.1f} min")
    print(f"peak memory, whole process tree: {peak_tree / gib:.2f} GiB PSS (budget 4 GiB); "
          f"sum of RSS {peak_rss / gib:.2f} GiB")
    print(f"peak RSS, one notebook kernel: {peak_kernel / gib:.2f} GiB (budget 2 GiB)")


if __name__ == "__main__":
    main()
