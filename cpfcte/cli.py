"""The ``cpfcte`` command line. Every stage the notebooks drive is also a command here.

    cpfcte data download voc|sbd|coco --to DIR
    cpfcte data prepare toy [--root DIR] [--seed N] [--force]
    cpfcte data prepare voc --voc-root VOCdevkit/VOC2012 --sbd-root benchmark_RELEASE/dataset
    cpfcte data prepare coco --coco-root DIR
    cpfcte data verify [--profile toy]
    cpfcte train --profile toy --run NAME [--set key=value ...] [--weights PATH] [--resume]
    cpfcte pseudo --profile toy --train-run NAME --run NAME [--infer-size N | --infer-scale X]
                  [--split S] [--set crf.bilateral_sxy=50 ...]
    cpfcte deeplab train --profile toy --pseudo RUN_OR_DIR --run NAME [--init PATH] [--set ...]
                         [--nproc N]
    cpfcte deeplab predict --profile toy --run NAME [--split val]

Each stage's config follows its input downstream: ``pseudo`` starts from the training run's
config, ``deeplab train`` from the pseudo-label run's (when --pseudo is one, or one of its
folders), and ``--set`` changes fields on top (a section's as crf.NAME / deeplab.NAME).
    cpfcte predict --run RUN --images DIR --out DIR [--crf] [--scores] [--threshold auto]
    cpfcte export voc-test --pred DIR --out FILE.tar.gz [--list test.txt] [--images DIR]
    cpfcte export voc-test --check FILE.tar.gz [--list test.txt] [--images DIR]
    cpfcte data prepare folder --images DIR --labels labels.csv --out DIR [--masks DIR]
    cpfcte eval --pred DIR --gt DIR --num-classes N [--ignore-index 255] [--list FILE]
    cpfcte paper --profile toy [--only GROUP ...] [--dry-run] [--jobs N] [--check]
                 [--executor local|slurm] [--cluster cluster.yaml] [--status]
    cpfcte report --profile toy
    cpfcte numerics [--check | --diff FILE | --write]
    cpfcte release [RUN ...] --profile toy --out DIR [--url BASE] [--force]

Wherever a command takes a run (--train-run, --pseudo, predict's and deeplab predict's --run)
it also takes a release bundle: its folder, or a file:// or http(s):// URL (docs/releasing.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cpfcte.machinery.errors import CpfcteError


def _data(args: argparse.Namespace) -> None:
    from cpfcte.data import classes_of, dataset_root, dataset_stats
    from cpfcte.data.toy import prepare_toy
    from cpfcte.machinery.config import load_config
    from cpfcte.machinery.paths import data_dir

    if args.action == "download":
        from cpfcte.data.download import download

        for path in download(args.dataset, args.to):
            print(f"ready: {path}")
        return
    if args.action == "prepare":
        if args.dataset == "toy":
            root = prepare_toy(args.root, args.seed, force=args.force)
            print(f"toy dataset ready at {root} (COCO twin in {root / 'coco'})")
        elif args.dataset == "folder":
            from cpfcte.data.folder import prepare_folder

            if not (args.images and args.labels and args.out):
                raise CpfcteError("cpfcte data prepare folder needs --images DIR --labels "
                                  "labels.csv --out DIR")
            classes = tuple(c.strip() for c in args.classes.split(",")) if args.classes else None
            print(json.dumps(prepare_folder(
                args.images, args.labels, args.out, masks=args.masks, classes=classes,
                val_fraction=args.val_fraction, seed=args.seed, train_list=args.train_list,
                val_list=args.val_list, force=args.force), indent=2))
        elif args.dataset == "voc":
            from cpfcte.data.prepare_voc import prepare_voc

            voc = Path(args.voc_root) if args.voc_root else data_dir() / "VOCdevkit" / "VOC2012"
            sbd = (Path(args.sbd_root) if args.sbd_root
                   else data_dir() / "benchmark_RELEASE" / "dataset")
            print(json.dumps(prepare_voc(voc, sbd, args.out, allow_partial=args.allow_partial),
                             indent=2))
        else:
            from cpfcte.data.coco import prepare_coco

            root = Path(args.coco_root) if args.coco_root else data_dir() / "coco2014"
            print(json.dumps(prepare_coco(root, args.out, allow_partial=args.allow_partial),
                             indent=2))
        return
    cfg = load_config(args.profile)
    root = dataset_root(cfg)
    print(json.dumps(dataset_stats(root, classes_of(cfg),
                                   (cfg.train_split, cfg.pseudo_split, cfg.val_split)), indent=2))


def _train(args: argparse.Namespace) -> None:
    from cpfcte.machinery.config import config_from_file, derive, load_config, parse_set_args
    from cpfcte.machinery.paths import run_path
    from cpfcte.stages.train import train, train_distributed

    overrides = parse_set_args(args.set)
    if args.weights:   # a path given on the command line is relative to the current folder
        overrides["weights"] = str(Path(args.weights).resolve())
    if args.from_config:
        cfg = derive(config_from_file(args.from_config), overrides)
    else:
        cfg = load_config(args.profile, overrides)
    if args.run is None and not args.from_config:
        raise CpfcteError("cpfcte train needs --run NAME (or --from-config, whose folder is "
                          "the run folder)")
    run_dir = (run_path(cfg.profile, args.run) if args.run is not None
               else Path(args.from_config).resolve().parent)
    if args.nproc != 1:
        summary = train_distributed(cfg, run_dir, args.nproc)
    else:
        if args.resume and not (Path(run_dir) / "checkpoint.pt").exists():
            print(f"--resume: {run_dir} holds no checkpoint yet; training from the first epoch",
                  file=sys.stderr)
        summary = train(cfg, run_dir, max_epochs=args.max_epochs, resume=args.resume)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    last = summary["history"][-1] if summary["history"] else {}
    print(json.dumps({"run_dir": str(run_dir), "epochs_done": summary["epochs_done"],
                      "complete": summary["complete"], "last": last,
                      "trainable_parameters": summary.get("trainable_parameters")}, indent=2))


def _pseudo(args: argparse.Namespace) -> None:
    from cpfcte.machinery.config import parse_set_args
    from cpfcte.machinery.paths import run_path
    from cpfcte.machinery.runfolder import run_config
    from cpfcte.stages.pseudo_labels import pseudo_stage

    if args.infer_size is not None and args.infer_scale is not None:
        raise CpfcteError("--infer-size and --infer-scale both given: one sets the inference "
                          "size (pixels, or a multiple of the training size); pass one")
    train_dir = _run_or_bundle(args.profile, args.train_run)
    overrides = {"infer_size": args.infer_size, "infer_scale": args.infer_scale,
                 "pseudo_split": args.split, "device": args.device, **parse_set_args(args.set)}
    cfg = run_config(train_dir, overrides)
    _same_profile(args.profile, cfg.profile, train_dir, "--train-run")
    m = pseudo_stage(cfg, train_dir, run_path(args.profile, args.run),
                     both_norms=args.both_norms)
    if m.get("no_masks"):
        print(f"no masks: the dataset has no ground truth for split {m['split']!r}, so the "
              f"pseudo labels in {m['bpm_dir']} are not scored", file=sys.stderr)
    print(json.dumps({k: m.get(k) for k in ("miou", "infer_size", "split", "images", "bpm_dir")},
                     indent=2))


def _run_or_bundle(profile: str, value: str) -> Path:
    """The run folder a --run / --train-run / --pseudo value names: a run (name or folder), or
    a release bundle (folder or URL), fetched, checked and set up as a run."""
    from cpfcte.machinery.fetch import is_bundle
    from cpfcte.machinery.paths import run_path

    if is_bundle(value):
        from cpfcte.stages.bundle import open_bundle

        return open_bundle(value, profile, progress=sys.stderr.isatty())
    return run_path(profile, value)


def _same_profile(asked: str, found: str, run_dir: Path, flag: str) -> None:
    """A run of another profile (its checkpoint, its labels) is refused, not filed under the
    profile asked for."""
    if asked != found:
        raise CpfcteError(f"{flag} {run_dir} is a run of profile {found!r}, not {asked!r}: "
                          f"pass --profile {found}, or give a run of profile {asked!r}")


def _deeplab(args: argparse.Namespace) -> None:
    from cpfcte.machinery.config import config_from_file, derive, load_config, parse_set_args
    from cpfcte.machinery.paths import run_path
    from cpfcte.machinery.runfolder import RunFolder, run_config
    from cpfcte.stages.deeplab_predict import deeplab_stage
    from cpfcte.stages.deeplab_train import train_deeplab, train_deeplab_distributed
    from cpfcte.stages.pseudo_runs import pseudo_run_of

    if args.action == "train" and args.run is None:
        if not args.from_config:
            raise CpfcteError("cpfcte deeplab train needs --run NAME")
        args.run = str(Path(args.from_config).resolve().parent)
    if args.action == "train":
        run_dir = run_path(args.profile, args.run)
        overrides = parse_set_args(args.set)
        if args.init:
            overrides["deeplab.init"] = args.init
        from cpfcte.machinery.fetch import is_bundle

        if is_bundle(args.pseudo):
            args.pseudo = str(_run_or_bundle(args.profile, args.pseudo))
        elif not Path(args.pseudo).exists() and run_path(args.profile, args.pseudo).is_dir():
            args.pseudo = str(run_path(args.profile, args.pseudo))   # a run name of the profile
        upstream = pseudo_run_of(args.pseudo)
        if args.from_config:              # torchrun's processes: the launcher's whole config
            cfg = derive(config_from_file(args.from_config), overrides)
        else:
            cfg = (run_config(upstream, overrides) if upstream
                   else load_config(args.profile, overrides))
        if upstream and not args.from_config:
            _same_profile(args.profile, cfg.profile, upstream, "--pseudo")
        if args.nproc != 1:
            s = train_deeplab_distributed(cfg, args.pseudo, run_dir, args.nproc)
        else:
            s = train_deeplab(cfg, args.pseudo, run_dir, max_iterations=args.max_iterations)
        if int(os.environ.get("RANK", "0")) != 0:
            return
        print(json.dumps({k: s[k] for k in ("iterations_done", "iterations", "complete",
                                            "parameters")} | {"run_dir": str(run_dir)}, indent=2))
        return
    folder = RunFolder(_run_or_bundle(args.profile, args.run))
    run_dir = folder.path
    record = folder.record()
    if record.get("stage") != "deeplab" or "pseudo_dir" not in record:
        raise CpfcteError(f"{run_dir}: holds a {record.get('stage')} run, not a DeepLabv2 "
                          "training run; give the --run of `cpfcte deeplab train`")
    cfg = derive(folder.config(), {"val_split": args.split})
    m = deeplab_stage(cfg, record["pseudo_dir"], run_dir)
    if m.get("no_masks"):
        print(f"no masks: the dataset has no ground truth for split {m['split']!r}, so the "
              f"predictions in {m['pred_dir']} are not scored", file=sys.stderr)
    print(json.dumps({k: m.get(k) for k in ("miou", "split", "images", "pred_dir", "crf_dir")}
                     | {"miou_no_crf": (m.get("no_crf") or {}).get("miou")}, indent=2))


def _predict(args: argparse.Namespace) -> None:
    from cpfcte.machinery.runfolder import RunFolder
    from cpfcte.stages.predict import predict_folder
    from cpfcte.stages.train import describe_model

    run = _run_or_bundle(args.profile, args.run)
    if RunFolder(run).stage == "train":
        print(describe_model(run), file=sys.stderr)
    report = predict_folder(run, args.images, args.out,
                            crf=args.crf, scores=args.scores, threshold=args.threshold,
                            device=args.device, limit=args.limit, force=args.force)
    print(json.dumps({k: v for k, v in report.items() if k != "classes_kept"}, indent=2))


def _export(args: argparse.Namespace) -> None:
    from cpfcte.stages.export import check_voc_test, export_voc_test

    if args.check:
        if args.pred or args.out:
            raise CpfcteError("--check ARCHIVE checks an archive; --pred and --out make one: "
                              "give one or the other")
        print(json.dumps(check_voc_test(args.check, args.list, args.images), indent=2))
        return
    if not (args.pred and args.out):
        raise CpfcteError("cpfcte export voc-test needs --pred DIR --out FILE.tar.gz (or "
                          "--check FILE.tar.gz to check an archive)")
    test_list = args.list
    if test_list is None:
        from cpfcte.machinery.config import load_config
        from cpfcte.machinery.paths import data_dir, resolve

        root = resolve(load_config("voc").data_root, data_dir())
        test_list = root / "ImageSets" / "Segmentation" / "test.txt"
    print(json.dumps(export_voc_test(args.pred, args.out, test_list, args.images,
                                     force=args.force), indent=2))


def _eval(args: argparse.Namespace) -> None:
    from cpfcte.method.metrics import evaluate_dirs

    ids = None
    if args.list:
        path = Path(args.list)
        if not path.is_file():
            raise CpfcteError(f"{path}: list file not found")
        from cpfcte.machinery.io import read_ids

        ids = read_ids(path)
        if not ids:
            raise CpfcteError(f"{path}: list file is empty")
    elif Path(args.gt).is_dir() and Path(args.pred).is_dir():   # without a list: the pairs
        def stems(folder: str) -> set[str]:
            return {p.stem for p in Path(folder).glob("*.png") if p.is_file()}

        gts, preds = stems(args.gt), stems(args.pred)
        missing, extra = sorted(gts - preds), sorted(preds - gts)
        if missing:
            print(f"warning: {args.pred} has no prediction for {len(missing)} ground-truth "
                  f"mask(s) of {args.gt} ({', '.join(missing[:5])}"
                  f"{' …' if len(missing) > 5 else ''}); they are not scored. Pass --list to "
                  "score a fixed set (a missing prediction is then an error)", file=sys.stderr)
        if extra:                               # the same rule the other way round
            print(f"warning: {len(extra)} prediction(s) of {args.pred} have no ground-truth "
                  f"mask in {args.gt} ({', '.join(extra[:5])}{' …' if len(extra) > 5 else ''}"
                  "); they are not scored", file=sys.stderr)
            ids = sorted(preds & gts)
            if not ids:
                raise CpfcteError(f"{args.pred}: none of its predictions has a ground-truth "
                                  f"mask in {args.gt} (same file names); check --gt")
    result = evaluate_dirs(args.pred, args.gt, args.num_classes, ids=ids,
                           ignore_index=args.ignore_index)
    print(json.dumps(result, indent=2))


def _headless_plots() -> None:
    import matplotlib

    matplotlib.use("Agg")   # the command line draws figures only to files


def _print_check(profile: str) -> bool:
    from cpfcte.report.check import check

    ok, lines = check(profile)
    print("\nreproduction check against the committed tables (git HEAD): " + lines[0])
    for line in lines[1:]:
        print("  " + line)
    return ok


def _known_profile(profile: str) -> None:
    """Refuse a profile name that names no profile file, before anything is read or written."""
    from cpfcte.machinery.config import load_config

    load_config(profile)


def _paper(args: argparse.Namespace) -> None:
    from cpfcte.batch.runner import run_batch, stage_times
    from cpfcte.machinery.numerics import warn_native
    from cpfcte.report import artifacts_for, write

    _known_profile(args.profile)
    warn_native()                              # once, at the start: digits may differ here
    if args.jobs is None:
        from cpfcte.batch.runner import default_jobs

        args.jobs = default_jobs(args.profile)
    if args.jobs < 1:
        raise CpfcteError(f"--jobs {args.jobs}: must be ≥ 1 (runs at the same time)")
    if args.check:
        sys.exit(0 if _print_check(args.profile) else 1)
    if args.status:
        from cpfcte.batch.catalog import expand, load_batch
        from cpfcte.batch.cluster import status_lines

        runs, _ = expand(load_batch(), args.profile)
        print("\n".join(status_lines(args.profile, list(runs))))
        return
    cluster = None
    given = [f"--{k}" for k in ("cluster", "partition", "account", "qos")
             if getattr(args, k) not in (None, "")]
    if args.executor == "local" and given:
        raise CpfcteError(f"{', '.join(given)}: cluster options, but the runs go to this "
                          "machine (--executor local); add --executor slurm, or drop them")
    if args.executor != "local":
        from cpfcte.batch.cluster import ClusterConfig, check_executor

        check_executor(args.executor)
        cluster = ClusterConfig.load(args.cluster, partition=args.partition,
                                     account=args.account, qos=args.qos)
    _headless_plots()
    results = run_batch(args.profile, only=args.only, dry_run=args.dry_run, jobs=args.jobs,
                        executor=args.executor, cluster=cluster)
    if args.dry_run:
        from cpfcte.batch.plan import print_plan

        print_plan(args.profile, results)
        return
    outputs = write(args.profile, artifacts_for(args.only, args.profile))
    failed = {k: v for k, v in results.items() if v.get("status") not in ("done", "not applicable")}
    print("\nwritten: " + ", ".join(str(p) for d in outputs.values() for p in d.values()))
    times = stage_times(results)
    if times:
        print("\ntime per stage (each run's own seconds; with --jobs they overlap):")
        print("\n".join("  " + line for line in times))
    _print_check(args.profile)
    if failed:
        print("\nnot done: " + "; ".join(f"{k} ({v.get('status')}: {v.get('error', v.get('needs', ''))})"
                                         for k, v in failed.items()))
        sys.exit(1)


def _report(args: argparse.Namespace) -> None:
    from cpfcte.report import write_all

    _known_profile(args.profile)
    _headless_plots()
    from cpfcte.report import ARTIFACTS, missing_runs

    written = write_all(args.profile)
    for name, paths in written.items():
        print(name, " ".join(str(p) for p in paths.values()))
    kept = {n: missing_runs(n, args.profile) for n in ARTIFACTS if n not in written}
    kept = {n: m for n, m in kept.items() if m}
    if kept:
        first = next(iter(kept.values()))[0]
        print(f"kept as they are ({', '.join(kept)}): not all of their runs are in "
              f"runs/{args.profile} (for example {first}); make paper makes them")
    if not written:
        print("nothing written: the tables in tables/ and figures in figures/ stay as they are")


def _release(args: argparse.Namespace) -> None:
    from cpfcte.machinery.paths import run_path
    from cpfcte.report.release import batch_runs, release

    _known_profile(args.profile)
    if args.runs:
        runs = [run_path(args.profile, r) for r in args.runs]
    else:
        runs, skipped = batch_runs(args.profile)
        for line in skipped:
            print(f"not released: {line}", file=sys.stderr)
        if not runs:
            raise CpfcteError(f"no complete run of the {args.profile} batch in "
                              f"runs/{args.profile}: make them (make paper PROFILE="
                              f"{args.profile}), or name runs: cpfcte release RUN ... --out DIR")
    from cpfcte.stages.threshold import calibrated_threshold

    done = release(runs, args.out, profile=args.profile, url=args.url, force=args.force,
                   prepare=lambda run: calibrated_threshold(run, sys.stderr.isatty()))
    print(json.dumps({"bundles": [str(b) for b in done["bundles"]], "zoo": str(done["zoo"])},
                     indent=2))


def _numerics(args: argparse.Namespace) -> None:
    from cpfcte.machinery.io import write_json
    from cpfcte.stages import fingerprint as fp

    other = None
    if args.diff:                    # read first: a wrong file fails before the minute of work
        path = Path(args.diff)
        try:
            other = json.loads(path.read_text())
            other["ops"], other["meta"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CpfcteError(f"{path}: not a fingerprint file of cpfcte numerics ({e}); make "
                              "one with: cpfcte numerics > FILE") from None
    mine = fp.fingerprint(progress=sys.stderr.isatty())
    if args.write:
        write_json(fp.REFERENCE, mine)
        print(f"wrote {fp.REFERENCE} ({len(mine['ops'])} operations, {mine['meta']['cpu']})")
        return
    if not (args.check or args.diff):
        print(json.dumps(mine, indent=1))
        return
    if other is not None:
        label = f"file {args.diff}"
    else:
        other, label = fp.reference(), "committed reference"
    same, lines = fp.report(mine, other, label)
    print("\n".join(lines))
    if not same:
        if all(fp.is_model_case(k) for k in fp.compare(mine, other)):
            print("\nOnly the cases that build the toy networks from this checkout's code "
                  "differ; every operation agrees. The model's code changed since the reference "
                  "was written: rewrite it with cpfcte numerics --write (on a pinned x86 "
                  "machine) and commit it with the change.", file=sys.stderr)
        else:
            print("\nThis machine's CPU code paths give other bits than the reference, so its "
                  "toy tables will differ from the committed ones. Tell us the processor "
                  "(above) and the operations that differ; CPFCTE_NUMERICS=native runs anyway, "
                  "and paper --check then reports the differences as expected.",
                  file=sys.stderr)
        sys.exit(1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpfcte", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="prepare or verify a dataset")
    dsub = data.add_subparsers(dest="action", required=True)
    dl = dsub.add_parser("download", help="fetch, verify and extract the official archives")
    dl.add_argument("dataset", choices=["voc", "sbd", "coco"])
    dl.add_argument("--to", required=True, help="folder to download and extract into")
    dl.set_defaults(func=_data)
    prep = dsub.add_parser("prepare", help="generate the toy dataset, or prepare VOC+SBD / COCO")
    prep.add_argument("dataset", choices=["toy", "voc", "coco", "folder"])
    prep.add_argument("--root", help="toy: output folder (default: data/toy)")
    prep.add_argument("--seed", type=int, default=0, help="toy: generator seed; folder: val draw seed")
    prep.add_argument("--force", action="store_true",
                      help="toy: regenerate even if present; toy and folder: replace what the "
                           "command writes in a folder it did not make")
    prep.add_argument("--voc-root", help="voc: VOCdevkit/VOC2012 (default: data/VOCdevkit/VOC2012)")
    prep.add_argument("--sbd-root", help="voc: SBD's benchmark_RELEASE/dataset "
                      "(default: data/benchmark_RELEASE/dataset)")
    prep.add_argument("--coco-root", help="coco: folder with train2014/, val2014/, annotations/ "
                      "(default: data/coco2014)")
    prep.add_argument("--out", help="voc/coco: write the prepared layout here (default: in "
                      "place); folder: the prepared dataset's folder")
    prep.add_argument("--images", help="folder: the images")
    prep.add_argument("--labels", help="folder: the label CSV (image,labels or image,<class>,...)")
    prep.add_argument("--masks", help="folder: label PNGs <stem>.png, for evaluation only")
    prep.add_argument("--classes", help="folder: the class names, comma-separated (default: "
                      "those of the CSV)")
    prep.add_argument("--val-fraction", type=float, default=0.2,
                      help="folder: share of the images drawn (seeded) for val")
    prep.add_argument("--train-list", help="folder: train image list (with --val-list)")
    prep.add_argument("--val-list", help="folder: val image list (with --train-list)")
    prep.add_argument("--allow-partial", action="store_true",
                      help="voc/coco: accept image counts below the standard split's")
    prep.set_defaults(func=_data)
    ver = dsub.add_parser("verify", help="print the counts of a profile's dataset")
    ver.add_argument("--profile", default="toy")
    ver.set_defaults(func=_data)

    tr = sub.add_parser("train", help="stage 1: train CPF-CTE (resumes a run folder)")
    tr.add_argument("--profile", default="toy")
    tr.add_argument("--run", help="run name (runs/<profile>/<run>) or folder")
    tr.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="override profile fields")
    tr.add_argument("--weights", help="local backbone checkpoint (offline clusters)")
    tr.add_argument("--nproc", type=int, default=1,
                    help="processes (GPUs) through torchrun; gloo on CPUs")
    tr.add_argument("--from-config", help="a config.json to train (instead of --profile/--set)")
    tr.add_argument("--max-epochs", type=int, help="stop after this many epochs (resumable)")
    tr.add_argument("--resume", action="store_true",
                    help="continue the run folder's unfinished checkpoint")
    tr.set_defaults(func=_train)

    ps = sub.add_parser("pseudo", help="stage 2: baseline pseudo masks (BPM) and their mIoU")
    ps.add_argument("--profile", default="toy")
    ps.add_argument("--train-run", required=True,
                    help="a training run (name or folder) or a release bundle (folder or URL)")
    ps.add_argument("--run", required=True, help="output run name or folder")
    ps.add_argument("--infer-size", type=int)
    ps.add_argument("--infer-scale", type=float)
    ps.add_argument("--split", help="default: the profile's pseudo_split (VOC train)")
    ps.add_argument("--device", help="default: the training run's (auto)")
    ps.add_argument("--set", nargs="*", metavar="KEY=VALUE",
                    help="override fields of the training run's config (crf.NAME=...)")
    ps.add_argument("--both-norms", action="store_true",
                    help="also the BPM of the other bpm_norm, with its CRF (Table 1)")
    ps.set_defaults(func=_pseudo)

    dl = sub.add_parser("deeplab", help="stage 3: DeepLabv2 on pseudo labels")
    dlsub = dl.add_subparsers(dest="action", required=True)
    dtr = dlsub.add_parser("train", help="train (or resume) DeepLabv2 on a pseudo-label folder")
    dtr.add_argument("--profile", default="toy")
    dtr.add_argument("--pseudo", required=True,
                     help="a pseudo-label run, by name or folder (its config is the base), a "
                          "release bundle of one (folder or URL), or a folder of pseudo-label "
                          "PNGs of the training split")
    dtr.add_argument("--run", help="run name (runs/<profile>/<run>) or folder")
    dtr.add_argument("--init", help="local init file (e.g. a COCO-pretrained DeepLabv2)")
    dtr.add_argument("--set", nargs="*", metavar="KEY=VALUE",
                     help="override fields (deeplab.NAME=..., crf.NAME=...)")
    dtr.add_argument("--max-iterations", type=int, help="stop after this many (resumable)")
    dtr.add_argument("--nproc", type=int, default=1,
                     help="processes under torchrun (GPUs on one node; gloo on CPUs)")
    dtr.add_argument("--from-config", help=argparse.SUPPRESS)   # set by --nproc's launcher
    dtr.set_defaults(func=_deeplab)
    dpr = dlsub.add_parser("predict", help="multi-scale + flip inference, CRF, and mIoU")
    dpr.add_argument("--profile", default="toy")
    dpr.add_argument("--run", required=True,
                     help="a DeepLabv2 run (name or folder) or a release bundle (folder or URL)")
    dpr.add_argument("--split", help="default: the profile's val split")
    dpr.set_defaults(func=_deeplab)

    ev = sub.add_parser("eval", help="mIoU of a prediction folder against ground truth")
    ev.add_argument("--pred", required=True)
    ev.add_argument("--gt", required=True)
    ev.add_argument("--num-classes", type=int, required=True)
    ev.add_argument("--ignore-index", type=int, default=255)
    ev.add_argument("--list", help="file of image ids to score (default: every predicted PNG)")
    ev.set_defaults(func=_eval)

    pa = sub.add_parser("paper", help="run the batch of notebooks, then write tables/figures")
    pa.add_argument("--profile", default="toy")
    pa.add_argument("--only", nargs="*", help="groups (table1, fig5) or runs to run")
    pa.add_argument("--dry-run", action="store_true",
                    help="list what would run, with the estimated GPU time of each run")
    pa.add_argument("--check", action="store_true",
                    help="only compare tables/ with the committed tables, cell by cell "
                         "(exit 1 when a cell differs)")
    pa.add_argument("--jobs", type=int, default=None,
                    help="independent runs executed in parallel (default: the toy, one per core "
                         "as memory allows, about 1.1 GB each; a GPU profile, 1)")
    pa.add_argument("--executor", default="local",
                    help="local (this machine), slurm (each run a SLURM job, through "
                         "submitit) or submitit-local")
    pa.add_argument("--cluster", help="cluster.yaml: partition, account, qos, sbatch options, "
                                      "GPUs/CPUs/memory per stage, time margin")
    pa.add_argument("--partition")
    pa.add_argument("--account")
    pa.add_argument("--qos")
    pa.add_argument("--status", action="store_true",
                    help="each run's state (pending/running/done/failed) and job id")
    pa.set_defaults(func=_paper)

    rp = sub.add_parser("report", help="write tables/ and figures/ from the run folders")
    rp.add_argument("--profile", default="toy")
    rp.set_defaults(func=_report)

    nu = sub.add_parser("numerics", help="the numerics fingerprint: does this machine give the "
                                         "committed bits? (docs/reproducing.md)")
    how = nu.add_mutually_exclusive_group()
    how.add_argument("--check", action="store_true",
                     help="compare with the committed reference; exit 1 naming each operation "
                          "that differs")
    how.add_argument("--diff", metavar="FILE", help="compare with another machine's fingerprint")
    how.add_argument("--write", action="store_true",
                     help="rewrite the committed reference (after a change to the model or "
                          "the pinned requirements; on a pinned x86 machine)")
    nu.set_defaults(func=_numerics)

    pr = sub.add_parser("predict", help="label PNGs (VOC palette) and overlays for any folder "
                                        "of images, with a stage-1 or DeepLabv2 run")
    pr.add_argument("--profile", default="toy")
    pr.add_argument("--run", required=True, help="a training or DeepLabv2 run, name or folder, "
                                                  "or a release bundle of one (folder or URL)")
    pr.add_argument("--images", required=True)
    pr.add_argument("--out", required=True)
    pr.add_argument("--crf", action="store_true", help="refine with the run's dense CRF")
    pr.add_argument("--scores", action="store_true",
                    help="stage 1: also write the per-class patch scores (.npz)")
    pr.add_argument("--threshold", default="auto",
                    help="stage 1: image score above which a class may appear; auto (the "
                         "default): the run's own, calibrated on its training labels "
                         "(threshold.json in the run)")
    pr.add_argument("--device", help="default: the run's (auto)")
    pr.add_argument("--limit", type=int, help="only the first N images (by name)")
    pr.add_argument("--force", action="store_true",
                    help="write into a --out folder that is not empty and not a prediction's")
    pr.set_defaults(func=_predict)

    rl = sub.add_parser("release", help="a release bundle per run: weights, labels, config, "
                                        "numbers, logs, manifest, model card; and zoo.yaml")
    rl.add_argument("runs", nargs="*", metavar="RUN",
                    help="runs, by name or folder (default: every complete run of the batch)")
    rl.add_argument("--profile", default="toy")
    rl.add_argument("--out", required=True, help="folder for the bundles and zoo.yaml")
    rl.add_argument("--url", help="the base URL the bundles will be uploaded under, for zoo.yaml "
                                  "(each bundle at URL/<name>/)")
    rl.add_argument("--force", action="store_true",
                    help="write into an --out folder that is not empty and not a release's")
    rl.set_defaults(func=_release)

    ex = sub.add_parser("export", help="pack predictions for an evaluation server")
    exsub = ex.add_subparsers(dest="target", required=True)
    vt = exsub.add_parser("voc-test", help="VOC 2012 test: comp6 palette PNGs in a .tar.gz")
    vt.add_argument("--pred", help="folder of <id>.png predictions")
    vt.add_argument("--out", help="FILE.tar.gz to write")
    vt.add_argument("--check", help="FILE.tar.gz to check before upload, whoever made it")
    vt.add_argument("--list", help="test ids (default: the voc data root's "
                                   "ImageSets/Segmentation/test.txt)")
    vt.add_argument("--images", help="the test JPEGs, to check each PNG's size")
    vt.add_argument("--force", action="store_true", help="replace an existing --out archive")
    vt.set_defaults(func=_export)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CpfcteError as e:
        print(f"cpfcte: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ncpfcte: interrupted. What was finished is kept (checkpoints, masks); run the "
              "same command again to continue (cpfcte train: with --resume)", file=sys.stderr)
        sys.exit(130)
    except OSError as e:                       # a full disk, a refused permission, a bad path
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"cpfcte: error: {where}{e.strerror or e} (the operating system refused the "
              "operation: check the path, its permissions and the free disk space)",
              file=sys.stderr)
        sys.exit(2)
    finally:             # under torchrun: every rank leaves its process group, done or failed
        if "torch.distributed" in sys.modules:
            from cpfcte.machinery.distributed import shutdown

            shutdown()


if __name__ == "__main__":
    main()
