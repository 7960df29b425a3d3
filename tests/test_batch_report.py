import json
import os
from pathlib import Path

import nbformat
import pytest

from cpfcte.batch.catalog import load_batch
from cpfcte.batch.runner import run_batch, select
from cpfcte.machinery.errors import CpfcteError
from cpfcte.machinery.io import write_json
from cpfcte.machinery.paths import runs_dir

PARAMS = 'profile = "toy"\nrun_name = "x"\nfail = False\nother = None'


def _notebook(path: Path, code: str, params_src: str = PARAMS) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    params = nbformat.v4.new_code_cell(params_src)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(code)]
    nbformat.write(nb, path)


RUN_DIR = ("from cpfcte.machinery.paths import run_path\n"        # a step's first lines: its run folder
           "d = run_path(profile, run_name)\n"
           "d.mkdir(parents=True, exist_ok=True)\n")


def _batch(nbdir: Path, code: str, runs: str, params_src: str = PARAMS) -> Path:
    """A folder with one notebook ``step.ipynb`` running ``code`` and a batch file whose
    ``runs:`` section is ``runs``; returns the batch file."""
    nbdir.mkdir()
    _notebook(nbdir / "step.ipynb", code, params_src)
    (nbdir / "batches.yaml").write_text("runs:\n" + runs)
    return nbdir / "batches.yaml"


@pytest.fixture
def mini_batch(tmp_path):
    """A batch of three tiny notebooks: a → b, and c which fails on request."""
    code = (RUN_DIR + "n = d / 'count.txt'\n"
            "n.write_text(str(int(n.read_text()) + 1 if n.exists() else 1))\n"
            "(d / 'profile.txt').write_text(profile + ' ' + str(other))\n"
            "assert not fail, 'asked to fail'\n")
    return _batch(
        tmp_path / "nb", code,
        "  a: {notebook: step.ipynb}\n"
        "  b: {notebook: step.ipynb, needs: [a]}\n"
        "  c: {notebook: step.ipynb, params: {fail: true}}\n"
        "  d: {notebook: step.ipynb, needs: [c]}\n"
        "  e: {notebook: step.ipynb, needs: [a], params: {other: a},\n"
        "      profiles: {toy: toy_coco, voc: coco}}\n"
        "  f: {notebook: step.ipynb, profiles: {voc: voc}}\n"
        "  g: {notebook: step.ipynb, needs: [f]}\n"
        "groups:\n  g1: {runs: [b]}\n")


def test_batch_runs_skips_unchanged_and_isolates_failures(mini_batch):
    logs = []
    res = run_batch("toy", batch_path=mini_batch, log=logs.append)
    assert res["a"]["status"] == "done" and res["b"]["status"] == "done"
    assert res["c"]["status"] == "failed" and "asked to fail" in res["c"]["error"]
    assert res["d"] == {"status": "blocked", "needs": ["c"]}
    # profiles: e runs with the toy_coco profile and gets a's folder; f and g are not toy runs
    assert (runs_dir() / "toy" / "e" / "profile.txt").read_text() == "toy_coco toy/a"
    assert res["f"] == res["g"] == {"status": "not applicable"}
    assert not (runs_dir() / "toy" / "f").exists()
    root = runs_dir() / "toy"
    assert (root / "a" / "step.ipynb").exists()                     # executed copy in runs/
    assert json.loads((root / "c" / "run.json").read_text())["status"] == "failed"
    res2 = run_batch("toy", batch_path=mini_batch, log=logs.append)
    assert res2["a"]["action"] == "skipped (unchanged)" and res2["b"]["action"].startswith("skip")
    assert (root / "a" / "count.txt").read_text() == "1"            # not executed again
    assert (root / "c" / "count.txt").read_text() == "2"            # the failed one is retried


def test_an_unfinished_run_is_resumed_and_a_stale_one_cleared(mini_batch):
    run_batch("toy", batch_path=mini_batch, only=["a"], log=lambda *_: None)
    root = runs_dir() / "toy" / "a"
    status = json.loads((root / "run.json").read_text())
    write_json(root / "run.json", {**status, "status": "running"})  # killed midway
    (root / "partial.txt").write_text("kept")
    run_batch("toy", batch_path=mini_batch, only=["a"], log=lambda *_: None)
    assert (root / "count.txt").read_text() == "2" and (root / "partial.txt").exists()
    write_json(root / "run.json", {**status, "stamp": "other-code"})   # made by other code
    run_batch("toy", batch_path=mini_batch, only=["a"], log=lambda *_: None)
    assert (root / "count.txt").read_text() == "1" and not (root / "partial.txt").exists()


def test_select_follows_needs(mini_batch):
    batch = load_batch(mini_batch)
    assert select(batch, ["g1"]) == ["a", "b"]
    assert select(batch, ["d"]) == ["c", "d"]
    with pytest.raises(CpfcteError, match="no such group or run"):
        select(batch, ["table9"])


