"""Results as the tables and figures need them: a run's metrics over its seeds, one value per
cell (mean ± std), or why there is none. Everything is read through the catalog
(``cpfcte.catalog``), from the runs each group reads (``group_reads``)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from cpfcte import catalog


def fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


class Measure:
    """One table cell over the seeds of a run: mean ± sample std, or why there is no value."""

    def __init__(self, values: list[float], runs: list[str], why: str = ""):
        self.values, self.runs, self.why = values, runs, why

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.values)) if self.values else None

    @property
    def std(self) -> float | None:
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else None

    @property
    def text(self) -> str:
        if not self.values:
            return self.why
        if len(self.values) == 1:
            return fmt(self.values[0])
        return f"{self.mean:.1f} ± {self.std:.1f} (n={len(self.values)})"


def group(name: str) -> dict:
    return catalog.load_batch().groups[name]


def seed_runs(profile: str, base: str) -> list[str]:
    return catalog.seed_runs(profile, base)


def collect(profile: str, base: str, extract: Callable[[dict], float | None]) -> Measure:
    """``extract(metrics)`` (a fraction) over every seed of ``base``, in percent."""
    names = seed_runs(profile, base) or [base]
    values, why = [], ""
    for name in names:
        m, reason = catalog.run_metrics(profile, name)
        value = extract(m) if m else None
        if value is None:
            why = why or reason or f"not measured in runs/{profile}/{name}"
        else:
            values.append(100 * value)
    return Measure(values, names, why)


def bpm_miou(m: dict) -> float | None:
    return m.get("miou")


def crf_miou(m: dict) -> float | None:
    return (m.get("crf") or {}).get("miou")


def pseudo_miou(m: dict) -> float | None:
    """The final pseudo labels: after the CRF where it ran, else the BPM."""
    return (m.get("crf") or {}).get("miou", m.get("miou"))


def segmentation_miou(m: dict) -> float | None:
    return m.get("miou") if m.get("stage") == "deeplab" else None


LEVELS = {"pseudo-label": pseudo_miou, "segmentation": segmentation_miou}


def group_measures(group_name: str, profile: str) -> tuple[str, dict[str, Measure]]:
    """(level, {row label: Measure}) of a group with rows (Tables 4, 5; Figs. 4, 7)."""
    spec = group(group_name)
    level = catalog.group_level(spec, profile)
    return level, {label: collect(profile, run, LEVELS[level])
                   for label, run in catalog.group_rows(spec, profile).items()}


def per_class_iou(profile: str, base: str, level: str) -> tuple[list[float] | None, list | None]:
    """(per-class IoU as fractions, averaged over the seeds of ``base``; classes):
    the CRF pseudo labels' at the pseudo-label level, the run's own at the segmentation level."""
    per_seed, classes = [], None
    for name in seed_runs(profile, base) or [base]:
        m, _ = catalog.run_metrics(profile, name)
        if not m:
            continue
        src = m.get("crf") if level == "pseudo-label" and m.get("crf") else m
        per_seed.append([np.nan if v is None else v for v in src["iou"]])
        classes = m.get("classes", classes)
    if not per_seed:
        return None, classes
    return list(np.nanmean(np.array(per_seed, dtype=float), axis=0)), classes
