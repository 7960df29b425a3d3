"""Faults: refused writes, kills during a write, worker pools that follow their stage, and the
reduced form of ``benchmarks/fault_bench.py`` (every stage's full form: docs/engineering.md, "Faults")."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cpfcte.machinery import faults
from cpfcte.machinery.errors import CpfcteError
from cpfcte.machinery.io import atomic_path, clean_partial, write_json, write_text
from cpfcte.machinery.paths import project_root
from tests.conftest import TINY_MODEL


def _bench():
    spec = importlib.util.spec_from_file_location(
        "fault_bench", project_root() / "benchmarks" / "fault_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module           # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_fault_specs_are_parsed_and_bad_ones_refused():
    assert faults.parse("kill-write:3") == ("kill", 3)
    assert faults.parse("ENOSPC-write:1") == ("ENOSPC", 1)
    assert faults.parse("count") == ("count", 0)
    for bad in ("kill", "kill-write:0", "EIO-write:2", "kill-write:x"):
        with pytest.raises(ValueError, match="kill-write:N"):
            faults.parse(bad)


@pytest.mark.parametrize("kind, words", [("ENOSPC", "No space left on device"),
                                         ("EACCES", "Permission denied")])
def test_a_refused_write_names_the_folder_and_keeps_the_file_before_it(
        tmp_path, monkeypatch, kind, words):
    target = tmp_path / "runs" / "x" / "metrics.json"
    write_json(target, {"miou": 0.5})
    monkeypatch.setattr(faults, "_writes", 0)
    monkeypatch.setenv(faults.VARIABLE, f"{kind}-write:1")
    monkeypatch.setenv(faults.OWNER, str(os.getpid()))
    with pytest.raises(CpfcteError) as e:
        write_json(target, {"miou": 0.9})
    assert str(target.parent) in str(e.value) and words in str(e.value)
    assert "rerun" in str(e.value)
    assert json.loads(target.read_text()) == {"miou": 0.5}          # the old file, whole
    assert list(target.parent.glob(".*.tmp")) == []
    write_json(target, {"miou": 0.9})                               # only the first write failed
    assert json.loads(target.read_text()) == {"miou": 0.9}


def test_a_child_process_inherits_the_variable_but_not_the_fault(tmp_path, monkeypatch):
    monkeypatch.setattr(faults, "_writes", 0)
    monkeypatch.setenv(faults.VARIABLE, "ENOSPC-write:1")
    monkeypatch.setenv(faults.OWNER, str(os.getpid() + 1))         # someone else's
    write_text(tmp_path / "a.txt", "fine")
    assert (tmp_path / "a.txt").read_text() == "fine"


def test_a_real_oserror_becomes_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CpfcteError, match="cannot write x.json"):
        write_json(blocker / "x.json", {})                          # its folder is a file
    with pytest.raises(CpfcteError, match="cannot write"):
        with atomic_path(tmp_path / "y.bin") as tmp:
            raise OSError(28, "No space left on device", str(tmp))


def test_kill_during_a_write_keeps_the_old_file_and_the_next_start_cleans_up(tmp_path):
    target = tmp_path / "table1.md"
    target.write_text("old\n")
    code = (f"import cpfcte; from cpfcte.machinery.io import write_text; "
            f"write_text({str(target)!r}, 'new' * 100000)")
    env = {**os.environ, faults.VARIABLE: "kill-write:1"}
    env.pop(faults.OWNER, None)
    proc = subprocess.run([sys.executable, "-c", code], env=env)
    assert proc.returncode == -signal.SIGKILL
    assert target.read_text() == "old\n"
    left = list(tmp_path.glob(".table1.md.*.tmp"))
    assert len(left) == 1 and left[0].stat().st_size == 300000     # the new bytes, not renamed
    assert clean_partial(tmp_path, ["table1.md"]) == 1 and target.read_text() == "old\n"


def test_cleaning_spares_a_write_in_progress_of_another_live_process(tmp_path):
    """Two report runs of one batch write the same figures at once: the one that starts
    second must not delete the other's temporary file (it did: "cannot write fig5.png")."""
    target = tmp_path / "fig5.png"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        writing = tmp_path / f".fig5.png.{live.pid}.ab12cd_3.tmp"      # live writer
        cut = tmp_path / f".fig5.png.{dead.pid}.zz99yy_0.tmp"          # a killed writer
        old = tmp_path / ".fig5.png.q1w2e3r4.tmp"                      # no pid: stale
        for f in (writing, cut, old):
            f.write_bytes(b"x")
        with atomic_path(target) as tmp:
            assert f".fig5.png.{os.getpid()}." in tmp.name               # names its writer
            tmp.write_bytes(b"png")
            assert clean_partial(tmp_path, ["fig5.png"]) == 3               # own, cut, old
            tmp.write_bytes(b"png")
        assert writing.exists() and not cut.exists() and not old.exists()
        assert target.read_bytes() == b"png"
    finally:
        live.kill()
        live.wait()
    assert clean_partial(tmp_path, recursive=True) == 1 and not writing.exists()


def test_crf_workers_exit_when_their_stage_is_killed(tmp_path):
    """A SIGKILLed stage leaves no CRF worker (nor the forkserver) behind: each worker watches
    the stage's pid (``crf._exit_with_owner``)."""
    bench = _bench()
    tag = "crf-orphans-" + str(os.getpid())
    code = ("import cpfcte, time; from cpfcte.stages.crf_pool import process_pool\n"
            "pool = process_pool(2)\n"
            "[f.result() for f in [pool.submit(time.sleep, 0.01) for _ in range(4)]]\n"
            "print('ready', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, bench.TAG: tag})
    assert proc.stdout.readline().strip() == "ready"
    started = [p for p in bench.tagged_processes(tag) if p != proc.pid]
    assert len(started) >= 3                               # forkserver and two workers at least
    proc.kill()
    proc.wait()
    proc.stdout.close()
    t0 = time.time()
    assert bench.orphans_after(tag, grace=5.0) == 0
    assert time.time() - t0 < 5.0


def test_fault_bench_reduced(tmp_path, toy_root):
    """The benchmark's reduced form: training, the dense CRF (its pool) and report writing,
    each killed twice (once at a random moment, once during a write), plus a full disk and a
    refused permission on training: every rerun identical to the uninterrupted one, no
    temporary file, no orphan, clear errors."""
    tiny = [f"{k}={json.dumps(v)}" for k, v in TINY_MODEL.items()]
    rows = _bench().main(["--out", str(tmp_path / "faults"), "--kills", "2", "--seed", "1",
                          "--stages", "training,dense CRF,report writing", "--toy",
                          str(toy_root), "--faults-on", "training", "--set", *tiny])
    by = {r["stage"]: r for r in rows}
    assert set(by) == {"training", "dense CRF", "report writing"}
    for r in rows:
        assert r["kills"] == 2, r
        assert r["identical"] == 2 and r["temporary_left"] == 0 and r["orphans"] == 0, r
    for kind in ("ENOSPC", "EACCES"):
        assert by["training"][kind]["ok"], by["training"][kind]
        assert "cannot write" in by["training"][kind]["error"]


def test_atomic_writes_honour_the_umask(tmp_path):
    """Files written through the atomic writer get the mode open() would give them (0666 less
    the umask), not mkstemp's 0600: a group that shares datasets and predictions can read them."""
    import stat
    import subprocess
    import sys

    code = ("import os; os.umask(0o002); from cpfcte.machinery.io import write_text; "
            f"write_text({str(tmp_path / 'a.txt')!r}, 'x')")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o664
    code = code.replace("0o002", "0o077").replace("a.txt", "b.txt")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o600
