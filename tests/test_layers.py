"""The package's layers import downwards only, read from the source (every import statement,
those inside functions too):

    cli                                      the command line
    batch (catalog, runner, plan, cluster, smoke)   report         the batch and the report
    plots                                    the pictures stage notebooks and figures share
    stages (train, pseudo labels, CRF pool, DeepLabv2 training and prediction, predict, explore)
    method (the paper: class tokens, CF-BiLSTM, ... DeepLabv2)   data (datasets, transforms)
    machinery (config, run folder, io, paths, errors, guards, numerics, torchrun plumbing, ...)

No import circle anywhere; DeepLabv2 never imports stage 1; the explorer may use the
pseudo-label stage, never the reverse; the report reads the catalog, never the runner.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "cpfcte"

# layer → the layers it may import (itself included)
ALLOWED = {
    "machinery": {"machinery"},
    "method": {"machinery", "method"},
    "data": {"machinery", "data"},
    "stages": {"machinery", "method", "data", "stages"},
    "plots": {"machinery", "method", "data", "plots"},
    "batch": {"machinery", "method", "data", "stages", "plots", "batch"},
    "report": {"machinery", "method", "data", "plots", "batch", "report"},
    "top": {"machinery", "method", "data", "stages", "plots", "batch", "report", "top"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("cli", "__main__"):
        return "top"
    return parts[1] if parts[1] in ALLOWED else "top"


def graph() -> dict[str, set[str]]:
    """module → the cpfcte modules it imports (a ``from cpfcte.x import y`` where y is a
    submodule counts as importing cpfcte.x.y)."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                           else node.module for a in node.names]
            for t in targets:
                if t.startswith("cpfcte") and t in modules and t != name:
                    edges[name].add(t)
    return edges


def test_every_layer_imports_only_the_layers_below_it():
    wrong = [f"{m} ({layer(m)}) imports {t} ({layer(t)})"
             for m, targets in graph().items() for t in sorted(targets)
             if layer(t) not in ALLOWED[layer(m)]]
    assert not wrong, "\n".join(wrong)


def test_there_is_no_import_circle():
    edges = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycles.append(" → ".join(path[path.index(t):] + [t]) if t in path
                              else f"{m} → {t}")
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_the_rules_between_stages_and_between_batch_and_report():
    edges = graph()

    def reaches(a: str, b: str) -> bool:
        seen, todo = set(), [a]
        while todo:
            m = todo.pop()
            if m == b:
                return True
            if m not in seen:
                seen.add(m)
                todo += edges.get(m, ())
        return False

    for deeplab in ("cpfcte.stages.deeplab_train", "cpfcte.stages.deeplab_predict",
                    "cpfcte.stages.deeplab_data", "cpfcte.method.deeplabv2"):
        assert not reaches(deeplab, "cpfcte.stages.train"), f"{deeplab} reaches stage 1"
    assert not reaches("cpfcte.stages.pseudo_labels", "cpfcte.stages.explore")
    assert "cpfcte.stages.pseudo_labels" in edges["cpfcte.stages.explore"] or reaches(
        "cpfcte.stages.explore", "cpfcte.stages.pseudo_labels")
    report = {t for m, ts in edges.items() if m.startswith("cpfcte.report") for t in ts}
    assert not {t for t in report if t.startswith("cpfcte.batch")} - {"cpfcte.batch.catalog"}
    batch = {t for m, ts in edges.items() if m.startswith("cpfcte.batch") for t in ts}
    assert not {t for t in batch if t.startswith("cpfcte.report")}
    assert edges["cpfcte"] <= {m for m in edges if m.startswith("cpfcte.machinery")}


def test_the_method_is_one_concept_per_file_named_as_in_the_paper():
    method = sorted(p.stem for p in (ROOT / "method").glob("*.py") if p.stem != "__init__")
    for concept in ("class_tokens", "cf_bilstm", "patch_classifier", "topk_pooling",
                    "mce_loss", "bpm", "crf", "deeplabv2"):
        assert concept in method, concept
    assert {p.name for p in ROOT.iterdir() if p.is_dir() and p.name != "__pycache__"} == {
        "machinery", "method", "data", "stages", "batch", "report", "profiles"}
