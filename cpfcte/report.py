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

import numpy as np

from cpfcte import paper_values
from cpfcte.batch import load_batch, run_status
from cpfcte.io import atomic_path, read_json, write_text
from cpfcte.paths import output_dir, project_root, runs_dir

TOY_NOTE = ("toy profile: a synthetic dataset and tiny randomly initialised networks on a CPU; "
            "its numbers are not comparable to the paper's.")


INTERPRETATION = (
    "class tokens: soft assignment t(i) = Σ_c softmax_c(q(p_i)·t_c/√H) t_c (note 1)",
    "Eq. 6/7 keep e+H through the classifier; no projection back to e (note 2)",
    "CF-BiLSTM: BiLSTM_H along rows + BiLSTM_V along columns, concatenated, then W_c (note 3)",
    "classifier: one linear layer, softmax over background + classes (note 4)",
    "top-k mean pooling, k = 4; MCE = BCE over classes in float32 (note 5)",
    "Adam 1e-3 for 2 epochs (backbone frozen) then 1e-4 (note 6)",
    "inference: resize, softmax, zero absent classes, bilinear upsample, argmax (note 7)",
    "dense CRF: pydensecrf, unary from softmax, 10 iterations (note 8)",
    "DeepLabv2: ResNet-101, ASPP 6/12/18/24 summed, OS 8, crop 321, 20k iterations (note 9)",
    "mIoU: one confusion matrix per split, 255 ignored, classes present in the GT (note 10)",
)


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}"


def run_metrics(profile: str, run: str) -> tuple[dict | None, str]:
    """(metrics, note): the metrics.json of a run, or None and why it is missing."""
    run_dir = runs_dir() / profile / run
    status = run_status(run_dir)
    if status.get("status") == "failed":
        return None, f"failed: see runs/{profile}/{run}/{status.get('notebook', '')}"
    path = run_dir / "metrics.json"
    if not path.exists():
        return None, f"not run (runs/{profile}/{run})"
    return read_json(path), ""


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
            return _fmt(self.values[0])
        return f"{self.mean:.1f} ± {self.std:.1f} (n={len(self.values)})"


def seed_runs(profile: str, base: str) -> list[str]:
    """The run names of ``base`` in this profile's batch: base, base_s1, ... (seeds)."""
    from cpfcte.batch import expand

    runs, _ = expand(load_batch(), profile)
    return [n for n in runs if n == base or (n.startswith(f"{base}_s") and
                                             n[len(base) + 2:].isdigit())]


def collect(profile: str, base: str, extract) -> Measure:
    """``extract(metrics)`` (a fraction) over every seed of ``base``, in percent."""
    names = seed_runs(profile, base) or [base]
    values, why = [], ""
    for name in names:
        m, reason = run_metrics(profile, name)
        value = extract(m) if m else None
        if value is None:
            why = why or reason or f"not measured in runs/{profile}/{name}"
        else:
            values.append(100 * value)
    return Measure(values, names, why)


def bpm_miou(m: dict) -> float | None:
    return m.get("miou")


def pseudo_miou(m: dict) -> float | None:
    """The final pseudo labels: after the CRF where it ran, else the BPM."""
    return (m.get("crf") or {}).get("miou", m.get("miou"))


def segmentation_miou(m: dict) -> float | None:
    return m.get("miou") if m.get("stage") == "deeplab" else None


LEVELS = {"pseudo-label": pseudo_miou, "segmentation": segmentation_miou}


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=project_root(),
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "cpfcte", "notebooks"],
                               cwd=project_root(), capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def dataset_fingerprint(profile: str) -> str:
    """A short hash of the dataset's split lists (and the toy generator's spec)."""
    import hashlib

    from cpfcte.config import load_config
    from cpfcte.data import dataset_root
    from cpfcte.errors import CpfcteError

    try:
        root = dataset_root(load_config(profile))
    except CpfcteError:
        return "—"
    h = hashlib.sha256()
    for path in sorted(list((root / "ImageSets").rglob("*.txt")) + list(root.glob("*spec*.json"))):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:12]