def test_bad_batch_files_are_refused(tmp_path):
    p = tmp_path / "b.yaml"
    p.write_text("runs:\n  b: {notebook: x.ipynb, needs: [a]}\n")
    with pytest.raises(CpfcteError, match="needs 'a', which is not declared"):
        load_batch(p)
    p.write_text("runs:\n  a: {notebok: x.ipynb}\n")
    with pytest.raises(CpfcteError, match="needs 'notebook'"):
        load_batch(p)


def test_project_batch_declares_table1_and_fig5():
    batch = load_batch()
    assert {"table1", "fig5"} <= set(batch.groups)
    nb_dir = Path(batch.path).parent
    for run in batch.runs.values():
        assert (nb_dir / run.notebook).is_file()


def _metrics(run, miou, **extra):
    write_json(runs_dir() / "toy" / run / "metrics.json",
               {"miou": miou, "iou": [miou], "split": "train", "images": 120, "infer_size": 160,
                "patches_per_side": 20, "config_digest": "abc", **extra})


def test_table1_puts_the_run_beside_the_paper(tmp_path):
    from cpfcte.report import fig5, table1

    _metrics("pseudo_full", 0.5123, baselines={"background": 0.061, "uniform": 0.17})
    md = table1("toy", out_dir=tmp_path)["md"].read_text()
    assert "| CPF-CTE | Ours | ViT-B/16 (paper); ViT, 4 blocks, width 96, patch 8 (this run) | 70.8 | not measured in runs/toy/pseudo_full |" in md
    _metrics("pseudo_full", 0.5123, baselines={"background": 0.061, "uniform": 0.17},
             crf={"miou": 0.5871, "params_text": "Gaussian (sxy 3, compat 3), ..."})
    paths = table1("toy", out_dir=tmp_path)
    md = paths["md"].read_text()
    assert "| CPF-CTE w/o CRF | Ours | ViT-B/16 (paper); ViT, 4 blocks, width 96, patch 8 (this run) | 67.1 | 51.2 |" in md
    assert "| CPF-CTE | Ours | ViT-B/16 (paper); ViT, 4 blocks, width 96, patch 8 (this run) | 70.8 | 58.7 |" in md
    assert "Δ (this − paper)" not in md                 # a toy number is never subtracted
    notes = paths["notes"].read_text()
    assert "CRF (pydensecrf): Gaussian (sxy 3, compat 3)" in notes
    assert "all background | this run | none |  | 6.1 |" in md
    assert "not comparable" in notes and "profile toy" in md
    rows = paths["csv"].read_text().splitlines()
    assert rows[0].startswith("Method,Pub.,Backbone") and len(rows) == 13
    _metrics("pseudo_full_s1", 0.5323, crf={"miou": 0.6071, "params_text": "..."})
    md = table1("toy", out_dir=tmp_path)["md"].read_text()
    assert "| CPF-CTE | Ours | ViT-B/16 (paper); ViT, 4 blocks, width 96, patch 8 (this run) | 70.8 | 59.7 ± 1.4 (n=2) |" in md
    for run, scale_miou, pps in (("pseudo_scale_1.0", 0.3, 8), ("pseudo_scale_2.0", 0.4, 16)):
        write_json(runs_dir() / "toy" / run / "metrics.json", {"miou": scale_miou,
                   "patches_per_side": pps, "infer_size": pps * 8})
    figs = fig5("toy", out_dir=tmp_path)
    assert figs["png"].stat().st_size > 1000 and figs["pdf"].exists()


def test_table1_marks_missing_and_failed_runs(tmp_path):
    from cpfcte.report import table1

    md = table1("toy", out_dir=tmp_path)["md"].read_text()
    assert "| 67.1 | not run (runs/toy/pseudo_full) |" in md
    write_json(runs_dir() / "toy" / "pseudo_full" / "run.json",
               {"status": "failed", "notebook": "03_pseudo_labels.ipynb"})
    md = table1("toy", out_dir=tmp_path)["md"].read_text()
    assert "failed: see" in md and "03_pseudo_labels.ipynb" in md


def _deeplab_metrics(run, miou):
    write_json(runs_dir() / "toy" / run / "metrics.json",
               {"stage": "deeplab", "miou": miou, "iou": [miou], "split": "val", "images": 120,
                "level": "segmentation",
                "backbone": "resnet10t", "parameters": 1364452, "iterations": 500,
                "test_scales": [1.0], "flip": True, "no_crf": {"miou": miou - 0.05},
                "levels": {"single_scale": {"miou": miou - 0.1}, "multi_scale": {"miou": miou - 0.05},
                           "crf": {"miou": miou}},
                "crf_params": "Gaussian (sxy 1, compat 3), …",
                "pseudo_dir": "runs/toy/pseudo_trainaug/crf", "config_digest": "abc"})


