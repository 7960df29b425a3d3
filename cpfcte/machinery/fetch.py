"""Fetching a release bundle's files, each checked against the bundle's manifest.

A bundle is a folder of files with a ``MANIFEST.sha256`` (``sha256sum`` format: the hex digest,
two spaces, the file name). It may be given as a local folder, a ``file://`` URL or an
``http(s)://`` URL of the folder (a GitHub release's download URL, a Zenodo record's files
URL). Each file goes into a cache keyed by its sha256 (``cache_dir()/sha256/<hex>``), is hashed
again before every use, and a file whose bytes do not give the manifest's hash is refused,
naming the file and both hashes. ``cpfcte.stages.bundle`` turns the files into a run folder.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from cpfcte.machinery.errors import CpfcteError
from cpfcte.machinery.io import _umask, sha256_file, write_error
from cpfcte.machinery.paths import cache_dir

MANIFEST = "MANIFEST.sha256"
BUNDLE = "bundle.json"               # what the bundle is (``cpfcte.report.release`` writes it)
FORMAT = "cpfcte-bundle/1"
PSEUDO_ARCHIVE = "pseudo_labels.tar.gz"
RUN_METRICS = "run_metrics.json"     # the run's own metrics.json
URL_SCHEMES = ("http://", "https://", "file://")
_LINE = re.compile(r"^([0-9a-f]{64}) [ *]([A-Za-z0-9._-]+)$")
TIMEOUT = 60


def is_url(source: str | Path) -> bool:
    return str(source).startswith(URL_SCHEMES)


def is_bundle(source: str | Path) -> bool:
    """Whether ``source`` names a bundle (a URL, a folder with a manifest, or the manifest)
    rather than a run."""
    if is_url(source):
        return True
    path = Path(source)
    return (path / MANIFEST).is_file() or (path.name == MANIFEST and path.is_file())


def parse_manifest(text: str, where: str) -> dict[str, str]:
    """{file name: sha256} of a manifest's text; a line that is not ``<hex>  <plain name>`` is
    an error naming it."""
    files: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        found = _LINE.match(line.strip())
        if not found or found[2] in (".", ".."):
            raise CpfcteError(f"{where}: line {number} is not '<sha256>  <file name>' "
                              f"({line.strip()[:80]!r}); not a cpfcte bundle manifest")
        files[found[2]] = found[1]
    if not files:
        raise CpfcteError(f"{where}: the manifest lists no files")
    return files


def manifest_text(folder: Path, names: list[str]) -> str:
    """The manifest of ``names`` in ``folder``, sorted by name."""
    return "".join(f"{sha256_file(folder / n)}  {n}\n" for n in sorted(names))


def _base(source: str | Path) -> str:
    """The bundle's folder (a URL ending in / or a local path)."""
    text = str(source)
    if is_url(text):
        if text.endswith("/" + MANIFEST):
            text = text[: -len(MANIFEST)]
        return text if text.endswith("/") else text + "/"
    path = Path(text)
    return str(path.parent if path.name == MANIFEST else path)


def _where(base: str, name: str) -> str:
    return base + urllib.parse.quote(name) if is_url(base) else str(Path(base) / name)


def _open(location: str):
    if not is_url(location):
        try:
            return open(location, "rb")
        except FileNotFoundError:
            raise CpfcteError(f"{location}: not found; the bundle's manifest lists it, so the "
                              "bundle is incomplete (copy it whole)") from None
    try:
        return urllib.request.urlopen(location, timeout=TIMEOUT)
    except urllib.error.HTTPError as e:
        raise CpfcteError(f"{location}: HTTP {e.code} {e.reason}; check the URL (it names the "
                          f"folder that holds {MANIFEST})") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise CpfcteError(f"{location}: cannot be fetched ({reason}); check the URL and the "
                          "network") from None


def _cached(digest: str) -> Path:
    return cache_dir() / "sha256" / digest


def _store(location: str, want: str | None, name: str) -> tuple[str, Path]:
    """Copy ``location`` into the cache, hashing while it streams; returns (sha256, path). The
    bytes land under a name of this process first, so two processes never mix a file."""
    folder = cache_dir() / "sha256"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".incoming.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise write_error(folder, e) from None
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as dst, _open(location) as src:
            for block in iter(lambda: src.read(1 << 20), b""):
                h.update(block)
                dst.write(block)
        got = h.hexdigest()
        if want is not None and got != want:
            raise mismatch(name, location, want, got)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, _cached(got))
    finally:
        Path(tmp).unlink(missing_ok=True)
    return got, _cached(got)


def mismatch(name: str, location: str, want: str, got: str) -> CpfcteError:
    return CpfcteError(f"{location}: {name} has sha256 {got}, but the bundle's manifest says "
                       f"{want}; the file was changed or damaged in transfer, and nothing of "
                       "the bundle was used. Fetch it again, or ask its publisher")


def fetch_bundle(source: str | Path, progress: bool = True) -> tuple[str, dict[str, Path]]:
    """Fetch a bundle into the cache: returns the manifest's sha256 and {file name: cached
    path} for every file it lists, each checked against the manifest: a fetched file as it
    streams in, a cached one again now (a damaged one is fetched again). A cached file's name
    is its sha256."""
    from cpfcte.machinery.progress import progress_bar

    base = _base(source)
    if not is_url(base) and not (Path(base) / MANIFEST).is_file():
        raise CpfcteError(f"{base}: no {MANIFEST}; not a release bundle (make one with "
                          "`cpfcte release`)")
    manifest_sha, manifest_path = _store(_where(base, MANIFEST), None, MANIFEST)
    files = parse_manifest(manifest_path.read_text(errors="replace"), _where(base, MANIFEST))
    out = {}
    for name, want in progress_bar(sorted(files.items()), desc="bundle files",
                                   disable=not progress, leave=False):
        cached = _cached(want)
        if cached.is_file():
            got = sha256_file(cached)
            if got != want:                      # a damaged cache entry: fetch it again
                cached.unlink()
        if not cached.is_file():
            _store(_where(base, name), want, name)
        out[name] = cached
    return manifest_sha, out


def place(cached: Path, target: Path) -> None:
    """Put a file ``fetch_bundle`` returned (checked there) at ``target``: a hard link where
    the file system allows, else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        target.unlink(missing_ok=True)
        target.hardlink_to(cached)
    except OSError:
        shutil.copyfile(cached, target)