def provenance(profile: str, runs: list[str], level: str | None = None) -> list[str]:
    """Notes naming where a table's numbers come from."""
    digests, seeds, seconds, hardware, nb_profiles = set(), set(), 0.0, set(), set()
    for name in runs:
        status = run_status(runs_dir() / profile / name)
        m, _ = run_metrics(profile, name)
        if m and m.get("config_digest"):
            digests.add(m["config_digest"])
        seconds += float(status.get("seconds", 0) or 0)
        params = status.get("params", {})
        seeds.add(params.get("seed", 0))
        nb_profiles.add(params.get("profile", profile))
        if status.get("hardware"):
            hardware.add(status["hardware"])
    notes = [f"provenance: code {git_commit()}; profile {profile}"
             + (f" (runs with {', '.join(sorted(nb_profiles))})" if nb_profiles - {profile} else "")
             + f"; dataset {', '.join(dataset_fingerprint(p) for p in sorted(nb_profiles or {profile}))}"
             + f"; config {', '.join(sorted(digests)) or '—'}; seeds {sorted(seeds)}; "
             f"hardware {', '.join(sorted(hardware)) or '—'}; run time {seconds / 60:.1f} min; "
             f"runs: {', '.join(f'runs/{profile}/{r}' for r in runs)}"]
    if level:
        notes.insert(0, f"level: {level}")
    return notes


def _suffix(profile: str) -> str:
    return "" if profile == "toy" else f".{profile}"


def _tex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"),
                 ("#", r"\#"), ("±", r"$\pm$"), ("✓", r"\checkmark"), ("Δ", r"$\Delta$"),
                 ("−", "-"), ("—", "--"), ("×", r"$\times$"), ("→", r"$\to$")):
        text = text.replace(a, b)
    return text


