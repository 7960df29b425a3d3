"""The project's own hygiene: pins, notebooks, profiles."""

import ast
import re
from pathlib import Path

import nbformat
import pytest
import yaml

from cpfcte.machinery.config import available_profiles, load_config

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
    assert [p.name[:2] for p in notebooks] == [f"{i:02d}" for i in range(10)]
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


# ---- notebooks are thin, say which stage they drive, and promise nothing stale ------------

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _code_lines(source: str) -> int:
    return sum(1 for ln in source.splitlines() if ln.strip() and not ln.strip().startswith("#"))


def test_notebook_cells_are_short_and_each_notebook_names_its_stage():
    from cpfcte.batch.catalog import STAGES

    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        assert nb.metadata.get("cpfcte", {}).get("stage") in STAGES, path
        for cell in nb.cells:      # the parameters cell is a list of plain values
            if cell.cell_type == "code" and "parameters" not in cell.metadata.get("tags", []):
                assert _code_lines(cell.source) <= 8, (path.name, cell.source)


def test_report_notebooks_draw_by_default_what_the_batch_asks_of_them():
    from cpfcte.batch.catalog import load_batch

    batch = load_batch()
    for run in batch.runs.values():
        if run.reports is None:
            continue
        nb = nbformat.read(ROOT / "notebooks" / run.notebook, as_version=4)
        params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        default = ast.literal_eval(next(
            s.value for s in ast.parse(params.source).body if s.targets[0].id == "reports"))
        assert (run.reports == list(batch.groups) if default == "all"
                else default.split(",") == run.reports), run.name


PROMISE = re.compile(r"\b(later steps?|comes? (?:in )?later|not (?:yet )?(?:implemented|"
                     r"reproduced)|until then|to come|will (?:be )?(?:added|come|follow)|"
                     r"coming soon|TODO)\b", re.IGNORECASE)
STAGE_WORDS = {r"\bCRF\b": "pseudo", r"DeepLab": "deeplab", r"ablation": "report",
               r"real data": "data", r"Table \d": "report", r"Fig(?:ure|\.) \d": "report",
               r"pseudo.label": "pseudo", r"train": "train"}


