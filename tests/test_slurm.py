"""The toy batch through a real SLURM: `cpfcte paper --only table1 --executor slurm` submits
every run with sbatch (through submitit), one job is killed with scancel, the batch reports it
failed with its log, and the resubmission runs only what is missing. `.ci/run` starts a one-node
SLURM for this (`.ci/slurm/start`: slurm-wlm and munge from Debian); elsewhere the test is
skipped with the reason, and under CI=true it fails with it (conftest.skip_or_fail). The check
is patient (sinfo retried for five minutes) and names the daemon that does not answer, with the
last lines of its log."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest


def _daemons() -> str:
    """Which SLURM daemons run, and the last lines of the log of each one that does not."""
    from pathlib import Path

    conf = Path(os.environ.get("SLURM_CONF", "/tmp/cpfcte-slurm/slurm.conf"))
    parts = []
    for daemon in ("munged", "slurmctld", "slurmd"):
        running = subprocess.run(["pgrep", "-x", daemon], capture_output=True).returncode == 0
        parts.append(f"{daemon} {'running' if running else 'NOT running'}")
        log = conf.parent / f"{daemon}.log"
        if not running and log.is_file():
            tail = log.read_text(errors="replace").splitlines()[-5:]
            parts.append(f"{log} ends: " + " | ".join(tail))
    return "; ".join(parts)


def _controller_port() -> str:
    """Whether slurmctld's port (SlurmctldHost, SlurmctldPort or 6817, from SLURM_CONF)
    accepts a TCP connection: tells a controller that does not answer from one that is not
    reachable."""
    import re
    import socket
    from pathlib import Path

    conf = Path(os.environ.get("SLURM_CONF", "/tmp/cpfcte-slurm/slurm.conf"))
    text = conf.read_text() if conf.is_file() else ""
    host = (re.search(r"^SlurmctldHost=([^\s(]+)", text, re.M) or [None, "localhost"])[1]
    port = int((re.search(r"^SlurmctldPort=(\d+)", text, re.M) or [None, 6817])[1])
    try:
        with socket.create_connection((host, port), timeout=5):
            return f"{host}:{port} accepts connections"
    except OSError as e:
        return f"{host}:{port} refuses a connection ({e})"


def _slurm_up(attempts: int = 10, wait: float = 10.0) -> str | None:
    conf = os.environ.get("SLURM_CONF")
    if conf is not None and not os.path.isfile(conf):    # sinfo would retry it for a minute
        return (f"SLURM_CONF={conf!r} is not a file; export the one line that .ci/slurm/start "
                f"prints")
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "SLURM is not installed (sudo .ci/slurm/start installs and starts a one-node one)"
    last = ""
    for attempt in range(attempts):               # a controller that is still starting answers
        try:
            out = subprocess.run(["sinfo", "-vv", "-h", "-o", "%t"], capture_output=True, text=True,
                                 timeout=20)
            if out.returncode == 0 and any(s in out.stdout for s in ("idle", "mix", "alloc")):
                return None
            last = (f"sinfo exit {out.returncode}, states {out.stdout.split()}: "
                    f"{out.stderr.strip()[:200]}")
        except subprocess.TimeoutExpired as e:          # what sinfo said before it hung
            raw = e.stderr or b""
            said = (raw.decode(errors="replace") if isinstance(raw, bytes) else raw)
            said = said.strip().splitlines()[-3:]
            last = (f"sinfo hung for {e.timeout:.0f} s ({' | '.join(said) or 'silent'}); "
                    f"{_controller_port()}")
        except (OSError, subprocess.SubprocessError) as e:
            last = f"sinfo failed ({e})"
        if attempt + 1 < attempts:
            time.sleep(wait)
    return (f"no SLURM controller with an idle node after {attempts} tries ({last}); "
            f"{_daemons()}; start one with .ci/slurm/start and export SLURM_CONF")


@pytest.fixture(scope="module")
def slurm():
    from conftest import skip_or_fail

    skip_or_fail(_slurm_up())


def _squeue() -> list[tuple[str, str, str]]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %j %T"], capture_output=True, text=True,
                         timeout=20).stdout
    return [tuple(line.split()) for line in out.splitlines() if line.strip()]


def test_toy_table1_through_slurm_survives_a_cancelled_job(slurm, tmp_path):
    env = {**os.environ, "CPFCTE_RUNS": str(tmp_path / "runs"),
           "CPFCTE_OUT": str(tmp_path / "out"), "MPLBACKEND": "Agg"}
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("cpus_per_task: 1\nmem_gb: 2\npoll_seconds: 2\nmin_minutes: 20\n")
    cmd = [sys.executable, "-m", "cpfcte", "paper", "--profile", "toy", "--only", "table1",
           "--executor", "slurm", "--cluster", str(cluster)]
    t0 = time.time()
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        victim, deadline = None, time.time() + 600
        while victim is None and time.time() < deadline and first.poll() is None:
            for job_id, name, state in _squeue():
                if name == "cpfcte-train_full_s1" and state == "RUNNING":
                    victim = job_id
            time.sleep(1)
        assert victim, f"the job of train_full_s1 never ran: {(tmp_path / 'first.log').read_text()}"
        subprocess.run(["scancel", victim], check=True, timeout=20)
        first.wait(timeout=900)
    text = (tmp_path / "first.log").read_text()
    assert first.returncode == 1, text                       # "not done: ..."
    assert f"[failed] train_full_s1: job {victim}" in text and "without a result" in text
    assert "[blocked] pseudo_full_s1: needs train_full_s1" in text
    assert "[blocked] pseudo_trainaug: needs train_full_s1" in text   # waits for every seed
    runs = tmp_path / "runs" / "toy"
    assert json.loads((runs / "train_full_s1" / "job.json").read_text())["job_id"] == victim
    ids = {json.loads((runs / r / "job.json").read_text())["job_id"]
           for r in ("data", "train_full", "train_full_s2", "pseudo_full", "pseudo_full_s2")}
    assert all(i.isdigit() for i in ids) and len(ids) == 5      # sbatch's job ids, one each
    status = subprocess.run([*cmd[:6], "--status"], env=env, capture_output=True, text=True,
                            timeout=60).stdout
    assert "train_full_s1" in status and "failed" in status and victim in status
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    submitted = sorted(line.split()[1].rstrip(":") for line in second.stdout.splitlines()
                       if line.startswith("[submitted]"))
    assert submitted == ["pseudo_full_s1", "pseudo_trainaug", "train_full_s1"], second.stdout
    table = (tmp_path / "out" / "tables" / "table1.md").read_text()
    assert "(n=3)" in table
    print(f"SLURM test: {time.time() - t0:.0f} s, cancelled job {victim}")


def test_a_slurm_conf_that_is_not_a_file_is_named_at_once(monkeypatch):
    monkeypatch.setenv("SLURM_CONF", "Reading package lists...\n/tmp/cpfcte-slurm/slurm.conf")
    t0 = time.time()
    reason = _slurm_up(attempts=1)
    assert reason is not None and "is not a file" in reason and "Reading package" in reason
    assert time.time() - t0 < 5                                   # no sinfo waited on
