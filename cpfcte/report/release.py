"""Release bundles: one self-describing folder per run, ready to upload (docs/releasing.md).

    cpfcte release RUN... --out DIR [--url BASE]     (no RUN: every run of the batch made here)

``DIR/<profile>-<run>/`` holds, for a run of any stage:

    MANIFEST.sha256      the sha256 of every other file (``sha256sum -c MANIFEST.sha256``)
    bundle.json          what the bundle is: stage, profile, dataset, classes, commit, rows
    config.json          the run's config.json as the run wrote it (the resolved config)
    metrics.json         every number with its protocol: split, level, init, images
    run_metrics.json     the run's own metrics.json (what a stage started from it reads)
    README.md            the model card
    log.jsonl, log.txt, summary.json, run.json, *.png, evidence_*.json, the executed notebook
                         as the run wrote them

and, by stage: ``weights.safetensors`` (training, DeepLabv2: the weights only, with the digest
and the epochs or iterations in its metadata), ``threshold.json`` (training: the calibrated
image-score threshold), ``pseudo_labels.tar.gz`` (pseudo labels: every PNG folder). Every file
is the same bytes for the same run (no dates; a sorted archive with fixed times), so a
bundle's hashes identify the run. ``DIR/zoo.yaml`` gets one entry per bundle.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
from pathlib import Path
from typing import Callable

import yaml

from cpfcte.data import classes_of
from cpfcte.machinery.errors import CpfcteError
from cpfcte.machinery.fetch import (
    BUNDLE,
    FORMAT,
    MANIFEST,
    PSEUDO_ARCHIVE,
    RUN_METRICS,
    URL_SCHEMES,
    manifest_text,
    parse_manifest,
)
from cpfcte.machinery.io import read_json, write_json, write_text
from cpfcte.machinery.paths import code_commit
from cpfcte.machinery.runfolder import (
    CHECKPOINT,
    METRICS,
    SUMMARY,
    WEIGHTS,
    WEIGHTS_META,
    RunFolder,
)
from cpfcte.machinery.safety import (
    check_folder,
    mark,
    plain_name,
    refuse_alias,
    refuse_inside_dataset,
)

ZOO = "zoo.yaml"
RUN = "run.json"                     # the batch runner's record around a run
AS_WRITTEN = ("config.json", "log.jsonl", "log.txt", "summary.json", RUN, "threshold.json")
PNG_FOLDERS = re.compile(r"^(bpm|crf)_")
SEEDED = re.compile(r"_s\d+$")


def release(runs: list[str | Path], out: str | Path, *, profile: str, url: str | None = None,
            force: bool = False, prepare: Callable[[Path], object] | None = None) -> dict:
    """Write a bundle for each run folder in ``runs`` into ``out`` and its entries into
    ``out/zoo.yaml``; returns {"bundles": [folders], "zoo": path}. ``url``: the base URL the
    bundles will be uploaded under (each at ``<url>/<bundle name>/``), for the zoo file;
    ``profile``: the batch profile whose table rows the runs feed; ``prepare``: called with
    each training run's folder after every refusal, before its bundle is written (the command
    line calibrates its threshold there, so that the bundle carries it)."""
    out = Path(out)
    folders = [RunFolder(r) for r in runs]
    if url is not None and not url.startswith(URL_SCHEMES):
        raise CpfcteError(f"--url {url!r}: give the http(s):// (or file://) URL the bundles "
                          "will be uploaded under")
    for folder in folders:                      # every refusal before the first write
        _check_releasable(folder)
    refuse_alias([out], [f.path for f in folders], "cpfcte release")
    refuse_inside_dataset(out, "release folder")
    check_folder(out, "release", force=force)
    mark(out, "release")
    zoo_path = out / ZOO
    zoo = read_zoo(zoo_path)
    made = []
    for folder in folders:
        if prepare is not None and folder.stage == "train":
            prepare(folder.path)
        bundle, entry = write_bundle(folder, out, profile, url)
        zoo[entry["name"]] = entry
        made.append(bundle)
        print(f"{bundle}: {entry['stage']} run {folder.path.name}, "
              f"{len(entry['files'])} files", flush=True)
    write_text(zoo_path, "# cpfcte model zoo: one entry per release bundle (cpfcte release; "
               "docs/releasing.md)\n" + yaml.safe_dump({"models": list(zoo.values())},
                                                      sort_keys=False, allow_unicode=True))
    return {"bundles": made, "zoo": zoo_path}


def batch_runs(profile: str) -> tuple[list[Path], list[str]]:
    """The batch's training, pseudo-label and DeepLabv2 runs of ``profile`` that are complete
    here, and a line for each that is not."""
    from cpfcte.batch.catalog import expand, load_batch, run_dir

    runs, _ = expand(load_batch(), profile)
    found, skipped = [], []
    for name, run in runs.items():
        if run.stage not in ("train", "pseudo", "deeplab"):
            continue
        folder = RunFolder(run_dir(profile, name))
        try:
            _check_releasable(folder)
        except CpfcteError as e:
            if folder.path.is_dir():
                skipped.append(f"{name}: {e}")
            continue
        found.append(folder.path)
    return found, skipped


def _check_releasable(folder: RunFolder) -> None:
    record = folder.record()
    stage = record["stage"]
    if "bundle" in record:
        raise CpfcteError(f"{folder.path}: made from the bundle {record['bundle']['name']}; "
                          "release the run it was made from, or use that bundle as it is")
    if stage in ("train", "deeplab"):
        if not (folder.path / SUMMARY).is_file() or not folder.summary().get("complete"):
            raise CpfcteError(f"{folder.path}: its {stage} run is not complete; finish it "
                              "(run the same command again) before releasing it")
        if not (folder.path / CHECKPOINT).is_file():
            raise CpfcteError(f"{folder.path}: no {CHECKPOINT}; nothing to release")
    if stage in ("pseudo", "deeplab") and not (folder.path / METRICS).is_file():
        raise CpfcteError(f"{folder.path}: no {METRICS}: the {stage} stage did not finish; run "
                          "it again before releasing it")


def write_bundle(folder: RunFolder, out: Path, batch_profile: str,
                 url: str | None) -> tuple[Path, dict]:
    """One run's bundle in ``out/<profile>-<run>/``, the profile being the run's own (made under
    a temporary name, then renamed); returns its folder and its zoo entry. ``batch_profile``
    names the table rows it feeds."""
    record = folder.record()
    stage, cfg = record["stage"], folder.config()
    profile = cfg.profile            # the run's own (the toy batch's COCO runs: toy_coco)
    name = plain_name(f"{profile}-{folder.path.name}", "bundle name")
    metrics = folder.metrics() if (folder.path / METRICS).is_file() else {}
    summary = folder.summary() if (folder.path / SUMMARY).is_file() else {}
    run = read_json(folder.path / RUN) if (folder.path / RUN).is_file() else {}
    numerics = summary.get("numerics") or metrics.get("numerics") or "not recorded"
    bundle_url = f"{url.rstrip('/')}/{name}/" if url else None
    partial = out / f".{name}.{os.getpid()}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        _copy_run(folder, stage, partial)
        classes = record.get("classes") or metrics.get("classes") or classes_of(cfg)
        info = {"format": FORMAT, "name": name, "stage": stage, "profile": profile,
                "dataset": cfg.dataset, "classes": list(classes),
                "dataset_fingerprint": record.get("dataset_fingerprint", "not recorded"),
                "commit": record.get("code", "not recorded (the run predates the record)"),
                "released_at_commit": code_commit(), "config_digest": record.get("digest"),
                "run_dir": str(folder.path.resolve()),
                "table_rows": table_rows(batch_profile, folder.path.name)}
        numbers = labelled_metrics(stage, metrics, summary, cfg, classes)
        write_json(partial / BUNDLE, info)
        write_json(partial / "metrics.json", numbers)
        write_text(partial / "README.md", model_card(info, numbers, cfg, numerics,
                                                     bundle_url or "URL_OF_THIS_BUNDLE"))
        manifest = manifest_text(partial, sorted(p.name for p in partial.iterdir()))
        write_text(partial / MANIFEST, manifest)
        hashes = parse_manifest(manifest, str(partial / MANIFEST)) | {
            MANIFEST: hashlib.sha256(manifest.encode()).hexdigest()}
        target = out / name
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target, zoo_entry(info, numbers, cfg, run, summary, metrics, numerics, hashes,
                             bundle_url)


def _copy_run(folder: RunFolder, stage: str, partial: Path) -> None:
    """The run's own files, as it wrote them, and its weights or pseudo-label archive."""
    for file in AS_WRITTEN:
        if (folder.path / file).is_file():
            shutil.copyfile(folder.path / file, partial / file)
    for file in (sorted(folder.path.glob("*.png")) + sorted(folder.path.glob("evidence_*.json"))
                 + sorted(folder.path.glob("*.ipynb"))):         # the batch's executed notebook
        shutil.copyfile(file, partial / file.name)
    if (folder.path / METRICS).is_file():
        shutil.copyfile(folder.path / METRICS, partial / RUN_METRICS)
    if stage in ("train", "deeplab"):
        _write_weights(folder, stage, partial / WEIGHTS)
    if stage == "pseudo":
        _write_archive(folder.path, partial / PSEUDO_ARCHIVE)


