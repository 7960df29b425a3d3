"""Shared fixtures: a tiny toy dataset in the VOC layout and a tiny model config.

Tests never read ../shared and never write into the project's data/, runs/, tables/ or figures/:
CPFCTE_DATA, CPFCTE_RUNS, CPFCTE_OUT and CPFCTE_CACHE point into pytest's temporary folders.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cpfcte.data.toy import ToySpec, generate
from cpfcte.machinery.config import load_config

TINY_SPEC = ToySpec(seed=3, n_train=8, n_val=4, n_extra=16, min_size=40, max_size=56)
TINY_MODEL = dict(img_size=32, backbone_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 1,
                                                "num_heads": 2},
                  token_dim=8, lstm_hidden=8, k=2, epochs=3, warmup_epochs=1, batch_size=8,
                  infer_size=48, infer_batch=4, workers=0)


def skip_or_fail(reason: str | None) -> None:
    """Skip a test whose service is missing, with the reason; under ``CI=true`` fail instead:
    CI installs and starts every service a test needs, so a missing one is a CI failure, not
    a silently skipped test."""
    import os

    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true, so this test may not be skipped: {reason}")
        pytest.skip(reason)


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("CPFCTE_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("CPFCTE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("CPFCTE_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("CPFCTE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toydata") / "toy"
    generate(root, TINY_SPEC, progress=False)
    return root


@pytest.fixture
def tiny_cfg(toy_root):
    def make(**overrides):
        return load_config("toy", {"data_root": str(toy_root), **TINY_MODEL, **overrides})

    return make
