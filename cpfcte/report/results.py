"""Results as the tables and figures need them: a run's metrics over its seeds, one value per
cell (mean ± std), or why there is none. Everything is read through the catalog
(``cpfcte.batch.catalog``), from the runs each group reads (``group_reads``)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from cpfcte.batch import catalog


def fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


class Measure:
    """One table cell over the seeds of a run: mean ± sample std, or why there is no value.
    ``seeds`` gives the seed of each value, for differences paired by seed."""

    def __init__(self, values: list[float], runs: list[str], why: str = "",
                 seeds: list[int] | None = None):
        self.values, self.runs, self.why = values, runs, why
        self.seeds = list(seeds) if seeds is not None else list(range(len(values)))

    @property
    def by_seed(self) -> dict[int, float]:
        return dict(zip(self.seeds, self.values))

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


class Paired:
    """The difference of two configurations over the seeds both ran: mean and its 95 %
    confidence interval (Student's t with n - 1 degrees of freedom)."""

    def __init__(self, row: Measure, reference: Measure):
        a, b = row.by_seed, reference.by_seed
        self.seeds = sorted(set(a) & set(b))
        self.diffs = [a[s] - b[s] for s in self.seeds]

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.diffs)) if self.diffs else None

    @property
    def interval(self) -> tuple[float, float] | None:
        if self.n < 2:
            return None
        from scipy import stats

        half = stats.t.ppf(0.975, self.n - 1) * np.std(self.diffs, ddof=1) / np.sqrt(self.n)
        return self.mean - half, self.mean + half

    @property
    def excludes_zero(self) -> bool:
        ci = self.interval
        return ci is not None and (ci[0] > 0 or ci[1] < 0)

    @property
    def text(self) -> str:
        if not self.diffs:
            return ""
        if self.interval is None:
            return f"{self.mean:+.1f} (n=1, no interval)"
        lo, hi = self.interval
        return (f"{self.mean:+.1f} [{lo:+.1f}, {hi:+.1f}]" + (" *" if self.excludes_zero else "")
                + f" (n={self.n})")


def group(name: str) -> dict:
    return catalog.load_batch().groups[name]


def seed_runs(profile: str, base: str) -> list[str]:
    return catalog.seed_runs(profile, base)


def seed_of(base: str, name: str) -> int:
    """The seed of a run name: ``base`` is seed 0, ``base_s<k>`` seed k."""
    return 0 if name == base else int(name[len(base) + 2:])


def collect(profile: str, base: str, extract: Callable[[dict], float | None]) -> Measure:
    """``extract(metrics)`` (a fraction) over every seed of ``base``, in percent."""
    names = seed_runs(profile, base) or [base]
    values, seeds, why = [], [], ""
    for name in names:
        m, reason = catalog.run_metrics(profile, name)
        value = extract(m) if m else None
        if value is None:
            if m and m.get("no_masks"):
                reason = "no masks"
            why = why or reason or f"not measured in runs/{profile}/{name}"
        else:
            values.append(100 * value)
            seeds.append(seed_of(base, name))
    return Measure(values, names, why, seeds)


def bpm_miou(m: dict) -> float | None:
    return m.get("miou")


def crf_miou(m: dict) -> float | None:
    return (m.get("crf") or {}).get("miou")


BPM_NORM_LABELS = {"pcm": "ViT-PCM normalisation", "none": "Eq. 10 as printed"}


def bpm_by_norm(norm: str, crf: bool = False) -> Callable[[dict], float | None]:
    """The BPM mIoU (``crf``: after its CRF) of one normalisation (``bpm_norm``: pcm | none),
    from a pseudo-label run's main BPM or its ``other_norm``; None when the run made no BPM of
    that normalisation."""
    def extract(m: dict) -> float | None:
        for scores in (m, m.get("other_norm") or {}):
            if scores.get("bpm_norm") == norm:
                return (scores.get("crf") or {}).get("miou") if crf else scores.get("miou")
        return None
    return extract


def pseudo_miou(m: dict) -> float | None:
    """The final pseudo labels: after the CRF where it ran, else the BPM."""
    return (m.get("crf") or {}).get("miou", m.get("miou"))


def segmentation_miou(m: dict) -> float | None:
    return m.get("miou") if m.get("stage") == "deeplab" else None


def deeplab_level(level: str) -> Callable[[dict], float | None]:
    """DeepLabv2's mIoU at one test-time level (``single_scale``, ``multi_scale``, ``crf``)."""
    def extract(m: dict) -> float | None:
        return ((m.get("levels") or {}).get(level) or {}).get("miou")
    return extract


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


def train_run_of(m: dict) -> Path | None:
    """The stage-1 run upstream of a run's metrics: a pseudo-label run names it
    (``train_run``); a DeepLabv2 run names its pseudo labels (``pseudo_dir``), whose run names
    it."""
    from cpfcte.machinery.io import read_json

    if m.get("train_run"):
        return Path(m["train_run"])
    if m.get("pseudo_dir"):
        for folder in (Path(m["pseudo_dir"]), *Path(m["pseudo_dir"]).parents):
            if (folder / "metrics.json").is_file():
                upstream = read_json(folder / "metrics.json")
                return Path(upstream["train_run"]) if upstream.get("train_run") else None
    return None


def mechanisms(profile: str, base: str) -> dict[int, dict | None]:
    """{seed: the class tokens' measurements at the end of the stage-1 run upstream of each
    seed of ``base`` (``summary.json``'s ``mechanisms``; note 23), or None where not measured}."""
    from cpfcte.machinery.io import read_json

    out = {}
    for name in seed_runs(profile, base) or [base]:
        m, _ = catalog.run_metrics(profile, name)
        train = train_run_of(m) if m else None
        summary = train / "summary.json" if train else None
        out[seed_of(base, name)] = (read_json(summary).get("mechanisms")
                                    if summary and summary.is_file() else None)
    return out


def mechanism_table(profile: str, rows: dict[str, str]) -> str:
    """A Markdown table, one line per configuration and seed: whether the class tokens are
    alive at the end of stage 1 (note 23), their largest assignment weight and swap effect, and
    the image-label mAP, for the runs ``rows`` (label → base run name)."""
    lines = ["| configuration | seed | class tokens | largest weight (uniform) | mean-token swap "
             "changes | image-label mAP |", "|---|---|---|---|---|---|"]
    for label, base in rows.items():
        for seed, d in sorted(mechanisms(profile, base).items()):
            if not d:
                lines.append(f"| {label} | {seed} | not measured | | | |")
            elif d.get("class_tokens") == "none":
                lines.append(f"| {label} | {seed} | none | | | {d['label_map']:.3f} |")
            else:
                weight = (f"{d['max_weight']:.3f} ({d['uniform_weight']:.3f})"
                          if "max_weight" in d else f"— ({d['class_tokens']})")
                lines.append(f"| {label} | {seed} | {'alive' if d['alive'] else 'NOT alive'} | "
                             f"{weight} | {100 * d['swap_changed']:.2f} % | "
                             f"{d['label_map']:.3f} |")
    return "\n".join(lines) + "\n"