def test_tables_2_and_3_from_run_folders(tmp_path):
    from cpfcte.report import table2, table3

    _deeplab_metrics("deeplab_full", 0.5571)
    md = table2("toy", out_dir=tmp_path)["md"].read_text()
    assert "| CPF-CTE (DeepLabv2 + CRF) | Ours | ViT-B/16 (paper); ViT, 4 blocks, width 96, patch 8 (this run) | 69.5 | 55.7 |" in md   # + CRF
    assert "| CPF-CTE: DeepLabv2, single scale | this run | ViT-B/16 (paper); ViT, 4 blocks, width 96, patch 8 (this run) | — | 45.7 |" in md
    assert "| CPF-CTE: DeepLabv2, multi-scale + flip | this run | ViT-B/16 (paper); ViT, 4 blocks, width 96, patch 8 (this run) | — | 50.7 |" in md
    assert md.index("single scale | this") < md.index("multi-scale + flip | this") < md.index(
        "| CPF-CTE (DeepLabv2 + CRF) | Ours")
    assert "| AFA | CVPR22 | ViT-B/16 | 63.8 |  |" in md
    notes = (tmp_path / "table2.notes.md").read_text()                  # the details' home
    assert "1,364,452 parameters" in notes and "test-time CRF: Gaussian (sxy 1" in notes
    assert "1,364,452" not in md and "Interpretation notes" in notes
    assert "table2.notes.md" in md and "\n12. " in notes and "\n12. " not in md
    md = table3("toy", out_dir=tmp_path)["md"].read_text()
    assert ("| CPF-CTE (DeepLabv2 + CRF) | Ours | ViT-B/16 (paper); ViT, 4 blocks, width 96, patch 8 (this run) | 45.4 | not run "
            "(runs/toy/deeplab_coco) |") in md
    _deeplab_metrics("deeplab_coco", 0.4012)
    _metrics("pseudo_coco", 0.3, crf={"miou": 0.4444, "params_text": "..."})
    md = table3("toy", out_dir=tmp_path)["md"].read_text()
    assert "| CPF-CTE (pseudo-label) | Ours | ViT-B/16 (paper); ViT, 4 blocks, width 96, patch 8 (this run) | 41.3 | 44.4 |" in md
    assert "| CPF-CTE (DeepLabv2 + CRF) | Ours | ViT-B/16 (paper); ViT, 4 blocks, width 96, patch 8 (this run) | 45.4 | 40.1 |" in md
    assert "| CPF-CTE: DeepLabv2, multi-scale + flip | this run | ViT-B/16 (paper); ViT, 4 blocks, width 96, patch 8 (this run) | — | 35.1 |" in md
    md = table3("voc", out_dir=tmp_path)["md"].read_text()
    assert "no COCO run exists for this profile: make one with `make paper PROFILE=coco`" in md
    assert (tmp_path / "table3.voc.md").exists() and "45.4" in md


# ---- seeds, parallel runs, plans, kill + resume ------------------------------------------


@pytest.fixture
def seeded_batch(tmp_path):
    code = ("import time\n" + RUN_DIR + "time.sleep(float(sleep))\n"
            "n = d / 'count.txt'\nn.write_text(str(int(n.read_text()) + 1 if n.exists() else 1))\n"
            "(d / 'seed.txt').write_text(str(seed) + ' ' + str(train_run))\n"
            "assert not (d.parent / ('FAIL_' + d.name)).exists(), 'asked to fail'\n")
    return _batch(
        tmp_path / "nb2", code,
        "  train: {notebook: step.ipynb, seeds: {toy: [0, 1, 2], voc: [0]}}\n"
        "  pseudo: {notebook: step.ipynb, needs: [train], params: {train_run: train},\n"
        "           seeds: {toy: [0, 1, 2], voc: [0]}}\n"
        "  summary: {notebook: step.ipynb, needs: [pseudo], params: {sleep: 3}}\n"
        "groups:\n  t: {runs: [pseudo]}\n",
        params_src='profile = "toy"\nrun_name = "x"\nseed = None\ntrain_run = None\nsleep = 0')


def test_seeds_expand_and_follow_their_needs(seeded_batch):
    from cpfcte.batch.catalog import expand

    runs, _ = expand(load_batch(seeded_batch), "toy")
    assert list(runs) == ["train", "train_s1", "train_s2", "pseudo", "pseudo_s1", "pseudo_s2",
                          "summary"]
    assert runs["pseudo_s2"].needs == ["train_s2"] and runs["pseudo_s2"].params["seed"] == 2
    assert runs["summary"].needs == ["pseudo", "pseudo_s1", "pseudo_s2"]
    assert list(expand(load_batch(seeded_batch), "voc")[0]) == ["train", "pseudo", "summary"]
    res = run_batch("toy", batch_path=seeded_batch, only=["t"], jobs=2, log=lambda *_: None)
    assert all(r["status"] == "done" for r in res.values()) and len(res) == 6
    assert (runs_dir() / "toy" / "pseudo_s2" / "seed.txt").read_text() == "2 toy/train_s2"


