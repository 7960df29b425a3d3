"""JupyterLab in a real browser: headless Chromium (Debian's chromium + chromium-driver, driven
by selenium) opens a notebook in a JupyterLab served on 127.0.0.1, runs all cells at the toy
defaults, and checks that no cell errs, that the tqdm progress bar rendered as a widget and
that the figures rendered inline; a screenshot is saved. Notebooks: 02_train (training),
08_explore (predictions and the patch-score explorer: its image and class pickers and the
background-bias slider must render as live widgets) and 09_method_walkthrough (one image through
the method: a picture for each of its eight steps).

The test needs ``chromium`` and ``chromedriver`` on the PATH (``apt-get install chromium
chromium-driver``, which ``.ci/run`` does); without them it is skipped with that reason, and
under CI=true it fails with it (conftest.skip_or_fail).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

@pytest.fixture(scope="module", autouse=True)
def _browser():
    from conftest import skip_or_fail

    skip_or_fail(None if CHROMIUM and DRIVER else
                 "needs Debian's chromium and chromium-driver (apt-get install chromium "
                 "chromium-driver); .ci/run installs them")

STATE_JS = """
const app = window.jupyterapp;
if (!app || !app.shell.currentWidget || !app.shell.currentWidget.sessionContext) return null;
const w = app.shell.currentWidget;
const kernel = w.sessionContext.session && w.sessionContext.session.kernel;
const cells = w.content.model.cells;
let pending = 0, errors = [], widgets = 0, texts = [];
for (let i = 0; i < cells.length; i++) {
  const c = cells.get(i);
  if (c.type !== 'code') continue;
  if (c.executionCount === null) pending++;
  for (let j = 0; j < c.outputs.length; j++) {
    const o = c.outputs.get(j);
    if (o.type === 'error') errors.push(o.toJSON().ename + ': ' + o.toJSON().evalue);
    if (o.type === 'stream') texts.push(String(o.toJSON().text));
    if (o.data && o.data['text/markdown']) texts.push(String(o.data['text/markdown']));
    if (o.data && o.data['application/vnd.jupyter.widget-view+json']) widgets++;
  }
}
return {kernel: kernel ? kernel.status : 'none', pending: pending, errors: errors,
        path: w.context ? w.context.path : null,
        widgets: widgets, text: texts.join('\\n'),
        progress: document.querySelectorAll('.jupyter-widgets [class*="progress"], progress').length,
        images: document.querySelectorAll('.jp-OutputArea-output img').length,
        sliders: document.querySelectorAll('.widget-slider, .jupyter-widget-slider').length,
        dropdowns: document.querySelectorAll('.widget-dropdown, .jupyter-widget-dropdown').length};
"""


def _chrome():
    """Headless Chromium under selenium, at a fixed window size."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1400,1100", "--disable-gpu"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=["02_train.ipynb", "08_explore.ipynb", "09_method_walkthrough.ipynb"])
def lab(request, tmp_path):
    """A JupyterLab on 127.0.0.1 over a copy of the notebooks (autosave never touches the
    project's), with its own settings, runtime and run folders."""
    from cpfcte.data.toy import prepare_toy

    prepare_toy(progress=False)                      # into CPFCTE_DATA (a temporary folder)
    nb_dir = tmp_path / "notebooks"
    nb_dir.mkdir()
    shutil.copy(ROOT / "notebooks" / request.param, nb_dir)
    server, port, token = _serve_lab(nb_dir, tmp_path, dict(os.environ))
    try:
        yield request.param, f"http://127.0.0.1:{port}/lab/tree/{request.param}?token={token}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def test_notebook_runs_in_jupyterlab_in_a_real_browser(lab, tmp_path):
    from selenium.webdriver.common.by import By

    notebook, url = lab
    driver = _chrome()
    shot = Path(os.environ.get("CPFCTE_BROWSER_OUT", tmp_path)) / f"lab_{Path(notebook).stem}.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    try:
        driver.get(url)
        state, deadline = None, time.time() + 120
        while time.time() < deadline:               # the notebook open and its kernel idle
            state = driver.execute_script(STATE_JS)
            if state and state["kernel"] == "idle":
                break
            time.sleep(0.5)
        assert state and state["kernel"] == "idle", f"kernel never became idle: {state}"
        driver.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells');")
        seen_progress, deadline = 0, time.time() + 300
        time.sleep(1.0)
        while time.time() < deadline:
            state = driver.execute_script(STATE_JS)
            seen_progress = max(seen_progress, state["progress"])
            if state["pending"] == 0 and state["kernel"] == "idle":
                break
            time.sleep(0.4)
        time.sleep(1.0)                              # let the last outputs render
        state = driver.execute_script(STATE_JS)
        for button in driver.find_elements(By.XPATH, "//button[normalize-space()='No']"):
            button.click()                           # the "Jupyter news?" toast
        driver.execute_script(                       # the main cell: its bar, then the plot
            "const nb = window.jupyterapp.shell.currentWidget.content;"
            f"nb.activeCellIndex = {2 if notebook.startswith('02') else 5};"
            "nb.activeCell.node.scrollIntoView();")
        time.sleep(0.5)
        driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    print(f"screenshot: {shot}")
    assert state["pending"] == 0, f"cells left unexecuted: {state}"
    assert state["errors"] == [], f"cells raised: {state['errors']}"
    assert seen_progress > 0 and state["widgets"] > 0, f"the tqdm progress widget never rendered: {state}"
    assert state["images"] >= 1, "no figure rendered inline"
    if notebook.startswith("08"):                    # the explorer's live widgets
        assert state["sliders"] >= 1 and state["dropdowns"] >= 2, f"explorer not rendered: {state}"
        assert state["images"] >= 2, "the explorer's figure did not render"
    if notebook.startswith("09"):                    # input, P, A, F, Z, top-k, p, masks
        assert state["images"] >= 8, f"the walk-through's pictures did not all render: {state}"
    assert shot.stat().st_size > 10_000


