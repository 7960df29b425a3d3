"""The paper's figures (4-7) from the run folders, as PNG and PDF. Figs. 6 and 7 are pictures
the stage notebooks show too, drawn by the same ``cpfcte.plots`` functions."""

from __future__ import annotations

from pathlib import Path

from cpfcte import plots
from cpfcte.batch import catalog
from cpfcte.machinery.paths import output_dir
from cpfcte.report import paper_values
from cpfcte.report.results import group, group_measures, per_class_iou
from cpfcte.report.tables import paper_scale, suffix


def save_paper_figure(fig, name: str, profile: str, out_dir: Path | None = None) -> dict[str, Path]:
    """Save a paper figure as figures/<name>[.<profile>].{png,pdf} and close it."""
    import matplotlib.pyplot as plt

    out_dir = out_dir or output_dir("figures")
    paths = {ext: plots.save_figure(fig, out_dir / f"{name}{suffix(profile)}.{ext}", dpi=150)
             for ext in ("png", "pdf")}
    plt.close(fig)
    return paths


def _title(text: str, profile: str) -> str:
    return f"{text} ({profile} profile{'; not comparable to the paper' if profile.startswith('toy') else ''})"


def _finish(fig, ax, name: str, title: str, profile: str, out_dir: Path | None) -> dict[str, Path]:
    """The common end of a line figure: title, grid, legend outside, saved as PNG and PDF."""
    ax.set_title(_title(title, profile), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_paper_figure(fig, name, profile, out_dir)


def fig4(profile: str = "toy", out_dir: Path | None = None) -> dict[str, Path] | None:
    """Fig. 4: mIoU against k of top-k pooling."""
    import matplotlib.pyplot as plt

    level, measures = group_measures("fig4", profile)
    pts = [(int(k), m.mean, m.std or 0.0) for k, m in measures.items() if m.mean is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    ks, ys, es = zip(*pts)
    n = max(len(m.values) for m in measures.values())
    ax.errorbar(range(len(ks)), ys, yerr=es, marker="o", capsize=3, color="#1f77b4",
                label=f"this run ({level}; mean ± std, {n} seeds)" if n > 1
                else f"this run ({level})")
    for i, y in enumerate(ys):
        ax.annotate(f"{y:.1f}", (i, y), textcoords="offset points", xytext=(5, 3), ha="left",
                    va="bottom", fontsize=7)
    ax.set_xticks(range(len(ks)), [str(k) for k in ks])
    if paper_values.FIG4_PAPER_K in ks:
        ax.axvline(list(ks).index(paper_values.FIG4_PAPER_K), color="gray", ls="--", lw=1,
                   label=f"paper's choice: k = {paper_values.FIG4_PAPER_K} "
                         f"({paper_values.FIG4_PAPER_MIOU}% after DeepLabv2)")
    ax.set_xlabel("k (top-k pooling)")
    ax.set_ylabel("mIoU (%)")
    ax.margins(y=0.15)
    return _finish(fig, ax, "fig4", "Fig. 4: top-k", profile, out_dir)


def fig5(profile: str = "toy", out_dir: Path | None = None) -> dict[str, Path] | None:
    """Fig. 5: pseudo-label mIoU against the inference size (patches per side), mean ± std
    over seeds."""
    import matplotlib.pyplot as plt

    from cpfcte.report.results import bpm_miou, collect, crf_miou

    points = []
    for run in catalog.group_reads(group("fig5"), profile):
        m, _ = catalog.run_metrics(profile, run)
        if m:
            points.append((m["patches_per_side"], collect(profile, run, bpm_miou),
                           collect(profile, run, crf_miou)))
    if not points:
        return None
    points.sort(key=lambda p: p[0])
    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    xs = [p[0] for p in points]
    for k, (name, colour) in enumerate((("BPM", "#1f77b4"), ("BPM + CRF", "#d62728")), start=1):
        pts = [(p[0], p[k].mean, p[k].std or 0.0) for p in points if p[k].mean is not None]
        if not pts:
            continue
        n = max(len(p[k].values) for p in points)
        x, y, e = zip(*pts)
        ax.errorbar(x, y, yerr=e, marker="o", capsize=3, color=colour,
                    label=f"{name} (mean ± std, {n} seeds)" if n > 1 else name)
        for xi, yi in zip(x, y):
            ax.annotate(f"{yi:.1f}", (xi, yi), textcoords="offset points", xytext=(5, 3),
                        ha="left", va="bottom", fontsize=7, color=colour)
    ax.set_xlabel("patches per side at inference")
    ax.set_ylabel("pseudo-label mIoU (%)")
    ax.set_xticks(xs)
    ax.margins(y=0.12)
    if paper_scale(profile):
        ax.axvline(paper_values.FIG5_PAPER_PATCHES, color="gray", ls="--", lw=1,
                   label="paper's choice (960 px)")
    return _finish(fig, ax, "fig5", "Fig. 5: inference size", profile, out_dir)


def fig6(profile: str = "toy", out_dir: Path | None = None) -> dict[str, Path] | None:
    """Fig. 6: image, ground truth, BPM, CRF pseudo label and DeepLabv2 output for the first
    val images."""
    from cpfcte.data import open_split
    from cpfcte.machinery.runfolder import RunFolder

    spec = group("fig6")
    pseudo_run, deeplab_run = catalog.group_reads(spec, profile)
    pseudo, _ = catalog.run_metrics(profile, pseudo_run)
    deeplab, _ = catalog.run_metrics(profile, deeplab_run)
    if not (pseudo and deeplab and pseudo.get("crf")):
        return None
    cfg = RunFolder(catalog.run_dir(profile, deeplab_run)).config()
    voc = open_split(cfg, deeplab["split"])
    fig = plots.examples(voc, {"image": plots.IMAGE, "ground truth": plots.GROUND_TRUTH,
                               "BPM": pseudo["bpm_dir"], "CRF pseudo label": pseudo["crf"]["crf_dir"],
                               "DeepLabv2": deeplab["crf_dir"] or deeplab["pred_dir"]},
                         int(spec.get("images", 6)))
    fig.suptitle(_title("Fig. 6: qualitative results on val", profile), fontsize=9, y=1.01)
    return save_paper_figure(fig, "fig6", profile, out_dir)


def fig7(profile: str = "toy", out_dir: Path | None = None) -> dict[str, Path] | None:
    """Fig. 7: per-class IoU, baseline vs CPF-CTE (mean over seeds)."""
    spec = group("fig7")
    level = catalog.group_level(spec, profile)
    bars, classes = {}, None
    for label, run in catalog.group_rows(spec, profile).items():
        values, run_classes = per_class_iou(profile, run, level)
        if values is not None:
            bars[label], classes = values, run_classes
    if len(bars) < 2 or classes is None:
        return None
    fig = plots.per_class_iou(bars, classes, ylabel=f"IoU (%), {level}",
                              title=_title("Fig. 7: per-class IoU, baseline vs CPF-CTE", profile),
                              colours=plots.PAIR_COLOURS)
    return save_paper_figure(fig, "fig7", profile, out_dir)