def test_dry_run_plans_without_executing(seeded_batch, capsys):
    from cpfcte.batch.plan import print_plan

    res = run_batch("toy", batch_path=seeded_batch, dry_run=True, log=lambda *_: None)
    assert all(r.get("dry_run") for r in res.values()) and len(res) == 7
    assert not (runs_dir() / "toy").exists()
    out = capsys.readouterr().out
    res = run_batch("voc", dry_run=True, log=lambda *_: None)       # the project's own batch
    total = print_plan("voc", res)
    out = capsys.readouterr().out
    assert "deeplab_full" in out and "reference figures of an earlier H200 run" in out
    # 10 stage-1 trainings of 50 epochs × 10,582 images at 777 img/s alone take 1.9 h
    assert 5 < total / 3600 < 20 and not (runs_dir() / "voc").exists()


def test_killed_batch_resumes_without_redoing_finished_runs(seeded_batch):
    import signal
    import subprocess
    import sys
    import time

    code = ("from cpfcte.batch.runner import run_batch; "
            f"run_batch('toy', batch_path={str(seeded_batch)!r}, log=print)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    summary = runs_dir() / "toy" / "summary" / "run.json"
    deadline = time.time() + 120
    while time.time() < deadline and not summary.exists():
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)                 # the batch and its kernel, midway
    proc.wait()
    assert json.loads(summary.read_text())["status"] == "running"
    counts = {r: (runs_dir() / "toy" / r / "count.txt").read_text() for r in
              ("train", "train_s2", "pseudo_s1")}
    res = run_batch("toy", batch_path=seeded_batch, log=lambda *_: None)
    assert res["summary"]["status"] == "done"
    assert all(res[r].get("action") == "skipped (unchanged)" for r in counts)
    assert counts == {r: (runs_dir() / "toy" / r / "count.txt").read_text() for r in counts}


def test_every_table_and_figure_of_the_paper_has_a_batch_entry():
    from cpfcte.batch.catalog import group_runs

    batch = load_batch()
    assert {f"table{i}" for i in range(1, 6)} | {f"fig{i}" for i in range(4, 8)} <= set(batch.groups)
    for name, group in batch.groups.items():
        assert group_runs(group), name
        assert all(r in batch.runs for r in group_runs(group)), name
        assert group.get("level"), name                # each group says how it is scored


def test_tables_4_and_5_mean_std_missing_failed_and_provenance(tmp_path):
    from cpfcte.report import table4, table5

    def pseudo(run, crf, seed=0):
        train = runs_dir() / "toy" / f"train_of_{run}"
        alive = run.startswith("pseudo_full") and seed != 1          # seed 1's tokens idle
        write_json(train / "summary.json", {"mechanisms": {
            "alive": alive, "max_weight": 0.8 if alive else 0.094, "uniform_weight": 1 / 11,
            "swap_changed": 0.02 if alive else 0.0, "label_map": 0.5}})
        write_json(runs_dir() / "toy" / run / "metrics.json",
                   {"miou": crf - 0.05, "crf": {"miou": crf}, "iou": [crf],
                    "config_digest": "d" + run, "train_run": str(train)})
        write_json(runs_dir() / "toy" / run / "run.json",
                   {"status": "done", "seconds": 60, "hardware": "x86_64 2 cores, no GPU",
                    "params": {"seed": seed, "profile": "toy"}, "notebook": "03_pseudo_labels.ipynb"})

    for run, vals in (("pseudo_base", (0.60, 0.62, 0.64)), ("pseudo_full", (0.70, 0.73, 0.74))):
        for seed, v in enumerate(vals):
            pseudo(run if seed == 0 else f"{run}_s{seed}", v, seed)
    pseudo("pseudo_tokens", 0.66)                                    # one seed only
    write_json(runs_dir() / "toy" / "pseudo_lstm" / "run.json",
               {"status": "failed", "notebook": "03_pseudo_labels.ipynb"})
    paths = table4("toy", out_dir=tmp_path)
    md = paths["md"].read_text()
    assert "| ✓ |  |  | 65.2 | reference | 62.0 ± 2.0 (n=3) | reference | no tokens |" in md
    # paired by seed: differences 10, 11, 10 → mean 10.33, t(0.975, 2) = 4.303, half-width
    # 4.303 · 0.577 / √3 = 1.43: [8.9, 11.8], which excludes zero (*)
    assert ("| ✓ | ✓ | ✓ | 69.5 | +4.3 | 72.3 ± 2.1 (n=3) | +10.3 [+8.9, +11.8] * (n=3) | "
            "2 of 3 seeds |") in md
    assert "| ✓ | ✓ |  | 67.1 | +1.9 | 66.0 | +6.0 (n=1, no interval) | 0 of 1 seeds |" in md
    assert "Δ (this − paper)" not in md
    assert "failed: see runs/toy/pseudo_lstm/03_pseudo_labels.ipynb" in md
    assert "level: pseudo-label" in md and "seeds [0, 1, 2]" in md
    assert "code " in md and "dataset " in md and "numerics —" in md    # none recorded
    assert len([line for line in md.splitlines() if line.startswith("- ")]) == 2
    notes = paths["notes"].read_text()                      # the full provenance
    assert "hardware x86_64 2 cores, no GPU" in notes and "config dpseudo_base" in notes
    assert ("CPF-CTE: seed 0: alive (largest weight 0.80 (uniform 0.09), swap changes 2.0 % of "
            "BPM labels; label mAP 0.50); seed 1: NOT alive") in notes
    assert "run time 7.0 min" in notes and "95 % confidence interval" in notes
    tex = paths["tex"].read_text()
    assert r"\begin{tabular}" in tex and r"$\pm$" in tex and r"\checkmark" in tex
    md5 = table5("toy", out_dir=tmp_path)["md"].read_text()
    assert "| ✓ |  |  | 67.7 | -1.8 | not run (runs/toy/pseudo_gap) |  |" in md5
    from cpfcte.report.results import mechanism_table  # notebook 05's table of note 23

    write_json(runs_dir() / "toy" / "deeplab_x" / "metrics.json",    # reads through pseudo_dir
               {"miou": 0.7, "pseudo_dir": str(runs_dir() / "toy" / "pseudo_full" / "labels")})
    mt = mechanism_table("toy", {"CPF-CTE": "pseudo_full", "DeepLab": "deeplab_x",
                                 "absent": "pseudo_nope"})
    assert "| CPF-CTE | 0 | alive | 0.800 (0.091) | 2.00 % | 0.500 |" in mt
    assert "| CPF-CTE | 1 | NOT alive | 0.094 (0.091) | 0.00 % | 0.500 |" in mt
    assert "| DeepLab | 0 | alive | 0.800 (0.091) |" in mt
    assert "| absent | 0 | not measured |" in mt and len(mt.splitlines()) == 2 + 3 + 1 + 1
    assert "|  |  | ✓ | 69.5 | reference | 72.3 ± 2.1 (n=3) | reference |" in md5