def stale_promises(text: str, batch_stages: set[str]) -> list[str]:
    """Sentences that promise a stage "later" although the batch already runs it (or that
    promise something without saying what)."""
    out = []
    for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z*`])|\n\n", text):
        if not PROMISE.search(sentence):
            continue
        named = {stage for word, stage in STAGE_WORDS.items() if re.search(word, sentence)}
        if not named or named & batch_stages:
            out.append(sentence.strip())
    return out


def test_the_promise_check_catches_the_old_overview_text():
    old = ("The dense CRF, DeepLabv2 (Tables 2–3), the ablations (Tables 4–5, Figs. 4, 6, 7) "
           "and the real datasets come in later steps; until then their cells in the tables "
           "say *not run*.")
    assert stale_promises(old, {"pseudo", "deeplab", "report"}) == [old]
    assert stale_promises(old, set()) == []            # nothing runs those yet: a fair promise
    assert stale_promises("DeepLabv2 runs after the pseudo labels.", {"deeplab"}) == []


def test_no_notebook_promises_a_stage_that_the_batch_already_runs():
    from cpfcte.batch.catalog import load_batch

    stages = {run.stage for run in load_batch().runs.values()}
    assert {"data", "train", "pseudo", "deeplab", "report"} <= stages
    for path in NOTEBOOKS + [ROOT / "README.md"]:
        if path.suffix == ".ipynb":
            nb = nbformat.read(path, as_version=4)
            text = "\n\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
        else:
            text = path.read_text()
        assert stale_promises(text, stages) == [], path.name


# ---- the interpretation notes: one home, cited by number -----------------------------------


def test_interpretation_notes_have_one_home_that_everything_cites():
    from cpfcte.machinery import notes

    numbers = [n.number for n in notes.all_notes()]
    assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) >= 17
    assert all(n.short and n.text for n in notes.all_notes())
    cited = set()
    files = list((ROOT / "cpfcte").rglob("*.py")) + NOTEBOOKS + [ROOT / "README.md"]
    for path in files:
        text = path.read_text()
        assert "DESIGN note" not in text, path            # a file users do not have
        cited |= {int(n) for n in re.findall(r"\bnotes? (\d+)\b", text)}
    assert cited and cited <= set(numbers)                # every citation has its note
    from cpfcte.report.tables import notes_file_text  # what every table's notes list

    listed = notes_file_text("T", "t", []).split("## Interpretation notes")[1]
    assert "\n1. class tokens: soft" in listed and f"\n17. {notes.note(17).short}" in listed
    overview = nbformat.read(ROOT / "notebooks" / "00_overview.ipynb", as_version=4)
    assert any("notes.markdown()" in c.source for c in overview.cells)
    for path in NOTEBOOKS:                                # rendered, never copied
        assert notes.note(8).short not in path.read_text(), path


def test_a_broken_notes_file_is_refused(tmp_path, monkeypatch):
    from cpfcte.machinery import notes
    from cpfcte.machinery.errors import CpfcteError

    bad = tmp_path / "n.md"
    bad.write_text("## 1. A\n\n*In short:* a\n\n## 3. C\n\n*In short:* c\n")
    monkeypatch.setattr(notes, "notes_file", lambda: bad)
    with pytest.raises(CpfcteError, match=r"numbered 1, 2, 3, ... in order \(got \[1, 3\]\)"):
        notes.all_notes()
    bad.write_text("## 1. A\n\nno summary\n")
    with pytest.raises(CpfcteError, match="note 1 has no"):
        notes.all_notes()


def test_gpu_check_takes_python3_when_the_venv_python_is_a_dangling_link(tmp_path):
    """`$(wildcard)` is true for a dangling symlink; GPU_PY must test that the interpreter
    imports torch (a GPU machine's own python3 has it)."""
    import shutil
    import subprocess

    if shutil.which("make") is None:
        import pytest

        pytest.fail("make is needed (CI installs it)")
    dangling = tmp_path / "python"
    dangling.symlink_to(tmp_path / "missing-python")
    out = subprocess.run(["make", "--no-print-directory", "-n", "gpu-check", f"PY={dangling}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60).stdout
    assert out.splitlines()[0].startswith("python3 -c") and str(dangling) not in out


# ---- the docs name what exists ------------------------------------------------------------

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def resolve(dotted: str) -> bool:
    """Whether ``cpfcte.a.b.Name`` names a module, or an attribute of the longest module
    prefix."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_resolve_tells_a_name_from_a_stale_one():
    assert resolve("cpfcte.method.bpm.bpm_grid") and resolve("cpfcte.stages")
    assert not resolve("cpfcte.explore.class_evidence")        # a module that moved
    assert not resolve("cpfcte.method.network.SequenceDropout")  # a class that moved


def test_every_module_file_notebook_and_page_the_docs_name_exists():
    stale = []
    for doc in DOCS:
        text = doc.read_text()
        stale += [f"{doc.name}: {m}" for m in re.findall(r"\bcpfcte(?:\.\w+)+", text)
                  if not resolve(m)]
        stale += [f"{doc.name}: {m}" for m in re.findall(r"\b(?:cpfcte|benchmarks|tests|notebooks)"
                                                        r"/[\w/.-]+\.(?:py|ipynb|yaml|sh)\b",
                                                        text) if not (ROOT / m).exists()]
        stale += [f"{doc.name}: {m}" for m in re.findall(r"\]\(([\w./-]+\.md)\)", text)
                  if not (doc.parent / m).exists()]
    assert not stale, "\n".join(stale)


def test_the_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == ["## The idea", "## Paper → code", "## Quick start", "## Results",
                        "## Notebooks", "## Documentation"]
    assert "@article{" in text and "doi.org/10.32604/cmes.2025.074467" in text
    assert "![Fig. 6" in text and (ROOT / "figures" / "fig6.png").exists()
    assert text.lower().count("toy ≠ paper") == 1
    for nb in NOTEBOOKS:                                   # every notebook, in the table
        assert f"(notebooks/{nb.name})" in text, nb.name
    for page in (ROOT / "docs").glob("*.md"):              # every page, in the index
        assert f"(docs/{page.name})" in text, page.name
    for command in ("make paper", "make test", "make lab"):
        assert command in text


def test_the_citation_file_names_the_paper_as_the_preferred_citation():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and {"message", "title", "authors"} <= set(cff)
    paper = cff["preferred-citation"]
    assert paper["type"] == "article" and " ".join(paper["title"].split()) == (
        "Context Patch Fusion With Class Token Enhancement for Weakly Supervised Semantic "
        "Segmentation")
    assert [a["family-names"] for a in paper["authors"]] == ["Fu", "Li", "Wu"]
    assert paper["license"] == "CC-BY-4.0"
    toml = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{cff["version"]}"' in toml and f'license = "{cff["license"]}"' in toml


def test_the_readme_results_table_is_what_the_committed_tables_give(monkeypatch):
    from cpfcte.report.readme import in_step, results_table, section

    monkeypatch.delenv("CPFCTE_OUT")                     # the project's own tables/
    held = section((ROOT / "README.md").read_text())
    assert held is not None, "README.md lost its results markers"
    assert held == results_table(), "README's Results table drifted: run cpfcte report"
    assert in_step() is True


def test_the_report_rewrites_the_readme_results_table_from_the_tables(tmp_path, monkeypatch):
    from cpfcte.report.readme import BEGIN, END, update_readme

    monkeypatch.setenv("CPFCTE_OUT", str(tmp_path))
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "table2.csv").write_text(
        "Method,Pub.,Backbone,mIoU paper (%),\"mIoU this run, toy (%)\"\n"
        "CPF-CTE (DeepLabv2 + CRF),Ours,x,69.5,12.3 ± 0.4 (n=3)\n")
    (tmp_path / "tables" / "table2.voc.csv").write_text(
        "Method,Pub.,Backbone,mIoU paper (%),\"mIoU this run, voc (%)\"\n"
        "CPF-CTE (DeepLabv2 + CRF),Ours,x,69.5,68.8\n")
    (tmp_path / "README.md").write_text(f"# x\n\n{BEGIN}\nold\n{END}\n\nkept\n")
    update_readme()
    text = (tmp_path / "README.md").read_text()
    assert "| Table 2: DeepLabv2 + CRF, VOC val (toy: val) | 69.5 | 12.3 ± 0.4 | 68.8 |" in text
    assert "| Table 1: pseudo labels on train, BPM | — | — | not run here (voc) |" in text
    assert "old" not in text and text.endswith(f"{END}\n\nkept\n")
    (tmp_path / "README.md").write_text("# no markers\n")
    assert update_readme() is None and (tmp_path / "README.md").read_text() == "# no markers\n"
