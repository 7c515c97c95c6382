"""The notebooks: how they are stored, what they show when executed, and their views in a
real browser (Chromium).

* every notebook is stored without outputs, has exactly one parameters cell reading the
  model, ``ESMC_DATA`` and ``ESMC_QUICK``, stays thin (logic lives in esmc_lens) and saves its
  figures through ``plotting.save_figure``;
* ``make notebooks`` (``ESMC_NB_EXECUTE=1``, quick mode) executes each with nbclient and
  checks what a reader sees: every figure cell shows its figure inline, no cell prints a
  bare list of paths or a stale progress bar, every table of a quick run says QUICK; the
  executed copies are kept for ``make docs``;
* in JupyterLab in headless Chromium (Debian's ``chromium`` and ``chromium-driver`` with
  Selenium) the quickstart renders its cluster browser, and notebook 10's lens explorer and
  vote map react to a slider, a typed keyword and tau;
* ``make docs`` then opens the built site (``ESMC_DOCS_SITE``): the gallery's and a
  notebook page's figures render, and the static (kernel-free) lens explorer and vote map
  react to their controls.

Screenshots are kept in ``test-artifacts/`` (git-ignored). The browser tests skip, with the
reason, where Chromium, its driver, Selenium or JupyterLab are missing (Selenium and
JupyterLab come with ``pip install -e '.[dev]'``); under ``CI=true`` that is a failure
(``.ci/run`` installs Chromium).
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
ARTIFACTS = REPO / "test-artifacts"


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_the_numbered_sequence_is_complete():
    numbers = [int(p.name[:2]) for p in NOTEBOOKS]
    assert numbers == list(range(1, 11)), [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
    nb = _load(path)
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [], f"{path.name}: strip outputs before saving"
            assert cell.get("execution_count") is None, f"{path.name}: execution counts"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_one_parameters_cell(path):
    nb = _load(path)
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: exactly one cell tagged 'parameters'"
    src = "".join(tagged[0]["source"])
    for needle in ("MODEL", "ESMC_DATA", "ESMC_QUICK", "QUICK", "FIGURES"):
        assert needle in src, f"{path.name}: the parameters cell must set {needle}"
    others = "".join("".join(c["source"]) for c in nb["cells"]
                     if c["cell_type"] == "code" and c is not tagged[0])
    assert "os.environ" not in others, (
        f"{path.name}: read the environment in the parameters cell only")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_thin(path):
    nb = _load(path)
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"])
        assert "\ndef " not in f"\n{src}" and "\nclass " not in f"\n{src}", (
            f"{path.name}: move functions and classes to esmc_lens")
        assert len(src.splitlines()) <= 16, f"{path.name}: a cell of {len(src.splitlines())} lines"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_saves_its_figures_with_the_shared_style(path):
    src = "".join("".join(c["source"]) for c in _load(path)["cells"])
    assert "save_figure(" in src and "FIGURES" in src
    assert "plt.savefig" not in src and ".savefig(" not in src


# ----------------------------------------------------------------- executed (nbclient)

EXECUTE = os.environ.get("ESMC_NB_EXECUTE") == "1"
EXECUTED = Path(os.environ.get("ESMC_NB_EXECUTED", REPO / "outputs" / "executed"))
FIGURE_CELL = re.compile(r"save_figure\(|\.plot\(")
PATH_LIST = re.compile(r"\[\s*(PosixPath|WindowsPath)\(|^\s*\[?'[^']*\.(pdf|png)'", re.M)
STALE_BAR = re.compile(r"\d+%\|")


def _texts(out: dict) -> list[str]:
    """Every text a reader sees in one output (stream text, plain text, HTML)."""
    if out.get("output_type") == "stream":
        return ["".join(out.get("text", ""))]
    data = out.get("data", {})
    return ["".join(data[k]) for k in ("text/plain", "text/html") if k in data]


def check_executed(nb: dict, name: str, quick: bool) -> list[str]:
    """What a reader would object to in an executed notebook (empty: nothing)."""
    bad = []
    for n, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"])
        outs = cell.get("outputs", [])
        pngs = [o for o in outs if "image/png" in o.get("data", {})]
        if FIGURE_CELL.search(src) and not pngs:
            bad.append(f"{name} cell {n}: draws a figure but shows no image")
        for o in outs:
            if o.get("output_type") == "error":
                bad.append(f"{name} cell {n}: {o.get('ename')}: {o.get('evalue')}")
            for t in _texts(o):
                if PATH_LIST.search(t):
                    bad.append(f"{name} cell {n}: prints a list of paths: {t[:80]!r}")
                if STALE_BAR.search(t):
                    bad.append(f"{name} cell {n}: a progress bar is left: {t[:80]!r}")
            html = "".join(o.get("data", {}).get("text/html", ""))
            if quick and "<table" in html and "QUICK" not in html:
                bad.append(f"{name} cell {n}: a table of a quick run without QUICK")
        for o in pngs:  # a real figure, not an empty canvas
            png = base64.b64decode("".join(o["data"]["image/png"]))
            from PIL import Image

            im = Image.open(io.BytesIO(png))
            if min(im.size) < 50 or len(set(im.convert("L").getdata())) < 3:
                bad.append(f"{name} cell {n}: an empty {im.size} image")
    return bad


def test_the_executed_notebook_checker_sees_what_a_reader_would_object_to():
    fig = base64.b64encode(_tiny_png()).decode()
    good = {"cells": [{"cell_type": "code", "source": "P.save_figure(fig, 'x', FIGURES);",
                       "outputs": [{"output_type": "display_data",
                                    "data": {"image/png": fig, "text/plain": "<Figure>"}}]}]}
    assert check_executed(good, "nb", quick=True) == []
    bad = {"cells": [
        {"cell_type": "code", "source": "P.save_figure(fig, 'x', FIGURES)", "outputs": [
            {"output_type": "execute_result",
             "data": {"text/plain": "[PosixPath('figures/x.pdf'), PosixPath('figures/x.png')]"}}]},
        {"cell_type": "code", "source": "t3", "outputs": [
            {"output_type": "execute_result", "data": {"text/html": "<table></table>"}},
            {"output_type": "display_data",
             "data": {"text/plain": "Loading weights:   0%|          | 0/103"}}]}]}
    problems = check_executed(bad, "nb", quick=True)
    assert any("shows no image" in p for p in problems)
    assert any("list of paths" in p for p in problems)
    assert any("without QUICK" in p for p in problems)
    assert any("progress bar" in p for p in problems)
    assert check_executed(bad, "nb", quick=False) != []  # the paths stay wrong in full mode


def _tiny_png() -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.indices((60, 60)).sum(0) % 7 * 30).astype("uint8")).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.slow
@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes_and_shows_every_figure(path, monkeypatch):
    if not EXECUTE:
        pytest.skip("executes the notebooks: run 'make notebooks' (ESMC_NB_EXECUTE=1)")
    import nbformat
    from nbclient import NotebookClient

    # The kernel inherits this environment: no Agg backend, or no figure is shown inline.
    monkeypatch.delenv("MPLBACKEND", raising=False)
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=int(os.environ.get("ESMC_NB_TIMEOUT", "1200")),
                   kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    EXECUTED.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, EXECUTED / path.name)
    quick = os.environ.get("ESMC_QUICK", "0") == "1"
    assert check_executed(json.loads(nbformat.writes(nb)), path.name, quick) == []


# ----------------------------------------------------------------- JupyterLab + Chromium


def _find(*names: str) -> str | None:
    for n in names:
        p = shutil.which(n)
        if p:
            return p
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _missing(reason: str) -> None:
    """Skip on a user's machine; fail in CI (CI=true), which installs Chromium (.ci/run)."""
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"CI=true but {reason}: .ci/run installs Chromium (as root) and "
                    "`make test` the Python packages")
    pytest.skip(reason)