# ---- the catalog: report runs wait for what their tables and figures read ----------------


def _closure(runs, name):
    seen, stack = set(), list(runs[name].needs)
    while stack:
        need = stack.pop()
        if need not in seen:
            seen.add(need)
            stack += runs[need].needs
    return seen


@pytest.mark.parametrize("profile", ["toy", "voc", "coco"])
def test_every_report_run_waits_for_every_run_its_tables_and_figures_read(profile, monkeypatch):
    """Record which runs the report functions actually read while drawing a report run's
    tables and figures: each must be among that run's (transitive) needs. The paper run once
    did not wait for deeplab_coco and showed Table 3 as "not run"."""
    from cpfcte import report
    from cpfcte.batch import catalog

    runs, _ = catalog.expand(catalog.load_batch(), profile)
    read: list[str] = []
    real_metrics, real_status = catalog.run_metrics, catalog.run_status
    monkeypatch.setattr(catalog, "run_metrics",
                        lambda p, run: (read.append(run), real_metrics(p, run))[1])
    monkeypatch.setattr(catalog, "run_status",
                        lambda folder: (read.append(folder.name), real_status(folder))[1])
    report_runs = [n for n, r in runs.items() if r.reports is not None]
    assert "paper" in report_runs
    for name in report_runs:
        read.clear()
        report.write(profile, runs[name].params["reports"])
        wanted = {r for r in read if r in runs}             # runs outside the profile never come
        missing = wanted - _closure(runs, name)
        assert not missing, f"{profile}: report run {name!r} reads {sorted(missing)} unawaited"
        assert wanted, name
    toy_paper = catalog.expand(catalog.load_batch(), "toy")[0]["paper"]
    assert "deeplab_coco" in toy_paper.needs


def test_a_group_read_below_its_report_run_is_refused(tmp_path):
    p = tmp_path / "b.yaml"
    p.write_text("runs:\n  r: {notebook: x.ipynb, reports: [t]}\n  a: {notebook: x.ipynb}\n"
                 "groups:\n  t: {runs: [a]}\n")
    with pytest.raises(CpfcteError, match="reads 'a', declared below it"):
        load_batch(p)
    p.write_text("runs:\n  r: {notebook: x.ipynb, reports: [nope]}\ngroups: {}\n")
    with pytest.raises(CpfcteError, match="reports 'nope', which is not a group"):
        load_batch(p)


def test_tables_4_and_5_match_the_papers_rows_by_label(tmp_path, monkeypatch):
    """A batch whose rows are in another order still puts each value on its paper row; a
    missing row is an error naming it."""
    from cpfcte.batch import catalog
    from cpfcte.report import table5

    write_json(runs_dir() / "toy" / "pseudo_gap" / "metrics.json",
               {"miou": 0.1, "crf": {"miou": 0.111}, "iou": [0.1]})
    batch = catalog.load_batch()
    rows = batch.groups["table5"]["rows"]
    batch.groups["table5"]["rows"] = dict(reversed(list(rows.items())))
    monkeypatch.setattr(catalog, "load_batch", lambda path=None: batch)
    md = table5("toy", out_dir=tmp_path)["md"].read_text()
    assert "| ✓ |  |  | 67.7 | -1.8 | 11.1 |  |" in md
    del batch.groups["table5"]["rows"]["gmp"]
    with pytest.raises(CpfcteError, match="group 'table5' has no row 'gmp'"):
        table5("toy", out_dir=tmp_path)


