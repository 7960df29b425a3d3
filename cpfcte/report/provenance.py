"""Where a table's numbers come from: code version, profile, dataset fingerprint, config
digests, seeds, hardware and run time of the runs it reads (from their ``run.json`` and
``metrics.json``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from cpfcte.batch import catalog
from cpfcte.machinery.paths import code_commit


def dataset_fingerprint(profile: str) -> str:
    """A short hash of the content of the profile's dataset (``cpfcte.data.fingerprint``)."""
    from cpfcte.data import dataset_root, fingerprint
    from cpfcte.machinery.config import load_config
    from cpfcte.machinery.errors import CpfcteError

    try:
        return fingerprint(dataset_root(load_config(profile)))
    except CpfcteError:
        return "—"


@dataclass(frozen=True)
class Provenance:
    """Where a table's numbers come from: ``line``, the one line the table prints (commit,
    profile, dataset fingerprint, seeds, numerics); ``full``, everything, for its notes file;
    ``warning``, a line the table must print too (random weights on a paper-scale profile)."""

    line: str
    full: str
    warning: str | None


def provenance(profile: str, runs: list[str]) -> Provenance:
    """The provenance of the runs a table reads."""
    from cpfcte.machinery.config import base_profile

    digests, seeds, seconds, hardware, nb_profiles = set(), set(), 0.0, set(), set()
    inits = set()
    for name in runs:
        inits.update(_init_stamps(catalog.run_dir(profile, name)))
        status = catalog.run_status(catalog.run_dir(profile, name))
        m, _ = catalog.run_metrics(profile, name)
        if m and m.get("config_digest"):
            digests.add(m["config_digest"])
        seconds += float(status.get("seconds", 0) or 0)
        params = status.get("params", {})
        seeds.add(params.get("seed", 0))
        nb_profiles.add(params.get("profile", profile))
        if m and m.get("numerics"):           # recorded by the stage in its own process
            hardware.add(m["numerics"])
        elif status.get("hardware"):
            hardware.add(status["hardware"])
    ran_with = (f" (runs with {', '.join(sorted(nb_profiles))})"
                if nb_profiles - {profile} else "")
    dataset = ", ".join(dataset_fingerprint(p) for p in sorted(nb_profiles or {profile}))
    head = f"provenance: code {code_commit()}; profile {profile}{ran_with}; dataset {dataset}"
    full = (f"{head}; config {', '.join(sorted(digests)) or '—'}; seeds {sorted(seeds)}; "
            f"hardware {', '.join(sorted(hardware)) or '—'}; weights "
            f"{'; '.join(sorted(inits)) or '—'}; run time {seconds / 60:.1f} min; runs: "
            f"{', '.join(f'runs/{profile}/{r}' for r in runs)}")
    line = f"{head}; seeds {sorted(seeds)}; numerics {numerics_modes(hardware)}"
    warning = None
    if any("random init" in s for s in inits) and base_profile(profile) != "toy":
        warning = ("RANDOM INIT: these runs start from random weights (the paper-scale smoke, "
                   "random_init_ok); their numbers are not results")
    return Provenance(line, full, warning)


def numerics_modes(hardware: set[str]) -> str:
    """'pinned' or 'native' (``cpfcte.machinery.numerics.describe``), with the thread counts,
    from the runs' hardware lines; '—' when none says."""
    modes = set()
    for text in hardware:
        mode = re.search(r"numerics (\w+)", text)
        threads = re.search(r"(\d+) thread\(s\)", text)
        if mode:
            modes.add(mode[1] + (f", {threads[1]} thread(s)" if threads else ""))
    return "; ".join(sorted(modes)) or "—"


def _init_stamps(run_dir) -> set[str]:
    """Where the run's networks started from (``Config.init_stamp``), from its config.json."""
    from cpfcte.machinery.errors import CpfcteError
    from cpfcte.machinery.runfolder import RunFolder

    try:
        return {RunFolder(run_dir).config().init_stamp()}
    except (CpfcteError, OSError, ValueError, KeyError, TypeError):
        return set()
