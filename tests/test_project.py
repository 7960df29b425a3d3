"""The project's own hygiene: pins, notebooks, profiles."""

import ast
import re
from pathlib import Path

import nbformat
import yaml

from cpfcte.config import available_profiles, load_config

ROOT = Path(__file__).resolve().parents[1]


def _pins(lines):
    return {m.group(1).lower(): m.group(2) for m in
            (re.match(r"^\s*-?\s*([A-Za-z0-9_.\-]+)==([^\s#]+)", ln) for ln in lines) if m}


def test_requirements_and_environment_yml_agree():
    req = _pins((ROOT / "requirements.txt").read_text().splitlines())
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert req and req == _pins(pip_section)
    assert "python=3.11" in env["dependencies"]


def test_notebooks_are_stored_clean_with_a_tagged_parameters_cell():
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert [p.name[:2] for p in notebooks] == ["00", "01", "02", "03", "04", "05", "06", "07"]
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        assert nb.metadata["kernelspec"]["name"] == "python3", path
        assert nb.cells[0].cell_type == "markdown", path
        params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1, path
        for stmt in ast.parse(params[0].source).body:   # plain `name = literal` only
            assert isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant), (
                path, ast.unparse(stmt))
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, path


def test_every_profile_loads():
    assert {"toy", "voc", "coco"} <= set(available_profiles())
    for name in available_profiles():
        assert load_config(name).profile == name