def test_the_dry_run_plan_is_keyed_by_stage(capsys):
    from cpfcte.batch.plan import estimate_seconds, throughputs

    res = run_batch("voc", dry_run=True, log=lambda *_: None)
    stages = {r["stage"] for r in res.values() if r.get("dry_run")}
    assert {"train", "pseudo", "deeplab", "report"} <= stages
    tp = throughputs()
    # 50 epochs × 10,582 images at 777 img/s; a report run costs no GPU time
    # 2 warm-up epochs with the ViT frozen (1/3 of a full step), 48 training its last 5 of 12
    # blocks ((1 + 2·5/12)/3 of one)
    assert estimate_seconds("train", "voc", {}, tp) == pytest.approx(
        10582 / 777 * (2 / 3 + 48 * (1 + 2 * 5 / 12) / 3))
    assert estimate_seconds("report", "voc", {}, tp) == 0.0
    # a loader slower than the step binds: 200 img/s is slower than 777 even for a warm-up step
    assert estimate_seconds("train", "voc", {}, {**tp, "loader_img_s": 200.0}) == \
        pytest.approx(10582 * 50 / 200)
    # DeepLabv2: 20,000 iterations of 10 at 231 img/s, MSC inside the measured figure (not
    # counted again), plus 1,449 val images × 1.75 of the pixels (MSC max) at 4× the training
    # rate, plus their CRF at 0.75 s per image per core on 16 cores
    assert estimate_seconds("deeplab", "voc", {}, tp) == pytest.approx(
        20000 * 10 / 231 + 1449 * 1.75 / (4 * 231) + 1449 * 0.75 / 16)


def test_the_check_names_each_cell_that_differs_from_the_committed_table():
    from cpfcte.report.check import compare

    committed = ("Method,Pub.,Backbone,mIoU paper (%),mIoU this run (%)\n"
                 "A,X,ViT,60.0,51.2 ± 1.0 (n=3)\nB,Y,ViT,61.0,55.0\n")
    same = compare("t", committed, committed)
    assert (same.compared, same.equal, same.differ, same.missing) == (4, 4, [], [])
    here = committed.replace("51.2 ± 1.0", "51.5 ± 0.9")
    result = compare("t", committed, here)
    assert result.compared == 4 and result.equal == 3 and len(result.differ) == 1
    assert str(result.differ[0]) == ("t, row 'A X ViT', column 'mIoU this run (%)': committed "
                                     "'51.2 ± 1.0 (n=3)', this machine '51.5 ± 0.9 (n=3)' "
                                     "(Δ +0.3)")
    result = compare("t", committed, committed.replace("B,Y", "C,Y"))
    assert {d.committed for d in result.differ} == {"(no such row)", "(row)"}
    ablation = ("Original framework,Class tokens,CF-BiLSTM,mIoU paper (%),mIoU this run (%)\n"
                "✓,✓,,67.1,78.3\n✓,,✓,67.8,71.5\n")
    result = compare("t", ablation, ablation.replace("71.5", "72.0"))
    assert [d.row for d in result.differ] == ["Original framework + CF-BiLSTM"]  # not ✓ ✓
    # a cell whose run is not here (a partial batch) is not compared, and is counted apart
    partial = compare("t", ablation, ablation.replace("71.5", "not run (runs/toy/x)"))
    assert (partial.compared, partial.equal, len(partial.differ), len(partial.missing)) == \
        (3, 3, 0, 1)


def _committed_repo(tmp_path, monkeypatch, text):
    import subprocess

    from cpfcte.report import check as chk

    repo = tmp_path / "repo"
    (repo / "tables").mkdir(parents=True)
    (repo / "tables" / "table1.csv").write_text(text)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.email=a@b", "-c", "user.name=n", "add", "."], cwd=repo,
                   check=True)
    subprocess.run(["git", "-c", "user.email=a@b", "-c", "user.name=n", "commit", "-qm", "t"],
                   cwd=repo, check=True)
    monkeypatch.setattr(chk, "project_root", lambda: repo)
    monkeypatch.setenv("CPFCTE_OUT", str(repo))
    return repo


