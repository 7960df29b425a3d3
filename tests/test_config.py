"""The one Config: nested sections, dotted overrides, derivation downstream, digests."""

import subprocess
import sys

import pytest
import yaml

from cpfcte.machinery.config import (
    PROFILE_DIR,
    CRFConfig,
    config_from_dict,
    derive,
    load_config,
    parse_set_args,
)
from cpfcte.machinery.errors import CpfcteError

TOY_ITERATIONS = yaml.safe_load((PROFILE_DIR / "toy.yaml").read_text())["deeplab"]["iterations"]


def test_profiles_nest_their_sections_and_inherit_them_section_by_section():
    toy = load_config("toy")
    assert toy.deeplab.backbone == "resnet10t" and toy.deeplab.iterations == TOY_ITERATIONS
    assert toy.deeplab.momentum == 0.9                     # a default the profile leaves alone
    assert toy.crf.parameters() == CRFConfig().parameters()  # the one home of the defaults
    twin = load_config("toy_coco")                         # extends toy, sets no deeplab field
    assert twin.deeplab == toy.deeplab and twin.data_root == "toy/coco"
    coco = load_config("coco")                             # extends voc, sets iterations
    assert coco.deeplab.backbone == "resnet101.tv_in1k" and coco.deeplab.iterations == 100000
    assert coco.deeplab.crop == 321 and load_config("voc").deeplab.iterations == 20000


def test_deeplab_recipe_switches_are_validated():
    cfg = load_config("voc")
    assert (cfg.deeplab.msc_loss, cfg.deeplab.test_crf, cfg.deeplab.amp) == ("sum", "reference",
                                                                            True)
    assert cfg.test_crf().describe().startswith("Gaussian (sxy 1, compat 3), bilateral (sxy 67, "
                                                "srgb 3, compat 4)")
    assert load_config("voc", {"deeplab.test_crf": "pseudo"}).test_crf() == cfg.crf
    for name, bad in (("deeplab.msc_loss", "avg"), ("deeplab.test_crf", "voc")):
        with pytest.raises(CpfcteError, match=f"parameter {name}='{bad}' is not one of"):
            load_config("voc", {name: bad})
    # test-time settings do not retrain DeepLabv2; the loss and precision do
    assert load_config("voc", {"deeplab.test_crf": "pseudo"}).deeplab_digest() == \
        cfg.deeplab_digest()
    assert load_config("voc", {"deeplab.msc_loss": "mean"}).deeplab_digest() != \
        cfg.deeplab_digest()


def test_dotted_and_nested_overrides_are_the_same_and_none_keeps_the_value():
    a = load_config("toy", {"deeplab.iterations": 7, "crf.bilateral_sxy": 50})
    b = load_config("toy", {"deeplab": {"iterations": 7}, "crf": {"bilateral_sxy": 50}})
    assert a == b and a.deeplab.iterations == 7 and a.crf.bilateral_sxy == 50.0
    assert a.deeplab.crop == 96                            # the rest of the section is kept
    assert load_config("toy", {"deeplab.iterations": None, "k": None}) == load_config("toy")
    assert parse_set_args(["deeplab.iterations=3", "crf.iterations=2", "k=8"]) == {
        "deeplab.iterations": 3, "crf.iterations": 2, "k": 8}


def test_bad_names_and_values_are_refused_with_the_valid_ones():
    with pytest.raises(CpfcteError, match=r"unknown parameter 'deeplab.iteratons'.*did you mean "
                                          r"deeplab.iterations"):
        load_config("toy", {"deeplab.iteratons": 3})
    with pytest.raises(CpfcteError, match="unknown parameter 'crf_iterations'"):
        load_config("toy", {"crf_iterations": 3})          # the old flat names are gone
    with pytest.raises(CpfcteError, match="is a section"):
        load_config("toy", {"deeplab": 3})
    with pytest.raises(CpfcteError, match="crf.iterations=0 must be ≥ 1"):
        load_config("toy", {"crf.iterations": 0})
    with pytest.raises(CpfcteError, match="crf.bilateral_sxy=-1.0 must be > 0"):
        load_config("toy", {"crf.bilateral_sxy": -1})
    with pytest.raises(CpfcteError, match="deeplab.crop=0 must be ≥ 1"):
        load_config("toy", {"deeplab.crop": 0})
    with pytest.raises(CpfcteError, match="deeplab.iterations='many' must be of type int"):
        load_config("toy", {"deeplab.iterations": "many"})
    with pytest.raises(CpfcteError, match="infer_scale=0.0 must be > 0"):
        load_config("toy", {"infer_scale": 0})


def test_derive_changes_a_copy_and_validates():
    base = load_config("toy", {"crf.bilateral_sxy": 30})
    down = derive(base, {"pseudo_split": "train_aug", "deeplab.iterations": 2, "k": None})
    assert down.crf.bilateral_sxy == 30.0                  # upstream settings flow on
    assert down.pseudo_split == "train_aug" and down.deeplab.iterations == 2 and down.k == base.k
    assert base.pseudo_split == "train" and base.deeplab.iterations == TOY_ITERATIONS
    with pytest.raises(CpfcteError, match="crf.iterations=0"):
        derive(base, {"crf.iterations": 0})
    assert config_from_dict(down.to_dict()) == down        # a saved config.json round-trips


def test_digests_cover_what_shapes_each_network_and_nothing_else():
    cfg = load_config("toy")
    later = derive(cfg, {"crf.bilateral_sxy": 5, "deeplab.lr": 1.0, "infer_size": 80,
                         "infer_scale": 2.0, "pseudo_split": "val", "device": "cpu"})
    assert later.digest() == cfg.digest()                  # stage 1 is untouched by later stages
    assert derive(cfg, {"k": 8}).digest() != cfg.digest()
    assert derive(cfg, {"deeplab.lr": 1.0}).deeplab_digest() != cfg.deeplab_digest()
    assert derive(cfg, {"deeplab.test_scales": [1.0], "deeplab.crf": False, "crf.iterations": 3,
                        "deeplab.workers": 2}).deeplab_digest() == cfg.deeplab_digest()
    assert derive(cfg, {"seed": 1}).deeplab_digest() != cfg.deeplab_digest()


def _imported(module: str) -> set[str]:
    code = (f"import sys, {module}; "
            "print(' '.join(m for m in sys.modules if m.startswith('cpfcte')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_importing_a_layer_loads_nothing_above_it():
    """The layering of tests/test_layers.py, as the interpreter sees it at import time."""
    assert _imported("cpfcte.machinery.config") == {
        "cpfcte", "cpfcte.machinery", "cpfcte.machinery.config", "cpfcte.machinery.errors",
        "cpfcte.machinery.numerics", "cpfcte.machinery.faults"}
    report = _imported("cpfcte.report")
    assert not {m for m in report if m.startswith("cpfcte.batch")} - {"cpfcte.batch",
                                                                     "cpfcte.batch.catalog"}
    assert not {m for m in report if m.startswith("cpfcte.stages")}
    plots = _imported("cpfcte.plots")
    assert not {m for m in plots if m.startswith(("cpfcte.report", "cpfcte.batch",
                                                  "cpfcte.stages"))}
    catalog = _imported("cpfcte.batch.catalog")
    assert not {m for m in catalog if m.startswith("cpfcte.report")}
    assert not {m for m in catalog if m.startswith("cpfcte.batch.")} - {"cpfcte.batch.catalog"}
