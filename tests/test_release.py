"""Release bundles (``cpfcte release``) and every stage started from one, over a local HTTP
server on 127.0.0.1: the bundle describes its run, each file is checked against the manifest,
and predictions from a bundle are bit-identical to those of the run it was made from."""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest
import torch
import yaml

from cpfcte.machinery.errors import CpfcteError
from tests.test_deeplab import TINY_DL


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def made(tmp_path_factory, toy_root):
    """A tiny training run, its pseudo labels of train_aug (the split DeepLabv2 trains on) and
    a DeepLabv2 run on them, each complete."""
    from cpfcte.machinery.config import load_config
    from cpfcte.machinery.runfolder import run_config
    from cpfcte.stages.deeplab_predict import deeplab_stage
    from cpfcte.stages.pseudo_labels import pseudo_stage
    from cpfcte.stages.train import train
    from tests.conftest import TINY_MODEL

    root = tmp_path_factory.mktemp("release") / "toy"
    cfg = load_config("toy", {"data_root": str(toy_root), **TINY_MODEL, "epochs": 2,
                              "crf": {"workers": 1, "iterations": 2}, **TINY_DL})
    train(cfg, root / "train_x", progress=False)
    pseudo_stage(run_config(root / "train_x", {"pseudo_split": "train_aug"}), root / "train_x",
                 root / "pseudo_x", baselines=False, progress=False)
    deeplab_stage(run_config(root / "pseudo_x"), root / "pseudo_x", root / "deeplab_x",
                  progress=False)
    return root


@pytest.fixture
def released(made, tmp_path, capsys):
    from cpfcte.cli import main

    out = tmp_path / "rel"
    main(["release", str(made / "train_x"), str(made / "pseudo_x"), str(made / "deeplab_x"),
          "--out", str(out), "--url", "https://example.org/cpfcte/v1"])
    assert _json_out(capsys)["zoo"] == str(out / "zoo.yaml")
    return out


def _json_out(capsys) -> dict:
    """The JSON object a command printed last (after its one-line messages)."""
    text = "\n" + capsys.readouterr().out
    return json.loads(text[text.rindex("\n{\n") + 1:])


class _Server:
    """The release folder over HTTP on 127.0.0.1, counting the requests per path."""

    def __init__(self, folder: Path):
        seen = self.seen = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(folder), **kw)

            def log_message(self, *a):
                pass

            def do_GET(self):
                seen.append(self.path)
                super().do_GET()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def server(released):
    s = _Server(released)
    yield s
    s.close()


