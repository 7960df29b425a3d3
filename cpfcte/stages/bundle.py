"""Starting a stage from a release bundle (``cpfcte release``; docs/releasing.md).

Wherever a command takes a run it also takes a bundle: a local folder, or its ``file://`` or
``http(s)://`` URL. ``open_bundle`` fetches the bundle's files into the cache
(``cpfcte.machinery.fetch``: each checked against the manifest), refuses a bundle of another
profile or class list in one line, and sets it up as a run folder,
``runs/<profile>/bundles/<name>-<first 12 hex of the manifest's sha256>/``:

* ``config.json``, the run's own, with a ``bundle`` entry (source, manifest hash, commit);
* ``weights.safetensors`` (training and DeepLabv2 runs), read by
  ``RunFolder.load_checkpoint``; the network is the same, so its predictions are bit-identical
  to the run's the bundle was made from (tests/test_release.py);
* the run's ``metrics.json``, ``summary.json`` and ``threshold.json``, its paths moved to the
  new folder, and a pseudo-label run's PNG folders, unpacked from its archive.

The folder is made under a temporary name of the process and renamed when complete, so a
killed set-up leaves nothing half made (and its leftovers are removed by the next call) and two
processes setting the same bundle up at once both end with the one folder; a later call finds
it and checks its weights again against the manifest. No stage
trains in it again (``RunFolder.refuse_bundle``).
"""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
from pathlib import Path

from cpfcte.machinery.errors import CpfcteError
from cpfcte.machinery.fetch import (
    BUNDLE,
    FORMAT,
    PSEUDO_ARCHIVE,
    RUN_METRICS,
    fetch_bundle,
    is_url,
    place,
)
from cpfcte.machinery.io import read_json, sha256_file, write_json
from cpfcte.machinery.paths import runs_dir
from cpfcte.machinery.safety import plain_name

# the bundle's files that become files of the run folder, under the run's own names
RUN_FILES = {"config.json": "config.json", RUN_METRICS: "metrics.json",
             "summary.json": "summary.json", "threshold.json": "threshold.json",
             "weights.safetensors": "weights.safetensors"}


def bundle_info(path: Path, where: str) -> dict:
    """A bundle's ``bundle.json``, with a clear error when it is not one."""
    info = read_json(path)
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise CpfcteError(f"{where}: {BUNDLE} is not a {FORMAT} description (format "
                          f"{info.get('format') if isinstance(info, dict) else None!r}); "
                          "make the bundle again with this cpfcte's `cpfcte release`")
    for key in ("name", "stage", "profile", "classes", "run_dir"):
        if key not in info:
            raise CpfcteError(f"{where}: {BUNDLE} has no {key!r}; not a complete bundle")
    return info


def refuse_mismatch(info: dict, profile: str, where: str) -> None:
    """Refuse, in one line, a bundle of another profile, or of another class list than the
    profile's dataset has."""
    from cpfcte.data import classes_of
    from cpfcte.machinery.config import config_from_dict

    if info["profile"] != profile:
        raise CpfcteError(f"{where}: a bundle of profile {info['profile']!r}, not {profile!r}; "
                          f"pass --profile {info['profile']}, or give a bundle of {profile!r}")
    cfg = config_from_dict(info["config"], where)
    try:
        here = list(classes_of(cfg))
    except CpfcteError:                  # your own dataset, not prepared here: nothing to match
        return
    if here != list(info["classes"]):
        raise CpfcteError(f"{where}: a bundle of the classes {list(info['classes'])}, but the "
                          f"{profile} profile's dataset has {here}; a model knows only the "
                          "classes it was trained on: give a bundle of this class list")