# ---- the first hour of a new user ------------------------------------------------------------


def _serve_lab(root: Path, tmp_path: Path, env: dict) -> tuple[subprocess.Popen, int, str]:
    port, token = _free_port(), secrets.token_hex(16)
    settings = tmp_path / "settings" / "@jupyterlab" / "docmanager-extension"
    settings.mkdir(parents=True, exist_ok=True)
    (settings / "plugin.jupyterlab-settings").write_text('{"autosave": false}')
    env = {**env, "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"),
           "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "ws")}
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1",
         f"--port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         "--allow-root", "--LabApp.expose_app_in_browser=True", "--ServerApp.open_browser=False"],
        env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "lab.log", "w"))
    deadline = time.time() + 60
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.3)
    return server, port, token


def _run_all(driver, url: str, before: str = "", timeout: float = 600) -> dict:
    """Open ``url``, wait until its notebook is the current one (Lab may first restore the
    last one it showed) with an idle kernel, run ``before`` (JavaScript), run all cells and
    return the notebook's state once every cell has run."""
    name = url.split("?")[0].rsplit("/", 1)[-1]
    driver.get(url)
    state, deadline = None, time.time() + 120
    while time.time() < deadline:
        state = driver.execute_script(STATE_JS)
        if state and state["kernel"] == "idle" and (state["path"] or "").endswith(name):
            break
        time.sleep(0.5)
    assert state and state["kernel"] == "idle" and (state["path"] or "").endswith(name), \
        f"{name} never became the current notebook with an idle kernel: {state}"
    if before:
        driver.execute_script(before)
    driver.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells');")
    time.sleep(1.0)
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = driver.execute_script(STATE_JS)
        if state["pending"] == 0 and state["kernel"] == "idle":
            break
        time.sleep(0.5)
    time.sleep(1.0)
    return driver.execute_script(STATE_JS)


def test_the_first_hour_on_a_fresh_clone(tmp_path):
    """A fresh clone (no data, no runs), JupyterLab on it: notebook 09 run top to bottom on a
    photo of the user's (the toy dataset and the run are made on the way, each said in one
    line; the model says what it knows; the masks have a legend), then notebook 07, which finds
    no complete runs and shows the committed tables. Afterwards ``git status`` of the clone is
    clean: nothing the user looked at was replaced."""
    import numpy as np
    from PIL import Image

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:150, 0:200] / 200
    pixels = 120 + 90 * np.stack([np.sin(7 * xx), np.cos(5 * yy), np.sin(3 * (xx + yy))], -1)
    photo = tmp_path / "my photo.jpg"
    Image.fromarray((pixels + rng.normal(0, 10, pixels.shape)).clip(0, 255)
                    .astype(np.uint8)).save(photo)
    env = {k: v for k, v in os.environ.items()
           if k not in ("CPFCTE_DATA", "CPFCTE_RUNS", "CPFCTE_OUT")}
    env["PYTHONPATH"] = str(clone)                   # the clone's code, its data/ and runs/
    where = subprocess.run([sys.executable, "-c", "import cpfcte; print(cpfcte.__file__)"],
                           env=env, cwd=clone, capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(clone)), where.stdout
    server, port, token = _serve_lab(clone, tmp_path, env)
    driver = _chrome()
    shot = Path(os.environ.get("CPFCTE_BROWSER_OUT", tmp_path)) / "first_hour_09.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{port}/lab/tree/notebooks"
    import json

    set_photo = (  # the user sets the parameter: the parameters cell's text, in the editor
        "const nb = window.jupyterapp.shell.currentWidget.content;"
        "const cell = nb.model.cells.get(1);"
        "cell.sharedModel.setSource(cell.sharedModel.getSource().replace("
        f"'photo = None', {json.dumps('photo = ' + repr(str(photo)))}));")
    try:
        walk = _run_all(driver, f"{base}/09_method_walkthrough.ipynb?token={token}", set_photo)
        driver.save_screenshot(str(shot))
        paper = _run_all(driver, f"{base}/07_paper.ipynb?token={token}", timeout=300)
    finally:
        driver.quit()
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    assert walk["pending"] == 0 and walk["errors"] == [], f"09 on a fresh clone: {walk}"
    text = walk["text"]
    assert "preparing the toy dataset" in text and "training stage 1 into" in text, text
    assert "knows 10 classes" in text and "only these synthetic" in text, text
    assert "my photo.jpg" in text and "calibrated on" in text, text
    assert "classes in the masks: background" in text, text              # the legend's
    assert walk["images"] >= 8
    assert paper["pending"] == 0 and paper["errors"] == [], f"07 on a fresh clone: {paper}"
    assert "not regenerated here" in paper["text"], paper["text"][:2000]
    status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True,
                            text=True, check=True).stdout
    assert status == "", f"the fresh clone changed:\n{status}"
    assert (clone / "data" / "toy").is_dir() and (clone / "runs" / "toy" / "train_full").is_dir()