def test_check_against_git_head(tmp_path, monkeypatch):
    from cpfcte.report import check as chk
    from cpfcte.report import record_written

    repo = _committed_repo(tmp_path, monkeypatch, "Method,mIoU this run\nA,50.0\nB,40.0\n")
    table = repo / "tables" / "table1.csv"
    # a fresh clone: the committed table, no run here: nothing compared, never "reproduced"
    ok, lines = chk.check("toy")
    assert not ok and lines[0].startswith("nothing to compare")
    assert "table1: not regenerated on this machine" in lines[1]
    record_written("table1", "toy", {"csv": table})          # as the report does
    ok, lines = chk.check("toy")
    assert ok and lines[0].startswith("reproduced where compared, partly: 1 of 5 tables")
    assert lines[1] == "table1: 2 cells compared, 2 equal, 0 differ"
    assert "table2: no committed reference" in lines[2]
    table.write_text("Method,mIoU this run\nA,50.4\nB,not run (runs/toy/b)\n")
    ok, lines = chk.check("toy")                              # edited after the report: not ours
    assert not ok and lines[0].startswith("nothing to compare")
    record_written("table1", "toy", {"csv": table})
    ok, lines = chk.check("toy")
    assert not ok and lines[0].startswith("NOT reproduced: 1 of 5 tables regenerated here; "
                                          "1 cells compared, 0 equal, 1 differ, 1 not "
                                          "compared")
    assert lines[1] == "table1: 1 cells compared, 0 equal, 1 differ, 1 not compared (their " \
                       "runs are not here)"
    assert "(Δ +0.4)" in lines[2] and lines[3].startswith("  not run here:")
    monkeypatch.setattr(chk, "project_root", lambda: tmp_path)      # no git clone
    with pytest.raises(CpfcteError, match="not a git clone"):
        chk.check("toy")


def test_the_longest_chain_of_work_is_launched_first():
    from cpfcte.batch.catalog import Run
    from cpfcte.batch.runner import critical_path

    runs = {"t1": Run("t1", "x", stage="train"), "t2": Run("t2", "x", stage="train"),
            "p1": Run("p1", "x", needs=["t1"], stage="pseudo"),
            "d1": Run("d1", "x", needs=["p1"], stage="deeplab")}
    path = critical_path(runs, ["t2", "t1", "p1", "d1"])
    assert path == {"d1": 100.0, "p1": 106.0, "t1": 131.0, "t2": 25.0}
    assert sorted(["t2", "t1"], key=lambda n: -path[n]) == ["t1", "t2"]


def test_saved_figures_are_byte_identical(tmp_path):
    """The committed figures are compared across machines: a PDF must not carry its
    creation time (matplotlib writes one by default)."""
    import time

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cpfcte.plots import save_figure

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    for ext in ("pdf", "png"):
        a = save_figure(fig, tmp_path / f"a.{ext}").read_bytes()
        time.sleep(1.1)
        b = save_figure(fig, tmp_path / f"b.{ext}").read_bytes()
        assert a == b, ext
    plt.close(fig)


def test_runs_share_a_warm_kernel_with_a_cleared_namespace(tmp_path):
    """On the local executor a worker's kernel is reused: the second run finds no variable of
    the first, a failed run's kernel is replaced, and no kernel outlives the batch."""
    code = ("import os\n" + RUN_DIR +
            "(d / 'seen.txt').write_text(f\"{os.getpid()} {'leftover' in globals()}\")\n"
            "leftover = 1\n"
            "assert not fail, 'asked to fail'\n")
    batch = _batch(tmp_path / "nb", code,
                   "  a: {notebook: step.ipynb}\n"
                   "  b: {notebook: step.ipynb, needs: [a]}\n"
                   "  c: {notebook: step.ipynb, needs: [b], params: {fail: true}}\n"
                   "  d: {notebook: step.ipynb, needs: [b]}\n")
    res = run_batch("toy", batch_path=batch, log=lambda *_: None)
    assert [res[n]["status"] for n in "abcd"] == ["done", "done", "failed", "done"]
    seen = {n: (runs_dir() / "toy" / n / "seen.txt").read_text().split() for n in "abcd"}
    assert all(s[1] == "False" for s in seen.values())       # a cleared namespace every time
    assert seen["a"][0] == seen["b"][0] == seen["c"][0]       # one warm kernel ...
    assert seen["d"][0] != seen["c"][0]                       # ... replaced after a failure
    for pid in {s[0] for s in seen.values()}:                 # none outlives the batch
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/status").read_text().count("zombie")