def open_bundle(source: str | Path, profile: str, progress: bool = True) -> Path:
    """The run folder of the bundle at ``source`` (a folder or URL), fetched and checked;
    made on the first call."""
    where = str(source)
    manifest_sha, files = fetch_bundle(source, progress=progress)
    if BUNDLE not in files:
        raise CpfcteError(f"{where}: its manifest lists no {BUNDLE}; not a cpfcte bundle")
    info = bundle_info(files[BUNDLE], where)
    info["config"] = read_json(files["config.json"])["config"]
    refuse_mismatch(info, profile, where)
    name = plain_name(f"{info['name']}-{manifest_sha[:12]}", "bundle name")
    target = runs_dir() / profile / "bundles" / name
    if (target / "config.json").is_file():
        _check_made(target, files)
        print(f"bundle {info['name']}: using {target} (checked against its manifest)",
              file=sys.stderr, flush=True)
        return target
    _clean_stale(target.parent, name)
    partial = target.with_name(f".{name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        _set_up(partial, files, info, where, manifest_sha, target)
        try:
            partial.rename(target)
        except OSError:          # another process set the same bundle up first: use its folder
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    print(f"bundle {info['name']} ({info['stage']} run, made at commit "
          f"{info.get('commit', 'unknown')}): {len(files)} files checked against its manifest; "
          f"run folder {target}", file=sys.stderr, flush=True)
    return target


def _set_up(partial: Path, files: dict[str, Path], info: dict, where: str, manifest_sha: str,
            target: Path) -> None:
    """The run folder's files in ``partial``: the run's own, its paths moved to ``target``."""
    for src, dst in RUN_FILES.items():
        if src in files:
            place(files[src], partial / dst)
    record = read_json(partial / "config.json")
    record["bundle"] = {"source": where if is_url(where) else str(Path(where).resolve()),
                        "manifest_sha256": manifest_sha, "name": info["name"],
                        "made_at_commit": info.get("commit"), "run_dir": info["run_dir"]}
    write_json(partial / "config.json", record)     # a new file: the cached one stays as it is
    for moved in ("metrics.json", "summary.json"):
        if (partial / moved).is_file():
            write_json(partial / moved, _moved(read_json(partial / moved), info["run_dir"],
                                               str(target)))
    if PSEUDO_ARCHIVE in files:
        _unpack(files[PSEUDO_ARCHIVE], partial, where)


def _clean_stale(folder: Path, name: str) -> None:
    """Remove the set-up folders of processes that were killed before they finished."""
    from cpfcte.machinery.io import pid_alive

    for stale in folder.glob(f".{name}.*.partial") if folder.is_dir() else []:
        pid = stale.name[len(name) + 2:-len(".partial")]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _check_made(target: Path, files: dict[str, Path]) -> None:
    """A run folder made before: its weights must still be the manifest's (the name of the
    cached file is its checked sha256)."""
    weights = target / "weights.safetensors"
    if "weights.safetensors" in files:
        want, got = files["weights.safetensors"].name, sha256_file(weights)
        if got != want:
            raise CpfcteError(f"{weights}: not the weights of the bundle's manifest (sha256 "
                              f"{got}, the manifest says {want}); delete {target} and run "
                              "again")


def _moved(value, old: str, new: str):
    """``value`` with every string path under ``old`` moved under ``new``."""
    if isinstance(value, dict):
        return {k: _moved(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_moved(v, old, new) for v in value]
    if isinstance(value, str) and (value == old or value.startswith(old.rstrip("/") + "/")):
        return new + value[len(old.rstrip("/")):]
    return value


def _unpack(archive: Path, into: Path, where: str) -> None:
    """A pseudo-label archive's PNGs: only regular files at ``<folder>/<name>.png``."""
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if member.isdir() and len(parts) == 1:
                continue
            if (not member.isfile() or len(parts) != 2 or not member.name.endswith(".png")
                    or any(p in ("", ".", "..") or p.startswith("/") for p in parts)):
                raise CpfcteError(f"{where}: {PSEUDO_ARCHIVE} holds {member.name!r}, not a "
                                  "<folder>/<name>.png file; refused, nothing unpacked")
        tar.extractall(into, filter="data")
