"""The run-folder protocol every stage follows (training, pseudo labels, DeepLabv2).

    runs/<profile>/<run>/
        config.json     {"stage", "digest", "digest_of", "config", ...}: the whole Config of
                        the stage's latest call, and the digest of the fields that shaped its
                        outputs; a folder made by another stage, or with another digest, is
                        refused (results of two configs never mix in one folder)
        checkpoint.pt   training and DeepLabv2: weights, optimizer, progress; written atomically
                        after every epoch / checkpoint interval, so a killed run resumes from it
        weights.safetensors   instead of checkpoint.pt in a run made from a release bundle
                        (``cpfcte.stages.bundle``): the weights only, with the digest and the
                        epochs or iterations done in its metadata; such a run is read only
        log.jsonl       one JSON record per epoch (training) or checkpoint interval (DeepLabv2)
        log.txt         the text log
        summary.json    what training did (history, whether it is complete)
        metrics.json    the scores; the report reads these (``cpfcte.batch.catalog``)
        run.json        written by the batch runner around the stage (``cpfcte.batch``)

Every file is written atomically (``cpfcte.machinery.io``).
"""

from __future__ import annotations

import atexit
import json
import logging
from pathlib import Path
from typing import Any

from cpfcte.machinery.config import Config, config_from_dict, short_digest
from cpfcte.machinery.errors import CpfcteError
from cpfcte.machinery.io import (
    append_line,
    clean_partial,
    pid_alive,
    read_json,
    torch_save,
    write_json,
)
from cpfcte.machinery.paths import code_commit

CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
WEIGHTS = "weights.safetensors"
WEIGHTS_META = "cpfcte"      # one metadata key, a JSON object: one key keeps the file's bytes fixed
LOG = "log.jsonl"
TEXT_LOG = "log.txt"
SUMMARY = "summary.json"
METRICS = "metrics.json"
STAGES = ("train", "pseudo", "deeplab")
LOCK = ".lock"
_HELD: set[Path] = set()        # the run folders whose lock this process holds


def _release_held() -> None:
    """At exit: release every lock this process still holds."""
    for path in list(_HELD):
        RunFolder(path).unlock()


atexit.register(_release_held)


def releases_locks(stage):
    """Decorator of a stage's entry point: the run-folder locks taken during the call are
    released when it returns or raises, not when the process exits, so a notebook kernel that
    lives on after its stage does not keep other processes out of the folder."""
    import functools

    @functools.wraps(stage)
    def call(*args, **kwargs):
        before = set(_HELD)
        try:
            return stage(*args, **kwargs)
        finally:
            for path in _HELD - before:
                RunFolder(path).unlock()

    return call


