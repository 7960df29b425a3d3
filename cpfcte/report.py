"""Tables and figures from the run folders: ``tables/*.{md,csv}``, ``figures/*.{png,pdf}``.

Every table puts the paper's value beside this run's and says which profile made it; a cell for
a stage that has not run says so, and no number is ever invented. Toy-profile numbers come from
a synthetic dataset and a tiny ViT and are not comparable to the paper's.
"""

from __future__ import annotations

import csv
import io
import subprocess
from pathlib import Path

from cpfcte import paper_values
from cpfcte.batch import load_batch, run_status
from cpfcte.io import atomic_path, read_json, write_text
from cpfcte.paths import project_root, runs_dir

TOY_NOTE = ("toy profile: a synthetic dataset and tiny randomly initialised networks on a CPU; "
            "its numbers are not comparable to the paper's.")


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}"


def run_metrics(profile: str, run: str) -> tuple[dict | None, str]:
    """(metrics, note): the metrics.json of a run, or None and why it is missing."""
    run_dir = runs_dir() / profile / run
    status = run_status(run_dir)
    if status.get("status") == "failed":
        return None, f"failed: see {run_dir / status.get('notebook', '')}"
    path = run_dir / "metrics.json"
    if not path.exists():
        return None, f"not run (runs/{profile}/{run})"
    return read_json(path), ""


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=project_root(),
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "cpfcte", "notebooks"],
                               cwd=project_root(), capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _suffix(profile: str) -> str:
    return "" if profile == "toy" else f".{profile}"