def test_a_bundle_describes_its_run_and_its_manifest_holds(made, released):
    from safetensors import safe_open

    bundles = {p.name: p for p in released.iterdir() if p.is_dir()}
    assert set(bundles) == {"toy-train_x", "toy-pseudo_x", "toy-deeplab_x"}
    for bundle in bundles.values():
        lines = (bundle / "MANIFEST.sha256").read_text().splitlines()
        listed = {line.split("  ")[1]: line.split("  ")[0] for line in lines}
        assert set(listed) == {p.name for p in bundle.iterdir()} - {"MANIFEST.sha256"}
        assert all(_sha(bundle / n) == h for n, h in listed.items())
        if shutil.which("sha256sum"):                 # the format coreutils checks
            subprocess.run(["sha256sum", "--quiet", "-c", "MANIFEST.sha256"], cwd=bundle,
                           check=True)
        info = json.loads((bundle / "bundle.json").read_text())
        assert info["profile"] == "toy" and info["classes"][0] == "background"
        assert info["commit"] != "not recorded"            # runs now record their commit
        card = (bundle / "README.md").read_text()
        for part in ("## Data", "## Recipe", "## Numbers", "## Provenance", "## Licence",
                     "Toy profile", info["commit"]):
            assert part in card
        assert json.loads((bundle / "config.json").read_text()) == json.loads(
            (made / bundle.name[4:] / "config.json").read_text())     # the resolved config
    # weights: the checkpoint's tensors, bit for bit, and its progress in the metadata
    for run, key in (("train_x", "epoch"), ("deeplab_x", "iteration")):
        state = torch.load(made / run / "checkpoint.pt", weights_only=True)
        with safe_open(str(bundles[f"toy-{run}"] / "weights.safetensors"), "pt") as fh:
            assert set(fh.keys()) == set(state["model"])
            assert all(torch.equal(fh.get_tensor(k), v) for k, v in state["model"].items())
            meta = json.loads(fh.metadata()["cpfcte"])
        assert meta[key] == state[key] and meta["digest"] == state["digest"]
    # every number labelled with its split, level and init
    dl = json.loads((bundles["toy-deeplab_x"] / "metrics.json").read_text())
    assert [n["level"] for n in dl["numbers"]] == [
        "DeepLabv2, single scale", "DeepLabv2, multi-scale + flip",
        "DeepLabv2, multi-scale + flip + dense CRF"]
    run_m = json.loads((made / "deeplab_x" / "metrics.json").read_text())
    assert dl["numbers"][-1]["value"] == run_m["miou"]
    assert {n["split"] for n in dl["numbers"]} == {"val"}
    assert all(n["init"].startswith("stage 1: random init") for n in dl["numbers"])
    ps = json.loads((bundles["toy-pseudo_x"] / "metrics.json").read_text())
    assert [(n["level"], n["split"]) for n in ps["numbers"]] == [("BPM", "train_aug"),
                                                                 ("BPM + CRF", "train_aug")]
    # the pseudo labels: every BPM and CRF PNG, and nothing else
    with tarfile.open(bundles["toy-pseudo_x"] / "pseudo_labels.tar.gz") as tar:
        names = sorted(tar.getnames())
    assert names == sorted(f"{d.name}/{p.name}" for d in (made / "pseudo_x").iterdir()
                           if d.is_dir() and d.name.startswith(("bpm_", "crf_"))
                           for p in d.glob("*.png"))
    # the zoo: one entry per bundle, each file's hash, the URL
    zoo = {m["name"]: m for m in yaml.safe_load((released / "zoo.yaml").read_text())["models"]}
    assert set(zoo) == set(bundles)
    entry = zoo["toy-deeplab_x"]
    assert entry["url"] == "https://example.org/cpfcte/v1/toy-deeplab_x/"
    assert entry["files"]["weights.safetensors"] == _sha(bundles["toy-deeplab_x"] /
                                                         "weights.safetensors")
    assert [m["percent"] for m in entry["metrics"]] == [round(100 * n["value"], 1)
                                                        for n in dl["numbers"]]
    assert entry["wall_seconds"] > 0 and entry["peak_memory_mib"]["host"] > 0
    assert (bundles["toy-train_x"] / "threshold.json").is_file()     # calibrated on release


def test_a_release_is_the_same_bytes_again(made, released, tmp_path):
    from cpfcte.report.release import release

    release([made / "pseudo_x", made / "deeplab_x"], tmp_path / "again", profile="toy",
            url="https://example.org/cpfcte/v1")
    for bundle in ("toy-pseudo_x", "toy-deeplab_x"):
        assert ((tmp_path / "again" / bundle / "MANIFEST.sha256").read_text()
                == (released / bundle / "MANIFEST.sha256").read_text())
    release([made / "deeplab_x"], released, profile="toy")   # again into the same folder
    zoo = yaml.safe_load((released / "zoo.yaml").read_text())["models"]
    assert [m["name"] for m in zoo] == ["toy-train_x", "toy-pseudo_x", "toy-deeplab_x"]
    assert zoo[2]["url"] is None                               # this release gave no URL


