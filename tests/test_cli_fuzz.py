"""Every subcommand, driven with bad values of every option it has: each must end in a clean
refusal (exit 2 with one message, or argparse's usage error), never a Python traceback.

The options are read from the parser itself (``cpfcte.cli.build_parser``), so an option added
later is driven too; bad values are chosen by the option's type (negative, zero, fractional,
non-numeric, non-finite numbers; empty, missing, wrong-kind paths; unknown choices). Each call
starts from a valid command line for its subcommand over a tiny prepared dataset and trained
run, so the bad value is what the command meets first.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import traceback

import pytest
import yaml

from cpfcte import cli


def _subcommands(parser: argparse.ArgumentParser, prefix=()):
    """(words, subparser) of every leaf subcommand."""
    found = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found = True
            for name, sub in action.choices.items():
                yield from _subcommands(sub, prefix + (name,))
    if not found:
        yield prefix, parser


INT_BAD = ["-1", "0", "x", "1.5", "99999999999999999999"]
FLOAT_BAD = ["nan", "-1", "inf", "x", "0"]


SET_BAD = ["epochs=", "epochs=1.7", "epochs=true", "lr=.nan", "lr=inf", "nokey", "bogus=1",
           "deeplab=3", "k=[1, 2", "crf.iterations=-1"]


def _bad_values(action, tmp_path) -> list[str]:
    if "--set" in action.option_strings:
        return SET_BAD
    if action.choices is not None:
        return ["bogus"]
    if action.type is int:
        return INT_BAD
    if action.type is float:
        return FLOAT_BAD
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("not what you think\n")
    return ["", " ", "/nonexistent/cpfcte/x", str(a_file), str(tmp_path), "../escape"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny toy dataset, a profile of it, a trained run and its pseudo labels."""
    import os

    from conftest import TINY_MODEL, TINY_SPEC

    from cpfcte.data.toy import generate

    root = tmp_path_factory.mktemp("fuzz")
    env = {"CPFCTE_DATA": str(root / "data"), "CPFCTE_RUNS": str(root / "runs"),
           "CPFCTE_OUT": str(root / "out"), "CPFCTE_PROFILES": str(root / "profiles")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    generate(root / "data" / "toy", TINY_SPEC, progress=False)
    (root / "profiles").mkdir()
    profile = {"extends": "toy", "profile": "tiny", **TINY_MODEL, "epochs": 1,
               "warmup_epochs": 0,
               "deeplab": {"backbone": "resnet10t", "backbone_kwargs": {"channels": [8, 8, 16, 16]},
                           "crop": 32, "batch": 2, "iterations": 2, "ckpt_every": 1,
                           "workers": 0}}
    (root / "profiles" / "tiny.yaml").write_text(yaml.safe_dump(profile))
    for argv in (["train", "--profile", "tiny", "--run", "t"],
                 ["pseudo", "--profile", "tiny", "--train-run", "t", "--run", "p",
                  "--split", "train_aug"],
                 ["deeplab", "train", "--profile", "tiny", "--pseudo", "p", "--run", "d"],
                 ["predict", "--profile", "tiny", "--run", "t", "--images",
                  str(root / "data" / "toy" / "JPEGImages"), "--out", str(root / "pred"),
                  "--limit", "2"]):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            cli.main(argv)
    yield root
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _base(words: tuple[str, ...], root) -> list[str]:
    """A valid command line for a subcommand (that finishes quickly)."""
    images = str(root / "data" / "toy" / "JPEGImages")
    toy = str(root / "data" / "toy")
    return {
        ("data", "download"): ["data", "download", "voc", "--to", str(root / "dl")],
        ("data", "prepare"): ["data", "prepare", "folder", "--images", images, "--labels",
                              str(root / "missing.csv"), "--out", str(root / "own")],
        ("data", "verify"): ["data", "verify", "--profile", "tiny"],
        ("train",): ["train", "--profile", "tiny", "--run", "t"],
        ("pseudo",): ["pseudo", "--profile", "tiny", "--train-run", "t", "--run", "p",
                      "--split", "train_aug"],
        ("deeplab", "train"): ["deeplab", "train", "--profile", "tiny", "--pseudo", "p", "--run",
                               "d"],
        ("deeplab", "predict"): ["deeplab", "predict", "--profile", "tiny", "--run", "d"],
        ("eval",): ["eval", "--pred", str(root / "pred" / "labels"), "--gt",
                    f"{toy}/SegmentationClass", "--num-classes", "11"],
        ("paper",): ["paper", "--profile", "tiny", "--dry-run", "--only", "table1"],
        ("report",): ["report", "--profile", "tiny"],
        ("predict",): ["predict", "--profile", "tiny", "--run", "t", "--images", images, "--out",
                       str(root / "pred"), "--limit", "1"],
        ("numerics",): ["numerics", "--diff", str(root / "missing.json")],
        ("release",): ["release", "--profile", "tiny", "t", "--out", str(root / "release")],
        ("export", "voc-test"): ["export", "voc-test", "--pred", str(root / "pred" / "labels"),
                                 "--out", str(root / "x.tar.gz"), "--list",
                                 str(root / "missing.txt")],
    }[words]


def _drive(argv: list[str]) -> str | None:
    """Run ``cpfcte argv``; the traceback of anything but a clean exit, else None."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main(argv)
    except SystemExit as e:
        if e.code not in (0, 1, 2, None):
            return f"exit {e.code}: {err.getvalue()[-500:]}"
        if "Traceback (most recent call last)" in err.getvalue():
            return err.getvalue()[-2000:]
        return None
    except Exception:  # noqa: BLE001 (the point: nothing may escape)
        return traceback.format_exc()[-2000:]
    return None


def test_every_option_of_every_subcommand_refuses_bad_values_without_a_traceback(world,
                                                                                   tmp_path):
    failures = []
    for words, sub in _subcommands(cli.build_parser()):
        base = _base(words, world)
        for action in sub._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            if action.nargs == 0:                     # flags: no value to get wrong
                continue
            option = action.option_strings[-1]
            for bad in _bad_values(action, tmp_path):
                argv = [a for i, a in enumerate(base)
                        if a != option and (i == 0 or base[i - 1] != option)]
                argv += [option, bad]
                problem = _drive(argv)
                if problem:
                    failures.append(f"cpfcte {' '.join(argv)}\n{problem}")
    assert not failures, f"{len(failures)} tracebacks:\n\n" + "\n\n".join(failures[:8])


def _refusal(argv: list[str]) -> str:
    """Run ``cpfcte argv``, which must refuse (exit 2); its message."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
    assert e.value.code == 2, (argv, err.getvalue())
    return err.getvalue()


def test_names_that_become_paths_stay_inside_and_each_refusal_names_its_fix(world,
                                                                          monkeypatch):
    """A split name with '..', a profile given through --set, two inference sizes at once:
    each refused in one message that names the option and what to do; nothing is written
    outside the run folders."""
    for name, sub in (("DATA", "data"), ("RUNS", "runs"), ("OUT", "out"),
                      ("PROFILES", "profiles")):
        monkeypatch.setenv(f"CPFCTE_{name}", str(world / sub))
    before = sorted(p.name for p in world.iterdir())
    msg = _refusal(["pseudo", "--profile", "tiny", "--train-run", "t", "--run", "p2",
                    "--split", "../../escape"])
    assert "plain name" in msg and "pseudo_split" in msg
    msg = _refusal(["train", "--profile", "tiny", "--run", "t3", "--set", "profile=voc"])
    assert "--profile voc" in msg
    msg = _refusal(["pseudo", "--profile", "tiny", "--train-run", "t", "--run", "p3",
                    "--infer-size", "64", "--infer-scale", "2"])
    assert "--infer-size and --infer-scale" in msg
    assert sorted(p.name for p in world.iterdir()) == before
    assert not (world / "runs" / "voc").exists() and not (world / "escape").exists()
    assert not any(world.parent.glob("escape*"))


def test_cluster_options_without_a_cluster_executor_are_refused():
    msg = _refusal(["paper", "--profile", "toy", "--dry-run", "--partition", "gpu"])
    assert "--partition: cluster options" in msg and "--executor slurm" in msg