def write_table(name: str, profile: str, header: list[str], rows: list[list[str]],
                title: str, notes: list[str], out_dir: Path | None = None) -> dict[str, Path]:
    out_dir = out_dir or project_root() / "tables"
    stem = f"{name}{_suffix(profile)}"
    md = [f"# {title}", "", "| " + " | ".join(header) + " |",
          "|" + "|".join("---" for _ in header) + "|"]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += [""] + [f"- {n}" for n in notes]
    paths = {"md": out_dir / f"{stem}.md", "csv": out_dir / f"{stem}.csv"}
    write_text(paths["md"], "\n".join(md) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    write_text(paths["csv"], buf.getvalue())
    return paths


def comparison_table(name: str, title: str, profile: str, paper_rows, ours: dict[str, str],
                     notes: list[str], extra_rows=(), out_dir: Path | None = None) -> dict[str, Path]:
    """A paper table (method, publication, backbone, mIoU) with this run's value beside the
    rows named in ``ours``; ``extra_rows`` are reference rows measured in this run."""
    header = ["Method", "Pub.", "Backbone", "mIoU paper (%)", f"mIoU this run, {profile} (%)"]
    rows = [[method, pub, backbone, _fmt(value), ours.get(method, "")]
            for method, pub, backbone, value in paper_rows]
    rows += [list(r) for r in extra_rows]
    if profile.startswith("toy"):
        notes = notes + [TOY_NOTE]
    return write_table(name, profile, header, rows, title, notes, out_dir)


def _relative(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(project_root()))
    except ValueError:
        return str(path)


def _group_run(group: str) -> str:
    return load_batch().groups[group]["runs"][0]


def _provenance(profile: str, run: str, metrics: dict | None) -> str:
    digest = (metrics or {}).get("config_digest", "—")
    return f"run: runs/{profile}/{run}; config digest {digest}; code {git_commit()}"


def table1(profile: str = "toy", out_dir: Path | None = None) -> dict[str, Path]:
    """Table 1: pseudo-label mIoU (VOC train for voc; toy train for toy)."""
    run = _group_run("table1")
    metrics, why = run_metrics(profile, run)
    ours, extra = {}, []
    if metrics:
        crf = metrics.get("crf")
        ours["CPF-CTE w/o CRF"] = _fmt(100 * metrics["miou"])
        ours["CPF-CTE"] = _fmt(100 * crf["miou"]) if crf else "not run (crf=False)"
        for kind, label in (("background", "all background"),
                            ("uniform", "uniform over the image's labels, argmax")):
            value = metrics.get("baselines", {}).get(kind)
            extra.append([f"reference: {label}", "this run", "none", "",
                          _fmt(100 * value if value is not None else None)])
    else:
        ours = {"CPF-CTE w/o CRF": why, "CPF-CTE": why}
    notes = [f"profile: {profile}; level: pseudo-label (baseline pseudo mask, BPM; then dense "
             f"CRF); split: {metrics['split'] if metrics else '?'} "
             f"({metrics['images'] if metrics else '?'} images)",
             f"inference size: {metrics['infer_size']}×{metrics['infer_size']} "
             f"({metrics['patches_per_side']} patches per side)" if metrics else
             "inference size: —", _provenance(profile, run, metrics)]
    if metrics and metrics.get("crf"):
        notes.insert(1, f"CRF (pydensecrf): {metrics['crf']['params_text']}; unary = -log "
                        "softmax over the image's classes")
    return comparison_table("table1", "Table 1: pseudo-label quality (mIoU)", profile,
                            paper_values.TABLE1, ours, notes, extra, out_dir)


def _deeplab_notes(profile: str, run: str, metrics: dict | None) -> list[str]:
    if not metrics:
        return [_provenance(profile, run, metrics)]
    return [f"profile: {profile}; level: {metrics['level']}; split: {metrics['split']} "
            f"({metrics['images']} images)",
            f"DeepLabv2: {metrics['backbone']}, {metrics['parameters']:,} parameters, "
            f"{metrics['iterations']} iterations; test scales {metrics['test_scales']}"
            f"{' + flip' if metrics['flip'] else ''}; without CRF: "
            f"{_fmt(100 * metrics['no_crf']['miou'])}",
            f"trained on the pseudo labels of {_relative(metrics['pseudo_dir'])}",
            _provenance(profile, run, metrics)]


def table2(profile: str = "toy", out_dir: Path | None = None) -> dict[str, Path]:
    """Table 2: DeepLabv2 on VOC val (toy: the toy val split)."""
    run = _group_run("table2")
    metrics, why = run_metrics(profile, run)
    ours = {"CPF-CTE": _fmt(100 * metrics["miou"]) if metrics else why}
    return comparison_table("table2", "Table 2: semantic segmentation (mIoU), VOC 2012 val",
                            profile, paper_values.TABLE2, ours,
                            _deeplab_notes(profile, run, metrics), out_dir=out_dir)


def table3(profile: str = "toy", out_dir: Path | None = None) -> dict[str, Path]:
    """Table 3: COCO 2014 val (toy: the toy scenes through the COCO path)."""
    group = load_batch().groups["table3"]
    pseudo_run, deeplab_run = group["runs"]
    pm, pwhy = run_metrics(profile, pseudo_run)
    dm, dwhy = run_metrics(profile, deeplab_run)
    applicable = profile in ("toy", "coco")
    hint = "no COCO run exists for this profile: make one with `make paper PROFILE=coco`"
    ours = {"CPF-CTE (pseudo-label)": (_fmt(100 * pm["crf"]["miou"]) if pm and pm.get("crf")
                                       else pwhy if applicable else hint),
            "CPF-CTE": _fmt(100 * dm["miou"]) if dm else dwhy if applicable else hint}
    notes = _deeplab_notes(profile, deeplab_run, dm)
    if pm:
        notes.insert(1, f"CPF-CTE (pseudo-label): BPM + CRF pseudo labels scored on the "
                        f"{pm['split']} split ({pm['images']} images); the paper does not say "
                        "on which split its 41.3 is measured")
    if profile == "toy":
        notes.insert(0, "toy: the toy scenes written as a COCO instances file (polygons, RLE, "
                        "crowd regions) and converted by the COCO path (profile toy_coco)")
    return comparison_table("table3", "Table 3: semantic segmentation (mIoU), MS COCO 2014 val",
                            profile, paper_values.TABLE3, ours, notes, out_dir=out_dir)


def save_figure(fig, name: str, profile: str, out_dir: Path | None = None) -> dict[str, Path]:
    out_dir = out_dir or project_root() / "figures"
    paths = {}
    for ext in ("png", "pdf"):
        path = out_dir / f"{name}{_suffix(profile)}.{ext}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight")
        paths[ext] = path
    return paths