def test_stages_start_from_a_bundle_over_http_and_predict_the_same_bits(made, server,
                                                                         tmp_path, capsys):
    from cpfcte.cli import main

    images = tmp_path / "photos"
    images.mkdir()
    toy = Path(json.loads((made / "train_x" / "config.json").read_text())["config"]["data_root"])
    for jpg in sorted((toy / "JPEGImages").glob("*.jpg"))[:3]:
        shutil.copy(jpg, images / jpg.name)
    for run in ("train_x", "deeplab_x"):         # predict: a run, and its bundle over HTTP
        capsys.readouterr()
        main(["predict", "--run", str(made / run), "--images", str(images),
              "--out", str(tmp_path / f"{run}_run")])
        main(["predict", "--run", f"{server.url}/toy-{run}/", "--images", str(images),
              "--out", str(tmp_path / f"{run}_bundle")])
        for png in (tmp_path / f"{run}_run" / "labels").glob("*.png"):
            assert png.read_bytes() == (tmp_path / f"{run}_bundle" / "labels" /
                                        png.name).read_bytes()
    # deeplab predict from the bundle: the run's val predictions, bit for bit
    capsys.readouterr()
    main(["deeplab", "predict", "--run", f"{server.url}/toy-deeplab_x"])
    out = _json_out(capsys)
    assert out["miou"] == json.loads((made / "deeplab_x" / "metrics.json").read_text())["miou"]
    for sub in ("pred", "pred_crf", "pred_ss"):
        mine = sorted((made / "deeplab_x" / "val" / sub).glob("*.png"))
        assert mine and all(p.read_bytes() == (Path(out["pred_dir"]).parent / sub /
                                               p.name).read_bytes() for p in mine)
    # pseudo labels from a training bundle: the run's BPMs, bit for bit
    main(["pseudo", "--train-run", f"{server.url}/toy-train_x/MANIFEST.sha256", "--run", "p",
          "--split", "train_aug"])
    bpm = Path(_json_out(capsys)["bpm_dir"])
    mine = sorted((made / "pseudo_x" / bpm.name).glob("*.png"))
    assert mine and all(p.read_bytes() == (bpm / p.name).read_bytes() for p in mine)
    # DeepLabv2 from a pseudo-label bundle: its config is the base, its labels the input
    main(["deeplab", "train", "--pseudo", f"{server.url}/toy-pseudo_x/", "--run", "d",
          "--max-iterations", "1"])
    record = json.loads((tmp_path / "runs" / "toy" / "d" / "config.json").read_text())
    assert "/bundles/toy-pseudo_x-" in record["pseudo_dir"]
    assert record["config"]["deeplab"]["backbone"] == "resnet10t"
    # a second use fetches only the manifest: the files come from the sha256 cache
    before = len(server.seen)
    main(["predict", "--run", f"{server.url}/toy-train_x/", "--images", str(images),
          "--out", str(tmp_path / "again")])
    assert server.seen[before:] == ["/toy-train_x/MANIFEST.sha256"]


def test_a_changed_file_is_refused_naming_it_and_both_hashes(released, server, tmp_path):
    from cpfcte.stages.bundle import open_bundle

    weights = released / "toy-train_x" / "weights.safetensors"
    want = _sha(weights)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(CpfcteError) as e:
        open_bundle(f"{server.url}/toy-train_x/", "toy", progress=False)
    assert "weights.safetensors" in str(e.value) and want in str(e.value)
    assert hashlib.sha256(bytes(data)).hexdigest() in str(e.value)
    assert not (tmp_path / "runs" / "toy" / "bundles").exists()      # nothing set up
    with pytest.raises(CpfcteError, match="HTTP 404"):
        open_bundle(f"{server.url}/no-such-bundle/", "toy", progress=False)


def test_a_damaged_cache_entry_is_fetched_again(released, server, tmp_path):
    from cpfcte.machinery.paths import cache_dir
    from cpfcte.stages.bundle import open_bundle

    open_bundle(f"{server.url}/toy-train_x/", "toy", progress=False)
    want = _sha(released / "toy-train_x" / "weights.safetensors")
    cached = cache_dir() / "sha256" / want
    cached.unlink()
    cached.write_bytes(b"damaged")
    shutil.rmtree(tmp_path / "runs" / "toy" / "bundles")
    run = open_bundle(f"{server.url}/toy-train_x/", "toy", progress=False)
    assert _sha(run / "weights.safetensors") == want


def _remanifest(bundle: Path) -> None:
    """Write a changed bundle's manifest again: a consistent bundle, its change not caught by
    the hashes."""
    from cpfcte.machinery.fetch import manifest_text

    names = [p.name for p in bundle.iterdir() if p.name != "MANIFEST.sha256"]
    (bundle / "MANIFEST.sha256").write_text(manifest_text(bundle, names))


def _edit(bundle: Path, name: str, change) -> None:
    """Change a bundle's JSON file and write its manifest again."""
    path = bundle / name
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    _remanifest(bundle)


def test_a_bundle_of_another_profile_or_class_list_is_refused_in_one_line(released):
    from cpfcte.stages.bundle import open_bundle

    with pytest.raises(CpfcteError) as e:
        open_bundle(released / "toy-train_x", "voc", progress=False)
    assert "profile 'toy', not 'voc'" in str(e.value) and "\n" not in str(e.value)
    _edit(released / "toy-train_x", "bundle.json",
          lambda info: {**info, "classes": info["classes"][:-1]})
    with pytest.raises(CpfcteError) as e:
        open_bundle(f"file://{released}/toy-train_x", "toy", progress=False)
    assert "a bundle of the classes" in str(e.value) and "\n" not in str(e.value)