def test_batch_kernels_talk_over_ipc_and_print_no_tcp_warning(tmp_path):
    """The batch's kernels (warm or papermill's own) use IPC sockets in a private folder: no
    "Kernel is running over TCP without encryption" per kernel, and the folder goes with the
    kernel."""
    import subprocess
    import sys

    code = (
        "import glob, tempfile\n"
        "from pathlib import Path\n"
        "from cpfcte.batch.runner import WarmKernels\n"
        "k = WarmKernels(Path('.'))\n"
        "km, kc = k.acquire()\n"
        "assert km.transport == 'ipc', km.transport\n"
        "folder = Path(km.ip).parent\n"
        "assert folder.is_dir()\n"
        "r = kc.execute_interactive('1 + 1', timeout=60, output_hook=lambda m: None)\n"
        "assert r['content']['status'] == 'ok'\n"
        "k.release(kc)\n"
        "k.close()\n"
        "assert not folder.exists(), folder\n"
        "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=180, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr
    assert "TCP" not in done.stderr, done.stderr


def test_random_weights_on_a_paper_scale_profile_are_said_in_the_table_itself(tmp_path,
                                                                              monkeypatch):
    from cpfcte.report import provenance, table1

    write_json(runs_dir() / "voc" / "pseudo_full" / "metrics.json",
               {"miou": 0.3, "crf": {"miou": 0.4, "params_text": "..."}, "iou": [0.3],
                "split": "train", "images": 4, "infer_size": 960, "patches_per_side": 60})
    monkeypatch.setattr(provenance, "_init_stamps", lambda run_dir: {"stage 1: random init"})
    md = table1("voc", out_dir=tmp_path)["md"].read_text()
    assert "\n- RANDOM INIT: these runs start from random weights" in md    # not only in notes
    assert "random init" in (tmp_path / "table1.voc.notes.md").read_text()
    monkeypatch.setattr(provenance, "_init_stamps", lambda run_dir: {"stage 1: timm"})
    assert "RANDOM INIT" not in table1("voc", out_dir=tmp_path)["md"].read_text()


def test_a_report_without_runs_leaves_the_tables_as_they_are(tmp_path, monkeypatch, capsys):
    """On a fresh clone `cpfcte report` (and notebook 07) finds no run: it writes nothing, so
    the committed tables and figures stay; with the runs of one table, only that one."""
    from cpfcte.cli import main
    from cpfcte.report import has_runs, write

    out = tmp_path / "out"
    monkeypatch.setenv("CPFCTE_OUT", str(out))
    (out / "tables").mkdir(parents=True)
    committed = out / "tables" / "table1.md"
    committed.write_text("the committed table\n")
    main(["report", "--profile", "toy"])
    assert "nothing written" in capsys.readouterr().out
    assert committed.read_text() == "the committed table\n"
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["table1.md"]
    assert not has_runs("table1", "toy") and write("toy") == {}


def test_a_report_with_some_of_a_tables_runs_keeps_the_committed_table(tmp_path, monkeypatch):
    """One of Table 1's runs made (notebook 03 alone, say): the report does not replace the
    committed table by one whose other cells say 'not run'; it names what is missing."""
    from cpfcte.machinery.io import write_json
    from cpfcte.machinery.paths import runs_dir
    from cpfcte.report import missing_runs, write

    out = tmp_path / "out"
    monkeypatch.setenv("CPFCTE_OUT", str(out))
    (out / "tables").mkdir(parents=True)
    (out / "tables" / "table1.md").write_text("the committed table\n")
    before = missing_runs("table1", "toy")
    write_json(runs_dir() / "toy" / "pseudo_full" / "metrics.json",
               {"miou": 0.3, "crf": {"miou": 0.4, "params_text": "..."}, "iou": [0.3],
                "split": "train", "images": 4, "infer_size": 64, "patches_per_side": 8})
    after = missing_runs("table1", "toy")
    assert "pseudo_full" in before and "pseudo_full" not in after and after
    assert write("toy", "table1") == {}
    assert (out / "tables" / "table1.md").read_text() == "the committed table\n"


def test_paper_only_writes_the_groups_it_ran():
    from cpfcte.report import ARTIFACTS, artifacts_for

    assert artifacts_for(None, "toy") == list(ARTIFACTS)
    assert artifacts_for(["table1"], "toy") == ["table1"]
    assert artifacts_for(["table2", "fig5"], "toy") == ["table2", "fig5"]
    # a run: the tables and figures that read it (a seed's name reads as its run's)
    assert set(artifacts_for(["pseudo_gap_s1"], "toy")) == {"table5"}
    assert {"table1", "table4", "table5", "fig7"} <= set(artifacts_for(["pseudo_full"], "toy"))
    assert "table2" not in artifacts_for(["pseudo_full"], "toy")


def test_the_default_jobs_follow_cores_and_memory(monkeypatch):
    from cpfcte.batch import runner

    monkeypatch.setattr(runner.os, "sched_getaffinity", lambda pid: set(range(8)))
    assert runner.default_jobs("voc") == 1                     # the runs share one GPU
    assert 1 <= runner.default_jobs("toy") <= 8
    real_open = open

    def meminfo(gigabytes):
        def fake_open(path, *a, **k):
            if path == "/proc/meminfo":
                import io
                return io.StringIO(f"MemTotal: 1 kB\nMemAvailable: {gigabytes * 2**20} kB\n")
            return real_open(path, *a, **k)
        return fake_open

    monkeypatch.setattr("builtins.open", meminfo(64))
    assert runner.default_jobs("toy") == 8                     # every core
    monkeypatch.setattr("builtins.open", meminfo(3))
    assert runner.default_jobs("toy") == 2                     # 3 GB: two kernels of 1.1 GB
    monkeypatch.setattr("builtins.open", meminfo(0))
    assert runner.default_jobs("toy") == 1