def fig5(profile: str = "toy", out_dir: Path | None = None) -> dict[str, Path] | None:
    """Fig. 5: pseudo-label mIoU against the inference size (patches per side)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = []
    for run in load_batch().groups["fig5"]["runs"]:
        m, _ = run_metrics(profile, run)
        if m:
            crf = m.get("crf", {}).get("miou")
            points.append((m["patches_per_side"], 100 * m["miou"],
                           None if crf is None else 100 * crf))
    if not points:
        return None
    points.sort()
    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    xs = [p[0] for p in points]
    for k, (name, color) in enumerate((("BPM", "#1f77b4"), ("BPM + CRF", "#d62728")), start=1):
        pts = [(p[0], p[k]) for p in points if p[k] is not None]
        if not pts:
            continue
        ax.plot(*zip(*pts), marker="o", color=color, label=name)
        for x, y in pts:
            ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=7, color=color)
    ax.set_xlabel("patches per side at inference")
    ax.set_ylabel("pseudo-label mIoU (%)")
    ax.set_xticks(xs)
    ax.margins(y=0.12)
    ax.set_title(f"Fig. 5: inference size ({profile} profile"
                 f"{'; not comparable to the paper' if profile == 'toy' else ''})", fontsize=9)
    ax.grid(alpha=0.3)
    if profile != "toy":
        ax.axvline(paper_values.FIG5_PAPER_PATCHES, color="gray", ls="--", lw=1,
                   label="paper's choice (960 px)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    paths = save_figure(fig, "fig5", profile, out_dir)
    plt.close(fig)
    return paths


def write_all(profile: str = "toy") -> dict[str, dict]:
    out = {"table1": table1(profile), "table2": table2(profile), "table3": table3(profile)}
    f5 = fig5(profile)
    if f5:
        out["fig5"] = f5
    return out


# ---------------------------------------------------------------------------------------------
# figures for the notebooks


def plot_training(run_dir: str | Path):
    """Loss and label accuracy per epoch of a training run."""
    import matplotlib.pyplot as plt

    history = read_json(Path(run_dir) / "train_summary.json")["history"]
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(8, 2.8))
    axes[0].plot(epochs, [h["loss"] for h in history], marker=".")
    axes[0].set_title("MCE loss (Eq. 9)")
    axes[1].plot(epochs, [h["label_accuracy"] for h in history], marker=".", color="C2")
    axes[1].set_title("image-label accuracy (p > 0.5)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    for h in history:
        if h.get("backbone_frozen"):
            for ax in axes:
                ax.axvspan(h["epoch"] - 0.5, h["epoch"] + 0.5, color="gray", alpha=0.1)
    fig.tight_layout()
    return fig


def colorize(labels) -> "object":
    """A label map as an RGB array in the VOC palette (255 in its cream colour)."""
    import numpy as np

    from cpfcte.io import voc_palette

    pal = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)
    return pal[np.asarray(labels)]


def show_masks(rows: list[tuple[str, list]], titles: list[str]):
    """A grid: one row per image, columns = images / label maps (H×W arrays are colourised)."""
    import matplotlib.pyplot as plt
    import numpy as np

    n, m = len(rows), len(titles)
    fig, axes = plt.subplots(n, m, figsize=(1.9 * m, 1.9 * n), squeeze=False)
    for r, (name, panels) in enumerate(rows):
        for c, panel in enumerate(panels):
            arr = np.asarray(panel)
            axes[r][c].imshow(colorize(arr) if arr.ndim == 2 else arr, interpolation="nearest")
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
            if r == 0:
                axes[r][c].set_title(titles[c], fontsize=9)
        axes[r][0].set_ylabel(name, fontsize=7)
    fig.tight_layout()
    return fig


def dataset_overview(profile: str, n_show: int = 6, split: str | None = None):
    """Counts per split, a class-frequency plot and a grid of images with their ground-truth
    masks for the dataset of ``profile``; ``None`` when that dataset is not prepared here."""
    import matplotlib.pyplot as plt

    from cpfcte.config import load_config
    from cpfcte.data import classes_for, dataset_root, dataset_stats
    from cpfcte.data.voc import VOCDataset, gt_dir
    from cpfcte.errors import CpfcteError
    from cpfcte.io import read_label_png

    cfg = load_config(profile)
    try:
        root = dataset_root(cfg)
    except CpfcteError:
        return None
    classes = classes_for(cfg.dataset)
    splits = tuple(dict.fromkeys((cfg.train_split, cfg.pseudo_split, cfg.val_split)))
    stats = dataset_stats(root, classes, splits)
    freq = stats[cfg.train_split]["images_per_class"]
    fig = plt.figure(figsize=(min(16, 2 + 0.25 * len(classes)), 2.4))
    ax = fig.add_subplot()
    ax.bar(list(freq)[1:], list(freq.values())[1:], color="C0")
    ax.set_ylabel(f"images ({cfg.train_split})")
    ax.set_title(f"{profile}: class frequency (image-level labels from the XML)", fontsize=10)
    ax.tick_params(axis="x", rotation=75, labelsize=7 if len(classes) > 30 else 9)
    split = split or cfg.val_split
    voc = VOCDataset(root, split, classes)
    masks = gt_dir(root, split)
    rows = [(", ".join(dict.fromkeys(voc.label_names(i)))[:40],
             [voc.image(i), read_label_png(masks / f"{voc.ids[i]}.png")])
            for i in range(min(n_show, len(voc)))]
    grid = show_masks(rows, ["image", f"ground truth ({masks.name})"])
    return {"root": str(root), "counts": {s: v["images"] for s, v in stats.items()},
            "stats": stats, "frequency": fig, "grid": grid}