def _browser_prerequisites() -> tuple[str, str]:
    chromium = _find("chromium", "chromium-browser", "google-chrome")
    driver = _find("chromedriver")
    if chromium is None or driver is None:
        _missing("Chromium or chromedriver is not installed (Debian: apt-get install "
                 "chromium chromium-driver); the browser tests need both")
    for module, fix in (("selenium", "pip install selenium"),
                        ("jupyterlab", "pip install 'esmc_lens[notebooks]'"),
                        ("ipywidgets", "pip install ipywidgets")):
        if importlib.util.find_spec(module) is None:
            _missing(f"{module} is not installed ({fix})")
    return chromium, driver


@pytest.fixture(scope="module")
def chrome():
    """A headless Chromium (a fresh profile), with its console log readable."""
    chromium, driver_path = _browser_prerequisites()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
              "--disable-gpu", "--window-size=1400,1800", "--allow-file-access-from-files"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    ARTIFACTS.mkdir(exist_ok=True)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def lab(tmp_path_factory, chrome):
    """A JupyterLab server on copies of the notebooks (JupyterLab saves outputs into the
    files it runs; the repo's stay clean), the tiny model unless ESMC_BROWSER_MODEL."""
    tmp_path = tmp_path_factory.mktemp("lab")
    work = tmp_path / "lab"
    (work / "notebooks").mkdir(parents=True)
    for nb in NOTEBOOKS:
        shutil.copy(nb, work / "notebooks")
    # A fresh JupyterLab with no network calls and no "news?" prompt over the notebook.
    settings = (tmp_path / "jcfg" / "lab" / "user-settings" / "@jupyterlab"
                / "apputils-extension" / "notification.jupyterlab-settings")
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    token, port = uuid.uuid4().hex, _free_port()
    env = dict(os.environ, ESMC_QUICK="1", ESMC_FIGURES=str(tmp_path / "figures"),
               ESMC_OUTPUTS=str(tmp_path / "outputs"),
               ESMC_MODEL=os.environ.get("ESMC_BROWSER_MODEL", "tiny"),
               JUPYTER_CONFIG_DIR=str(tmp_path / "jcfg"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "jrt"))
    env.pop("MPLBACKEND", None)
    log_path = tmp_path / "jupyterlab.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed after the tests
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}",
         "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={work}", "--LabApp.news_url=",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         "--LabApp.extension_manager=readonly"]
        + (["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None:
                    pytest.fail(f"jupyter lab exited: {log_path.read_text()}")
                time.sleep(1)
        else:
            pytest.fail("jupyter lab did not start within 120 s")
        yield {"base": base, "token": token, "driver": chrome}
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def _run_all(lab: dict, name: str):
    """Open notebooks/``name`` in JupyterLab and run every cell through the Run menu."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    d = lab["driver"]
    d.get(f"{lab['base']}/lab/tree/notebooks/{name}?token={lab['token']}")
    wait = WebDriverWait(d, 180)
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".jp-Notebook .jp-Cell")))
    # the kernel is up when the status bar says so
    wait.until(lambda d: "| Idle" in d.find_element(By.CSS_SELECTOR, ".jp-StatusBar-Widget, "
                                                     "#jp-main-statusbar").text)
    run_menu = wait.until(ec.element_to_be_clickable(
        (By.XPATH, "//div[contains(@class,'lm-MenuBar-itemLabel') and text()='Run']")))
    run_menu.click()
    item = wait.until(ec.element_to_be_clickable(
        (By.XPATH, "//li[contains(@class,'lm-Menu-item')][.//div[contains(@class,"
                   "'lm-Menu-itemLabel') and text()='Run All Cells']]")))
    item.click()
    return d


def _no_tracebacks(d):
    from selenium.webdriver.common.by import By

    errors = d.find_elements(
        By.CSS_SELECTOR, "[data-mime-type='application/vnd.jupyter.stderr'] pre")
    tracebacks = [e.text for e in errors if "Traceback" in e.text or "Error" in e.text]
    assert not tracebacks, tracebacks[:1]


@pytest.mark.slow
@pytest.mark.browser
def test_quickstart_runs_in_jupyterlab_and_renders_a_widget(lab):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    shot = ARTIFACTS / "jupyterlab_quickstart.png"
    d = _run_all(lab, "01_quickstart.ipynb")
    try:
        found = WebDriverWait(d, 600).until(lambda d: d.find_elements(
            By.CSS_SELECTOR, ".jp-OutputArea .widget-dropdown select, "
                             ".jp-OutputArea .jupyter-widgets.widget-dropdown"))
        d.execute_script("arguments[0].scrollIntoView({block: 'center'});", found[0])
        time.sleep(2)
        _no_tracebacks(d)
        page = d.find_element(By.CSS_SELECTOR, ".jp-Notebook").text
        assert "all clusters" in page  # the ClusterBrowser's dropdown rendered
        assert "cluster " in page  # and its cluster headers
    finally:
        d.save_screenshot(str(shot))


def _widget_row(d, label: str):
    """The ipywidgets control box whose description is ``label``."""
    from selenium.webdriver.common.by import By

    return d.find_element(By.XPATH, "//div[contains(@class,'widget-inline-hbox')]"
                                    f"[./label[normalize-space()='{label}']]")


def _html_with(d, needle: str) -> str:
    from selenium.webdriver.common.by import By

    els = d.find_elements(By.XPATH, "//div[contains(@class,'widget-html-content')]"
                                    f"[contains(., \"{needle}\")]")
    return els[0].text if els else ""


@pytest.mark.slow
@pytest.mark.browser
def test_lens_explorer_and_vote_map_react_in_jupyterlab(lab):
    """Notebook 10 in JupyterLab: move the layer slider, type a keyword, change tau; what
    the explorers show changes (their status lines and heatmap images)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    d = _run_all(lab, "10_residual_stream_explorer.ipynb")
    try:
        WebDriverWait(d, 600).until(lambda d: _html_with(d, "pairs, tau ="))
        _no_tracebacks(d)
        status = lambda: _html_with(d, " at E_")  # noqa: E731 - the lens explorer's line
        heat = lambda: d.find_element(  # noqa: E731
            By.XPATH, "(//div[contains(@class,'widget-html-content')][contains(., ' at E_')]"
                      "/ancestor::div[contains(@class,'widget-vbox')][1]"
                      "//img)[last()]").get_attribute("src")
        before, heat0 = status(), heat()
        layer = _widget_row(d, "layer")
        d.execute_script("arguments[0].scrollIntoView({block: 'center'});", layer)
        handle = layer.find_element(By.CSS_SELECTOR, ".noUi-handle")
        handle.click()
        handle.send_keys(Keys.ARROW_LEFT, Keys.ARROW_LEFT)
        WebDriverWait(d, 60).until(lambda d: status() != before)
        WebDriverWait(d, 60).until(lambda d: heat() != heat0)  # the outline moved
        moved, heat1 = status(), heat()
        assert re.search(r" at E_(\d+)\(", moved).group(1) != re.search(
            r" at E_(\d+)\(", before).group(1)  # another layer is shown
        box = _widget_row(d, "keyword").find_element(By.CSS_SELECTOR, "input")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys("blue", Keys.ENTER)
        WebDriverWait(d, 60).until(lambda d: "p('blue')" in status())
        WebDriverWait(d, 60).until(lambda d: heat() != heat1)  # the heatmap was redrawn
        time.sleep(1)
        d.save_screenshot(str(ARTIFACTS / "jupyterlab_lens_explorer.png"))
        summary0 = _html_with(d, "pairs, tau =")
        tau = _widget_row(d, "tau")
        d.execute_script("arguments[0].scrollIntoView({block: 'center'});", tau)
        handle = tau.find_element(By.CSS_SELECTOR, ".noUi-handle")
        handle.click()
        for _ in range(5):
            handle.send_keys(Keys.ARROW_RIGHT)
        WebDriverWait(d, 60).until(lambda d: "tau = 0.25" in _html_with(d, "pairs, tau ="))
        assert _html_with(d, "pairs, tau =") != summary0
        time.sleep(1)
        d.save_screenshot(str(ARTIFACTS / "jupyterlab_vote_map.png"))
    finally:
        if not (ARTIFACTS / "jupyterlab_vote_map.png").exists():
            d.save_screenshot(str(ARTIFACTS / "jupyterlab_vote_map.png"))


# ----------------------------------------------------------------------- the docs site

SITE = os.environ.get("ESMC_DOCS_SITE")


def _site() -> Path:
    if not SITE or not (Path(SITE) / "index.html").is_file():
        pytest.skip("no built docs site: run 'make docs' (the test then gets ESMC_DOCS_SITE)")
    return Path(SITE)


def _images_loaded(d, css: str) -> tuple[int, int]:
    """(images matched, images decoded with a size) on the current page."""
    return tuple(d.execute_script(
        "var im = Array.from(document.querySelectorAll(arguments[0]));"
        "return [im.length, im.filter(function(i) { return i.complete && i.naturalWidth > 40"
        "; }).length];", css))


@pytest.mark.slow
@pytest.mark.docs
def test_docs_gallery_and_a_notebook_page_show_their_figures(chrome):
    site = _site()
    d = chrome
    d.get((site / "index.html").as_uri())
    time.sleep(1)
    n, ok = _images_loaded(d, ".card img")
    assert n >= 8 and ok == n, (n, ok)
    d.save_screenshot(str(ARTIFACTS / "docs_gallery.png"))
    d.get((site / "notebooks" / "02_logit_lens_heatmaps.html").as_uri())
    time.sleep(1)
    n, ok = _images_loaded(d, ".jp-OutputArea-output img")
    assert n >= 3 and ok == n, (n, ok)
    assert "QUICK" in d.find_element("tag name", "body").text
    d.get((site / "api" / "esmc_lens.html").as_uri())
    assert "run_esmc" in d.find_element("tag name", "body").text


@pytest.mark.slow
@pytest.mark.docs
def test_docs_static_lens_explorer_and_vote_map_react_without_a_kernel(chrome):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    site = _site()
    d = chrome
    d.get((site / "notebooks" / "10_residual_stream_explorer.html").as_uri())
    time.sleep(1)
    lens = d.find_element(By.CSS_SELECTOR, ".esmc-view.esmc-lens")
    votes = d.find_element(By.CSS_SELECTOR, ".esmc-view.esmc-votes")
    assert lens.find_element(By.CSS_SELECTOR, ".esmc-live").is_displayed()
    state = lambda el: json.loads(el.get_attribute("data-state"))  # noqa: E731
    status = lambda: lens.find_element(By.CSS_SELECTOR, ".esmc-status").text  # noqa: E731
    s0, t0 = state(lens), status()
    layer = lens.find_element(By.CSS_SELECTOR, "input.esmc-layer")
    d.execute_script("arguments[0].scrollIntoView({block: 'center'});", layer)
    layer.click()
    layer.send_keys(Keys.END, Keys.ARROW_LEFT, Keys.ARROW_LEFT)
    s1 = state(lens)
    assert s1["row"] != s0["row"] and status() != t0
    words = json.loads(lens.find_element(
        By.CSS_SELECTOR, "script[type='application/json']").get_attribute("textContent"))
    other = next(w for w in words["grids"] if w != s1["keyword"])
    box = lens.find_element(By.CSS_SELECTOR, "input.esmc-keyword")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(other)
    assert state(lens)["keyword"] == other and f"p('{other}')" in status()
    d.save_screenshot(str(ARTIFACTS / "docs_static_lens_explorer.png"))
    v0 = state(votes)
    tau = votes.find_element(By.CSS_SELECTOR, "input.esmc-tau")
    d.execute_script("arguments[0].scrollIntoView({block: 'center'});", tau)
    tau.click()
    tau.send_keys(Keys.HOME)  # tau = 0: every filled cell gets every pair's vote
    v1 = state(votes)
    assert v1["tau"] == 0 and v1["total"] > v0["total"]
    cells = votes.find_elements(By.CSS_SELECTOR, "td[data-row]")
    cells[len(cells) // 2].click()  # opens the cell in the lens explorer above
    s2 = state(lens)
    assert (s2["row"], s2["pos"]) == (int(cells[len(cells) // 2].get_attribute("data-row")),
                                      int(cells[len(cells) // 2].get_attribute("data-pos")))
    d.save_screenshot(str(ARTIFACTS / "docs_static_vote_map.png"))
    severe = [e for e in d.get_log("browser") if e.get("level") == "SEVERE"]
    assert severe == [], severe[:2]