def write_table(name: str, profile: str, header: list[str], rows: list[list[str]],
                title: str, notes: list[str], out_dir: Path | None = None) -> dict[str, Path]:
    """Write a table as Markdown, CSV and LaTeX (booktabs), each with the notes."""
    out_dir = out_dir or output_dir("tables")
    stem = f"{name}{_suffix(profile)}"
    notes = list(notes) + (["interpretation (DESIGN notes): " + "; ".join(INTERPRETATION)])
    md = [f"# {title}", "", "| " + " | ".join(header) + " |",
          "|" + "|".join("---" for _ in header) + "|"]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += [""] + [f"- {n}" for n in notes]
    paths = {"md": out_dir / f"{stem}.md", "csv": out_dir / f"{stem}.csv",
             "tex": out_dir / f"{stem}.tex"}
    write_text(paths["md"], "\n".join(md) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    write_text(paths["csv"], buf.getvalue())
    tex = [f"% {title} (generated by cpfcte report; profile {profile})",
           r"\begin{table}[t]", r"\centering", f"\\caption{{{_tex_escape(title)}}}",
           r"\begin{tabular}{" + "l" * len(header) + "}", r"\toprule",
           " & ".join(_tex_escape(h) for h in header) + r" \\", r"\midrule"]
    tex += [" & ".join(_tex_escape(c) for c in r) + r" \\" for r in rows]
    tex += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    tex += [f"% {_tex_escape(n)}" for n in notes]
    write_text(paths["tex"], "\n".join(tex) + "\n")
    return paths


def _delta(paper: float | None, ours: Measure | None) -> str:
    if paper is None or ours is None or ours.mean is None:
        return ""
    return f"{ours.mean - paper:+.1f}"


def comparison_table(name: str, title: str, profile: str, paper_rows, ours: dict[str, Measure | str],
                     notes: list[str], extra_rows=(), out_dir: Path | None = None) -> dict[str, Path]:
    """A paper table (method, publication, backbone, mIoU) with this run's value and the
    difference beside the rows named in ``ours``; ``extra_rows`` are references of this run."""
    header = ["Method", "Pub.", "Backbone", "mIoU paper (%)", f"mIoU this run, {profile} (%)",
              "Δ (this − paper)"]
    rows = []
    for method, pub, backbone, value in paper_rows:
        mine = ours.get(method, "")
        measure = mine if isinstance(mine, Measure) else None
        rows.append([method, pub, backbone, _fmt(value),
                     measure.text if measure else mine, _delta(value, measure)])
    rows += [list(r) + [""] * (len(header) - len(r)) for r in extra_rows]
    if profile.startswith("toy"):
        notes = notes + [TOY_NOTE]
    return write_table(name, profile, header, rows, title, notes, out_dir)


def _group(name: str) -> dict:
    return load_batch().groups[name]


def _level(group: dict, profile: str) -> str:
    return (group.get("level") or {}).get(profile, "pseudo-label")


def table1(profile: str = "toy", out_dir: Path | None = None) -> dict[str, Path]:
    """Table 1: pseudo-label mIoU (VOC train for voc; toy train for toy), mean ± std over seeds."""
    run = _group("table1")["runs"][0]
    bpm = collect(profile, run, bpm_miou)
    crf = collect(profile, run, lambda m: (m.get("crf") or {}).get("miou"))
    first, _ = run_metrics(profile, run)
    extra = []
    for kind, label in (("background", "all background"),
                        ("uniform", "uniform over the image's labels, argmax")):
        ref = collect(profile, run, lambda m, k=kind: (m.get("baselines") or {}).get(k))
        if ref.values:
            extra.append([f"reference: {label}", "this run", "none", "", ref.text])
    notes = []
    if first:
        notes.append(f"level: pseudo-label (BPM, then dense CRF); split {first['split']} "
                     f"({first['images']} images); inference {first['infer_size']}×"
                     f"{first['infer_size']} ({first['patches_per_side']} patches per side)")
        if first.get("crf"):
            notes.append(f"CRF (pydensecrf): {first['crf']['params_text']}; unary = -log "
                         "softmax over the image's classes")
    notes += provenance(profile, bpm.runs)
    return comparison_table("table1", "Table 1: pseudo-label quality (mIoU)", profile,
                            paper_values.TABLE1, {"CPF-CTE w/o CRF": bpm, "CPF-CTE": crf},
                            notes, extra, out_dir)


def _deeplab_notes(profile: str, run: str) -> list[str]:
    m, _ = run_metrics(profile, run)
    notes = []
    if m:
        notes += [f"level: {m['level']}; split {m['split']} ({m['images']} images)",
                  f"DeepLabv2: {m['backbone']}, {m['parameters']:,} parameters, "
                  f"{m['iterations']} iterations; test scales {m['test_scales']}"
                  f"{' + flip' if m['flip'] else ''}; without CRF: "
                  f"{_fmt(100 * m['no_crf']['miou'])}",
                  f"trained on the pseudo labels of {_relative(m['pseudo_dir'])}"]
    return notes + provenance(profile, [run])


def table2(profile: str = "toy", out_dir: Path | None = None) -> dict[str, Path]:
    """Table 2: DeepLabv2 on VOC val (toy: the toy val split)."""
    run = _group("table2")["runs"][0]
    applicable = bool(seed_runs(profile, run))
    ours = {"CPF-CTE": collect(profile, run, segmentation_miou) if applicable else
            "no VOC run exists for this profile: make one with `make paper PROFILE=voc`"}
    return comparison_table("table2", "Table 2: semantic segmentation (mIoU), VOC 2012 val",
                            profile, paper_values.TABLE2, ours, _deeplab_notes(profile, run),
                            out_dir=out_dir)


def table3(profile: str = "toy", out_dir: Path | None = None) -> dict[str, Path]:
    """Table 3: COCO 2014 val (toy: the toy scenes through the COCO path)."""
    pseudo_run, deeplab_run = _group("table3")["runs"]
    hint = "no COCO run exists for this profile: make one with `make paper PROFILE=coco`"
    applicable = bool(seed_runs(profile, deeplab_run))
    ours = {"CPF-CTE (pseudo-label)": collect(profile, pseudo_run, pseudo_miou) if applicable
            else hint,
            "CPF-CTE": collect(profile, deeplab_run, segmentation_miou) if applicable else hint}
    notes = _deeplab_notes(profile, deeplab_run)
    pm, _ = run_metrics(profile, pseudo_run)
    if pm:
        notes.insert(1, f"CPF-CTE (pseudo-label): BPM + CRF pseudo labels scored on the "
                        f"{pm['split']} split ({pm['images']} images); the paper does not say "
                        "on which split its 41.3 is measured")
    if profile == "toy":
        notes.insert(0, "toy: the toy scenes written as a COCO instances file (polygons, RLE, "
                        "crowd regions) and converted by the COCO path (profile toy_coco)")
    return comparison_table("table3", "Table 3: semantic segmentation (mIoU), MS COCO 2014 val",
                            profile, paper_values.TABLE3, ours, notes, out_dir=out_dir)


def group_measures(group_name: str, profile: str) -> tuple[str, dict[str, Measure]]:
    """(level, {row label: Measure}) of a group with rows (Tables 4, 5; Figs. 4, 7)."""
    group = _group(group_name)
    level = _level(group, profile)
    extract = LEVELS[level]
    return level, {label: collect(profile, row[level], extract)
                   for label, row in group["rows"].items()}


def _level_note(level: str, profile: str) -> str:
    if level == "pseudo-label":
        return ("level: pseudo-label (BPM + CRF on the pseudo-label split); the paper scores "
                "this ablation after DeepLabv2 on VOC val: on the toy profile 3 seeds × every "
                "configuration × DeepLabv2 would not fit the time budget, so the toy ablation "
                "stops at the pseudo labels")
    return "level: segmentation (DeepLabv2 + CRF on val), as in the paper"


def table4(profile: str = "toy", out_dir: Path | None = None) -> dict[str, Path]:
    """Table 4: the components (baseline, + class tokens, + CF-BiLSTM, both)."""
    level, measures = group_measures("table4", profile)
    header = ["Original framework", "Class tokens", "Context enhancement (CF-BiLSTM)",
              "mIoU paper (%)", f"mIoU this run, {profile} (%)", "Δ (this − paper)"]
    rows = []
    for (label, tokens, lstm, paper), measure in zip(paper_values.TABLE4, measures.values()):
        rows.append(["✓", "✓" if tokens != "none" else "", "✓" if lstm != "none" else "",
                     _fmt(paper), measure.text, _delta(paper, measure)])
    notes = [_level_note(level, profile)] + provenance(profile, [r for m in measures.values()
                                                                 for r in m.runs])
    if profile.startswith("toy"):
        notes.append(TOY_NOTE)
    return write_table("table4", profile, header, rows,
                       "Table 4: ablation of class tokens and context enhancement (mIoU)",
                       notes, out_dir)


def table5(profile: str = "toy", out_dir: Path | None = None) -> dict[str, Path]:
    """Table 5: pooling (gap, gmp, top-k)."""
    level, measures = group_measures("table5", profile)
    header = ["Average pooling", "Max pooling", "Top-K", "mIoU paper (%)",
              f"mIoU this run, {profile} (%)", "Δ (this − paper)"]
    rows = []
    for i, ((mode, paper), measure) in enumerate(zip(paper_values.TABLE5, measures.values())):
        marks = ["✓" if j == i else "" for j in range(3)]
        rows.append(marks + [_fmt(paper), measure.text, _delta(paper, measure)])
    notes = [_level_note(level, profile)] + provenance(profile, [r for m in measures.values()
                                                                 for r in m.runs])
    if profile.startswith("toy"):
        notes.append(TOY_NOTE)
    return write_table("table5", profile, header, rows,
                       "Table 5: pooling strategies (mIoU)", notes, out_dir)


def _relative(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(project_root()))
    except ValueError:
        return str(path)


def save_figure(fig, name: str, profile: str, out_dir: Path | None = None) -> dict[str, Path]:
    out_dir = out_dir or output_dir("figures")
    paths = {}
    for ext in ("png", "pdf"):
        path = out_dir / f"{name}{_suffix(profile)}.{ext}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight")
        paths[ext] = path
    return paths


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(text: str, profile: str) -> str:
    return f"{text} ({profile} profile{'; not comparable to the paper' if profile.startswith('toy') else ''})"