def test_what_cannot_be_released_or_trained_again_is_refused(made, released, tmp_path):
    from cpfcte.cli import main
    from cpfcte.machinery.config import load_config
    from cpfcte.report.release import release
    from cpfcte.stages.bundle import open_bundle
    from cpfcte.stages.train import train

    run = open_bundle(released / "toy-train_x", "toy", progress=False)
    with pytest.raises(CpfcteError, match="made from the bundle"):
        release([run], tmp_path / "r2", profile="toy")
    with pytest.raises(CpfcteError, match="cannot run in it again"):
        train(load_config("toy"), run, progress=False)
    shutil.copytree(made / "train_x", tmp_path / "half")
    (tmp_path / "half" / "summary.json").unlink()
    with pytest.raises(CpfcteError, match="not complete"):
        release([tmp_path / "half"], tmp_path / "r3", profile="toy")
    assert not (tmp_path / "r3").exists()                 # refused before the first write
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(CpfcteError, match="not empty"):
        release([made / "train_x"], tmp_path / "mine", profile="toy")
    # the command line calibrates a training run's threshold only after every refusal
    shutil.copytree(made / "train_x", tmp_path / "uncalibrated")
    (tmp_path / "uncalibrated" / "threshold.json").unlink(missing_ok=True)
    with pytest.raises(SystemExit):
        main(["release", str(tmp_path / "uncalibrated"), "--out", str(tmp_path / "mine")])
    assert not (tmp_path / "uncalibrated" / "threshold.json").exists()


def test_an_archive_with_a_path_outside_its_folders_is_refused(released, tmp_path):
    import io

    from cpfcte.stages.bundle import open_bundle

    bundle = released / "toy-pseudo_x"
    with tarfile.open(bundle / "pseudo_labels.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("../escape.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"png"))
    _remanifest(bundle)
    with pytest.raises(CpfcteError, match="refused, nothing unpacked"):
        open_bundle(bundle, "toy", progress=False)
    assert not (tmp_path / "escape.png").exists()
    assert not list((tmp_path / "runs" / "toy" / "bundles").glob("toy-pseudo_x-*"))


def test_without_runs_named_every_complete_run_of_the_batch_is_released(made, tmp_path,
                                                                         capsys):
    from cpfcte.cli import main

    runs = tmp_path / "runs" / "toy"
    shutil.copytree(made / "train_x", runs / "train_full")
    shutil.copytree(made / "pseudo_x", runs / "pseudo_full")
    (runs / "pseudo_full" / "metrics.json").unlink()          # a stage that did not finish
    main(["release", "--out", str(tmp_path / "rel")])
    captured = capsys.readouterr()
    assert [Path(b).name for b in json.loads(captured.out[captured.out.index("{"):])[
        "bundles"]] == ["toy-train_full"]
    assert "not released: pseudo_full" in captured.err and "did not finish" in captured.err
    info = json.loads((tmp_path / "rel" / "toy-train_full" / "bundle.json").read_text())
    assert "Table 1 (its stage 1)" in info["table_rows"]
    with pytest.raises(SystemExit):
        main(["release", "--profile", "voc", "--out", str(tmp_path / "rel_voc")])
    assert "no complete run of the voc batch" in capsys.readouterr().err


def test_a_killed_set_up_leaves_nothing_that_the_next_one_trips_on(released, tmp_path):
    from cpfcte.stages.bundle import open_bundle

    bundles = tmp_path / "runs" / "toy" / "bundles"
    manifest = (released / "toy-train_x" / "MANIFEST.sha256").read_bytes()
    name = f"toy-train_x-{hashlib.sha256(manifest).hexdigest()[:12]}"
    stale = bundles / f".{name}.999999999.partial"             # a process that is gone
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{half")
    run = open_bundle(released / "toy-train_x", "toy", progress=False)
    assert run == bundles / name and not stale.exists()
    assert sorted(p.name for p in bundles.iterdir()) == [name]
    with pytest.raises(CpfcteError, match="--url 'ftp://x'"):
        from cpfcte.report.release import release

        release([run], tmp_path / "r", profile="toy", url="ftp://x")