def _write_weights(folder: RunFolder, stage: str, path: Path) -> None:
    """The checkpoint's weights as safetensors: the tensors as they are (their bits), and the
    digest and progress under one metadata key (one key keeps the bytes fixed)."""
    from safetensors.torch import save_file

    state = folder.load_checkpoint()
    progress = "epoch" if stage == "train" else "iteration"
    meta = {"stage": stage, "digest": state["digest"], progress: int(state[progress]),
            "commit": folder.record().get("code", "not recorded")}
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state["model"].items()}
    save_file(tensors, str(path), metadata={WEIGHTS_META: json.dumps(meta, sort_keys=True)})


def _write_archive(run: Path, path: Path) -> None:
    """Every PNG folder of a pseudo-label run (BPM, CRF) in one tar.gz: sorted, times and
    owners fixed, so the same labels give the same bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for sub in sorted(p for p in run.iterdir() if p.is_dir() and PNG_FOLDERS.match(p.name)):
            for png in sorted(sub.glob("*.png")):
                info = tarfile.TarInfo(f"{sub.name}/{png.name}")
                info.size, info.mtime, info.mode = png.stat().st_size, 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                with open(png, "rb") as fh:
                    tar.addfile(info, fh)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                                mtime=0) as gz:
        gz.write(buffer.getvalue())


def table_rows(profile: str, run: str) -> list[str]:
    """The rows of the paper's tables and figures a run feeds (``notebooks/batches.yaml``); a
    training run, those of the runs made from it. [] for a run of yours."""
    from cpfcte.batch.catalog import group_rows, load_batch

    batch = load_batch()
    base = SEEDED.sub("", run)

    def rows_of(name: str) -> list[str]:
        found = []
        for group, spec in batch.groups.items():
            title = re.sub(r"^table", "Table ", re.sub(r"^fig", "Fig. ", group))
            found += [title] if name in spec.get("runs", []) else []
            found += [f"{title}: {label}" for label, r in group_rows(spec, profile).items()
                      if r == name]
        return found

    rows = rows_of(base)
    if not rows and base in batch.runs:
        for other, spec in batch.runs.items():
            if base in spec.needs and spec.stage == "pseudo":
                rows += [f"{row} (its stage 1)" for row in rows_of(other)]
    return list(dict.fromkeys(rows))


def labelled_metrics(stage: str, m: dict, summary: dict, cfg, classes) -> dict:
    """Every number of a run with what it measures: split, level, init, images."""
    names = list(classes)
    init = cfg.init_stamp()
    numbers = []

    def add(level: str, scores: dict | None, **protocol) -> None:
        if not scores or scores.get("miou") is None:
            return
        numbers.append({"metric": "mIoU", "value": scores["miou"],
                        "percent": round(100 * scores["miou"], 1), "split": m.get("split"),
                        "level": level, **protocol, "images": m.get("images"),
                        "per_class_iou": dict(zip(names, scores.get("iou") or []))})

    if stage == "pseudo":
        stage1 = init.split(";")[0]
        common = {"infer_size": m.get("infer_size"), "init": stage1}
        add("BPM", m, bpm_norm=m.get("bpm_norm"), **common)
        add("BPM + CRF", m.get("crf"), bpm_norm=m.get("bpm_norm"), **common)
        other = m.get("other_norm") or {}
        add("BPM", other, bpm_norm=other.get("bpm_norm"), **common)
        add("BPM + CRF", other.get("crf"), bpm_norm=other.get("bpm_norm"), **common)
    elif stage == "deeplab":
        for key, level in (m.get("levels") or {}).items():
            add(f"DeepLabv2, {level['label']}", level, init=init,
                pseudo_labels=Path(str(m.get("pseudo_dir", ""))).name, view=key)
    out = {"profile": cfg.profile, "dataset": cfg.dataset, "stage": stage, "numbers": numbers}
    if stage == "train":
        last = (summary.get("history") or [{}])[-1]
        out["training"] = {"split": cfg.train_split, "epochs": summary.get("epochs_done"),
                           "init": init.split(";")[0],
                           "last_epoch": {k: last.get(k) for k in
                                          ("loss", "label_accuracy", "label_map") if k in last},
                           "mechanisms_alive": (summary.get("mechanisms") or {}).get("alive")}
    if cfg.dataset in ("toy", "toy_coco"):
        out["note"] = ("toy profile: a synthetic dataset and a tiny network trained from "
                       "scratch; not comparable to the paper's numbers")
    return out


def wall_seconds(run: dict, summary: dict, metrics: dict) -> float | None:
    """The run's wall time: the batch runner's record (``run.json``), else the stage's own
    timings."""
    if run.get("seconds") is not None:
        return run["seconds"]
    history = summary.get("history") or []
    seconds = history[-1].get("seconds") if history else None
    timing = metrics.get("timing") or {}
    extra = timing.get("seconds") or timing.get("predict_seconds")
    parts = [s for s in (seconds, extra) if s is not None]
    return round(sum(parts), 1) if parts else None


def zoo_entry(info: dict, numbers: dict, cfg, run: dict, summary: dict, metrics: dict,
              numerics: str, hashes: dict[str, str], url: str | None) -> dict:
    """A bundle's entry in zoo.yaml; ``hashes``: its files' sha256 (from its manifest)."""
    peak = summary.get("peak_memory_mib") or (metrics.get("timing") or {}).get("peak_memory_mib")
    return {"name": info["name"], "stage": info["stage"], "profile": info["profile"],
            "dataset": info["dataset"], "table_rows": info["table_rows"],
            "metrics": [{k: n[k] for k in ("split", "level", "percent") if k in n}
                        | ({"bpm_norm": n["bpm_norm"]} if "bpm_norm" in n else {})
                        for n in numbers["numbers"]],
            "init": cfg.init_stamp(), "commit": info["commit"],
            "hardware": run.get("hardware") or summary.get("device") or "not recorded",
            "numerics": numerics, "wall_seconds": wall_seconds(run, summary, metrics),
            "peak_memory_mib": peak or "not recorded", "url": url,
            "files": dict(sorted(hashes.items()))}


def read_zoo(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    try:
        models = (yaml.safe_load(path.read_text()) or {}).get("models") or []
        return {m["name"]: m for m in models}
    except (yaml.YAMLError, AttributeError, KeyError, TypeError) as e:
        raise CpfcteError(f"{path}: not a cpfcte zoo file ({e}); move it away and release "
                          "again") from None


STAGE_WHAT = {"train": "stage 1 of CPF-CTE: the ViT with class tokens, CF-BiLSTM and top-k "
                       "pooling, trained on image-level labels",
              "pseudo": "stage 2 of CPF-CTE: baseline pseudo masks (BPM) and their dense-CRF "
                        "refinement, made with a stage-1 run",
              "deeplab": "stage 3 of CPF-CTE: DeepLabv2 trained on the CRF pseudo labels"}
USE = {"train": ["cpfcte predict --profile {p} --run {u} --images DIR --out DIR",
                 "cpfcte pseudo --profile {p} --train-run {u} --run NAME"],
       "pseudo": ["cpfcte deeplab train --profile {p} --pseudo {u} --run NAME"],
       "deeplab": ["cpfcte predict --profile {p} --run {u} --images DIR --out DIR",
                   "cpfcte deeplab predict --profile {p} --run {u}"]}


def model_card(info: dict, numbers: dict, cfg, numerics: str, where: str) -> str:
    """The bundle's README.md."""
    lines = [f"# {info['name']}", "", f"A {info['profile']}-profile {STAGE_WHAT[info['stage']]}.",
             "It is a release bundle of cpfcte, the reproducible companion to *Context Patch "
             "Fusion With Class Token Enhancement for Weakly Supervised Semantic Segmentation* "
             "(CPF-CTE).", ""]
    if numbers.get("note"):
        lines += [f"**{numbers['note'][0].upper()}{numbers['note'][1:]}.**", ""]
    lines += ["## Data", "",
              f"- dataset: {info['dataset']} (fingerprint {info['dataset_fingerprint']}); "
              f"training split {cfg.train_split}",
              f"- {len(info['classes']) - 1} classes and background: "
              + ", ".join(info["classes"][1:]), "",
              "## Recipe", "",
              f"- backbone {cfg.backbone}, class tokens {cfg.class_tokens}, CF-BiLSTM "
              f"{cfg.cf_bilstm}, pooling {cfg.pooling} (k = {cfg.k}), {cfg.epochs} epochs at "
              f"{cfg.img_size}, batch {cfg.batch_size}, seed {cfg.seed}",
              f"- weights: {cfg.init_stamp()}",
              *([f"- DeepLabv2: {cfg.deeplab.backbone}, {cfg.deeplab.iterations} iterations, "
                 f"batch {cfg.deeplab.batch}, crop {cfg.deeplab.crop}, lr {cfg.deeplab.lr}; "
                 f"test scales {list(cfg.deeplab.test_scales)}, flip {cfg.deeplab.flip_test}"]
                if info["stage"] == "deeplab" else []),
              "- every setting is in `config.json`; where the code departs from the paper or "
              "its reference code, `docs/choices.md` of cpfcte at the commit below says so", ""]
    if info["table_rows"]:
        lines += ["It feeds: " + "; ".join(info["table_rows"]) + ".", ""]
    lines += ["## Numbers", ""]
    if numbers["numbers"]:
        lines += ["| split | level | init | mIoU (%) |", "|---|---|---|---|"]
        for n in numbers["numbers"]:
            level = n["level"] + (f" ({n['bpm_norm']} normalisation)" if n.get("bpm_norm")
                                  else "")
            lines.append(f"| {n['split']} ({n['images']} images) | {level} | {n['init']} | "
                         f"{n['percent']:.1f} |")
        lines += ["", "Per-class IoU: `metrics.json`."]
    else:
        t = numbers.get("training", {})
        lines.append(f"A training run has no segmentation score of its own. Training on "
                     f"{t.get('split')}: {t.get('epochs')} epochs, last epoch "
                     f"{json.dumps(t.get('last_epoch'))}; class-token mechanisms alive: "
                     f"{t.get('mechanisms_alive')}. Its pseudo labels are scored by the pseudo-"
                     "label bundles made from it.")
    lines += ["", "## Use", "", "```"]
    lines += [c.format(p=info["profile"], u=where) for c in USE[info["stage"]]]
    lines += ["```", "", "Each file is checked against `MANIFEST.sha256` before use "
              "(docs/releasing.md).", "", "## Provenance", "",
              f"- made at commit {info['commit']}; released at {info['released_at_commit']}",
              f"- config digest {info['config_digest']}",
              f"- numerics: {numerics}",
              "", "## Licence and citation", "",
              "- cpfcte's code: MIT. The paper: CC BY 4.0.",
              "- The weights and labels are derived from the dataset named above and, where "
              "the weights line says pretrained, from the pretrained backbone; their terms "
              "apply.",
              "- Cite the paper (the `preferred-citation` of cpfcte's CITATION.cff):", "",
              "> Y. Fu, H. Li, W. Wu. Context Patch Fusion With Class Token Enhancement for "
              "Weakly Supervised Semantic Segmentation.", ""]
    return "\n".join(lines)