def fig5(profile: str = "toy", out_dir: Path | None = None) -> dict[str, Path] | None:
    """Fig. 5: pseudo-label mIoU against the inference size (patches per side)."""
    plt = _plt()
    points = []
    for run in _group("fig5")["runs"]:
        m, _ = run_metrics(profile, run)
        if m:
            crf = (m.get("crf") or {}).get("miou")
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
    if not profile.startswith("toy"):
        ax.axvline(paper_values.FIG5_PAPER_PATCHES, color="gray", ls="--", lw=1,
                   label="paper's choice (960 px)")
    return _finish(fig, ax, "fig5", "Fig. 5: inference size", profile, out_dir)


def _finish(fig, ax, name: str, title: str, profile: str, out_dir: Path | None) -> dict[str, Path]:
    """The common end of a line figure: title, grid, legend outside, saved as PNG and PDF."""
    ax.set_title(_title(title, profile), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    paths = save_figure(fig, name, profile, out_dir)
    _plt().close(fig)
    return paths


def fig4(profile: str = "toy", out_dir: Path | None = None) -> dict[str, Path] | None:
    """Fig. 4: mIoU against k of top-k pooling."""
    plt = _plt()
    level, measures = group_measures("fig4", profile)
    pts = [(int(k), m.mean, m.std or 0.0) for k, m in measures.items() if m.mean is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    ks, ys, es = zip(*pts)
    ax.errorbar(range(len(ks)), ys, yerr=es, marker="o", capsize=3, color="#1f77b4",
                label=f"this run ({level})")
    for i, (k, y) in enumerate(zip(ks, ys)):
        ax.annotate(f"{y:.1f}", (i, y), textcoords="offset points", xytext=(0, 7), ha="center",
                    fontsize=7)
    ax.set_xticks(range(len(ks)), [str(k) for k in ks])
    if 4 in ks:
        ax.axvline(list(ks).index(4), color="gray", ls="--", lw=1,
                   label="paper's choice: k = 4 (69.5% after DeepLabv2)")
    ax.set_xlabel("k (top-k pooling)")
    ax.set_ylabel("mIoU (%)")
    ax.margins(y=0.15)
    return _finish(fig, ax, "fig4", "Fig. 4: top-k", profile, out_dir)


def fig7(profile: str = "toy", out_dir: Path | None = None) -> dict[str, Path] | None:
    """Fig. 7: per-class IoU, baseline vs CPF-CTE (mean over seeds)."""
    plt = _plt()
    group = _group("fig7")
    level = _level(group, profile)
    bars, classes = {}, None
    for label, row in group["rows"].items():
        per_seed = []
        for name in seed_runs(profile, row[level]) or [row[level]]:
            m, _ = run_metrics(profile, name)
            if not m:
                continue
            src = m.get("crf") if level == "pseudo-label" and m.get("crf") else m
            per_seed.append([np.nan if v is None else 100 * v for v in src["iou"]])
            classes = m.get("classes", classes)
        if per_seed:
            bars[label] = np.nanmean(np.array(per_seed, dtype=float), axis=0)
    if len(bars) < 2 or classes is None:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(classes)), 3.0))
    x = np.arange(len(classes))
    for j, (label, values) in enumerate(bars.items()):
        ax.bar(x + (j - 0.5) * 0.4, np.nan_to_num(values), width=0.4, label=label,
               color=("#9e9e9e", "#d62728")[j % 2])
    ax.set_xticks(x, classes, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(f"IoU (%), {level}")
    ax.set_title(_title("Fig. 7: per-class IoU, baseline vs CPF-CTE", profile), fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    paths = save_figure(fig, "fig7", profile, out_dir)
    plt.close(fig)
    return paths


def fig6(profile: str = "toy", out_dir: Path | None = None) -> dict[str, Path] | None:
    """Fig. 6: image, ground truth, BPM, CRF pseudo label and DeepLabv2 output for the first
    val images."""
    plt = _plt()
    from cpfcte.config import load_config
    from cpfcte.data import classes_for, dataset_root
    from cpfcte.data.voc import VOCDataset, gt_dir
    from cpfcte.io import read_label_png

    group = _group("fig6")
    pseudo, deeplab = (run_metrics(profile, r)[0] for r in group["runs"])
    if not (pseudo and deeplab and pseudo.get("crf")):
        return None
    cfg = load_config(deeplab["profile"])
    voc = VOCDataset(dataset_root(cfg), deeplab["split"], classes_for(cfg.dataset))
    gt = gt_dir(voc.root, voc.split)
    folders = [Path(pseudo["bpm_dir"]), Path(pseudo["crf"]["crf_dir"]),
               Path(deeplab["timing"]["crf_dir"] or deeplab["timing"]["pred_dir"])]
    rows = [(voc.ids[i], [voc.image(i), read_label_png(gt / f"{voc.ids[i]}.png")]
             + [read_label_png(f / f"{voc.ids[i]}.png") for f in folders])
            for i in range(min(int(group.get("images", 6)), len(voc)))]
    fig = show_masks(rows, ["image", "ground truth", "BPM", "CRF pseudo label", "DeepLabv2"])
    fig.suptitle(_title("Fig. 6: qualitative results on val", profile), fontsize=9, y=1.01)
    paths = save_figure(fig, "fig6", profile, out_dir)
    plt.close(fig)
    return paths


def write_all(profile: str = "toy") -> dict[str, dict]:
    """Every table and figure of the paper that this profile's runs can make."""
    out = {}
    for name, fn in (("table1", table1), ("table2", table2), ("table3", table3),
                     ("table4", table4), ("table5", table5), ("fig4", fig4), ("fig5", fig5),
                     ("fig6", fig6), ("fig7", fig7)):
        paths = fn(profile)
        if paths:
            out[name] = paths
    return out


# ---------------------------------------------------------------------------------------------
# figures for the notebooks


def keep(fig, path: str | Path):
    """Save a notebook figure (PNG, atomically) beside the run's other outputs; return it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")
    return fig


def plot_training(run_dir: str | Path):
    """Loss and label accuracy per epoch of a training run (also saved to the run folder as
    training_curves.png)."""
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
    return keep(fig, Path(run_dir) / "training_curves.png")


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