def run_config(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """The config of the run in ``run_dir`` with ``overrides`` on top (None keeps the run's
    value): what a downstream stage runs with."""
    from cpfcte.machinery.config import derive

    return derive(RunFolder(run_dir).config(), overrides)


class RunFolder:
    """One stage's run folder (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # --- config -----------------------------------------------------------------------------
    def start(self, stage: str, cfg: Config, digest_of: dict[str, Any],
              **extra: Any) -> "RunFolder":
        """Create the folder and write its config.json, or check the one there: same stage and
        same digest of ``digest_of`` (the fields that shape this stage's outputs)."""
        if stage not in STAGES:
            raise ValueError(stage)
        self.refuse_foreign()                         # before anything is written
        self.refuse_bundle(stage)
        digest = short_digest(digest_of)
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock()
        clean_partial(self.path, recursive=True)     # writes a kill cut short
        path = self.path / CONFIG
        if path.exists() and not self.produced():    # a start that failed before any output
            path.unlink()
        if path.exists():
            saved = self.record()
            if saved["stage"] != stage:
                raise CpfcteError(f"{self.path}: holds a {saved['stage']} run, not a {stage} "
                                  "run; use another run name")
            if saved.get("digest") != digest:
                before = saved.get("digest_of", {})
                changed = sorted(k for k in set(before) | set(digest_of)
                                 if before.get(k) != digest_of.get(k))
                raise CpfcteError(f"{self.path}: this run folder holds a {stage} run with "
                                  f"another config (differs in {', '.join(changed) or 'version'}"
                                  "); use another run name or delete the folder to start over")
        write_json(path, {"stage": stage, "digest": digest, "digest_of": digest_of,
                          "config": cfg.to_dict(), "code": code_commit(), **extra})
        return self

    def from_bundle(self) -> bool:
        """Whether the folder is a run made from a release bundle (``cpfcte.stages.bundle``)."""
        return (self.path / CONFIG).is_file() and "bundle" in read_json(self.path / CONFIG)

    def refuse_bundle(self, stage: str) -> None:
        """A run made from a release bundle holds weights, not a checkpoint to go on from: no
        stage trains in it again."""
        if self.from_bundle():
            raise CpfcteError(f"{self.path}: a run made from a release bundle (weights only, "
                              f"no optimizer state); {stage} cannot run in it again. Use it "
                              "as an input, or give another run name")

    def refuse_foreign(self) -> None:
        """Refuse, before any write, a run folder that is a file, a dataset's ground truth,
        inside a dataset, or a folder of the user's (not empty, and not a run: no config.json,
        only files a run does not write)."""
        from cpfcte.machinery.guard import refuse_ground_truth
        from cpfcte.machinery.safety import refuse_inside_dataset, user_files

        if self.path.exists() and not self.path.is_dir():
            raise CpfcteError(f"{self.path}: exists and is a file, not a run folder; give "
                              "another run name or folder")
        refuse_ground_truth(self.path, "run folder")
        refuse_inside_dataset(self.path, "run folder")
        if not (self.path / CONFIG).is_file():
            found = user_files(self.path)
            if found:
                raise CpfcteError(f"{self.path}: not a run folder (no {CONFIG}) and not empty "
                                  f"(it holds {', '.join(p.name for p in found[:3])}); nothing "
                                  "was written. Give a new run name or an empty folder")

    def holder(self) -> dict | None:
        """The live process holding the folder's lock (pid, host), or None."""
        import socket

        try:
            held = json.loads((self.path / LOCK).read_text())
        except (OSError, ValueError):
            return None
        pid, host = held.get("pid"), held.get("host")
        if host == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid):
            return None
        return held

    def produced(self) -> bool:
        """Whether the run wrote anything beyond its config and bookkeeping (a checkpoint, a
        log line, a mask, results): only then does its config.json bind the folder."""
        bookkeeping = {CONFIG, LOCK, "run.json", "job.json", "launch_config.json"}
        for entry in self.path.iterdir():
            if entry.name in bookkeeping or entry.suffix == ".ipynb":
                continue
            if entry.is_file() and entry.stat().st_size == 0:
                continue
            return True
        return False

    # --- one writer per run folder ------------------------------------------------------------
    def lock(self) -> None:
        """Hold ``.lock`` (pid and host) for this process until ``unlock`` (at the end of the
        stage, ``releases_locks``) or its exit: a second process starting a stage in the same
        folder is refused, naming the holder; a lock left by a process that no longer runs (on
        this host) is taken over."""
        import os
        import socket

        path, me = self.path / LOCK, {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(path.read_text())
                except (OSError, ValueError):
                    holder = {}
                if holder == me:
                    return                                   # already ours
                pid, host = holder.get("pid"), holder.get("host")
                if host == me["host"] and isinstance(pid, int) and not pid_alive(pid):
                    path.unlink(missing_ok=True)             # stale: its process is gone
                    continue
                raise CpfcteError(f"{self.path}: in use by process {pid} on {host} ({path}); "
                                  "wait for it to finish, or delete the lock if that process "
                                  "is gone") from None
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            _HELD.add(self.path)
            return

    def unlock(self) -> None:
        import os

        path = self.path / LOCK
        _HELD.discard(self.path)
        try:
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()
        except (OSError, ValueError):
            pass

    def record(self) -> dict[str, Any]:
        """The config.json of the folder, with a clear error when there is none."""
        path = self.path / CONFIG
        if not path.is_file():
            raise CpfcteError(f"{self.path}: no {CONFIG}: not a run folder, or the run never "
                              f"started; {self._nearby_runs()}")
        saved = read_json(path)
        if not isinstance(saved, dict) or "config" not in saved:
            raise CpfcteError(f"{path}: not a cpfcte run config; delete the folder and rerun")
        if "stage" not in saved:
            raise CpfcteError(f"{path}: written by an older cpfcte (no 'stage'); delete "
                              f"{self.path} or use another run name")
        return saved

    def _nearby_runs(self) -> str:
        """A hint for a run name that names no run: the runs beside it, or how to make one."""
        parent = self.path.parent
        runs = sorted(p.name for p in parent.glob("*/") if (p / CONFIG).is_file()) \
            if parent.is_dir() else []
        if runs:
            more = f" (and {len(runs) - 12} more)" if len(runs) > 12 else ""
            return f"runs in {parent}: {', '.join(runs[:12])}{more}"
        return (f"{parent} holds no runs: make one first (`cpfcte train --run NAME`, or "
                "notebook 02)")

    def config(self) -> Config:
        """The Config of the folder's run (what downstream stages start from)."""
        return config_from_dict(self.record()["config"], self.path / CONFIG).validate()

    @property
    def stage(self) -> str | None:
        return self.record().get("stage")

    # --- checkpoint --------------------------------------------------------------------------
    def save_checkpoint(self, state: dict[str, Any]) -> None:
        torch_save(state, self.path / CHECKPOINT)

    def load_checkpoint(self, digest: str | None = None) -> dict[str, Any] | None:
        """The checkpoint (None when there is none), refused when it was written with another
        config (``digest``) or cannot be read."""
        import torch

        path = self.path / CHECKPOINT
        if not path.exists():
            return self.load_weights(digest)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            why = str(e).split(". ")[0].strip() or type(e).__name__
            raise CpfcteError(f"{path}: cannot read checkpoint, truncated or not a cpfcte "
                              f"checkpoint ({why}); delete it to retrain") from None
        if not isinstance(state, dict):
            raise CpfcteError(f"{path}: not a cpfcte checkpoint; delete it to retrain")
        if digest is not None and state.get("digest") != digest:
            raise CpfcteError(f"{path}: checkpoint was trained with another config; use another "
                              "run folder")
        return state

    def load_weights(self, digest: str | None = None) -> dict[str, Any] | None:
        """A run made from a bundle: its ``weights.safetensors`` as a checkpoint without the
        optimizer ({"model", "digest", "epoch" or "iteration"}, from the JSON object under the
        metadata key ``cpfcte``); None when there is none."""
        path = self.path / WEIGHTS
        if not path.exists():
            return None
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = json.loads((fh.metadata() or {}).get(WEIGHTS_META, "{}"))
                model = {k: fh.get_tensor(k) for k in fh.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise CpfcteError(f"{path}: cannot read the weights ({e}); fetch the bundle "
                              "again") from None
        state: dict[str, Any] = {"model": model, "digest": meta.get("digest")}
        for key in ("epoch", "iteration"):
            if key in meta:
                state[key] = int(meta[key])
        if digest is not None and state["digest"] != digest:
            raise CpfcteError(f"{path}: the weights were trained with another config (digest "
                              f"{state['digest']}, the run's is {digest}); fetch the bundle "
                              "again")
        return state

    # --- logs, summary, metrics -----------------------------------------------------------------
    def append_log(self, record: dict[str, Any]) -> None:
        append_line(self.path / LOG, json.dumps(record))

    def logger(self) -> logging.Logger:
        logger = logging.getLogger(f"cpfcte.run.{self.path.resolve()}")
        if not logger.handlers:
            handler = logging.FileHandler(self.path / TEXT_LOG)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False
        return logger

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.path / SUMMARY, summary)

    def summary(self) -> dict[str, Any]:
        return read_json(self.path / SUMMARY)

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        write_json(self.path / METRICS, metrics)

    def metrics(self) -> dict[str, Any]:
        return read_json(self.path / METRICS)
