"""The dashboard in a real browser: JupyterLab 4 served here, Debian's Chromium driven by
Playwright (no browser download), a 2-worker job with validation data. Checks the live
widget mid-run and the static summary after the end, and screenshots both (into
TFOS_SCREENSHOTS, e.g. docs/, when set; else into the test's temp dir). Then the same
server's Notebook 7 page shows the widget again, rebuilt from the stored job: the widget
needs no lab extension of its own."""

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
from conftest import free_port

CHROMIUM = "/usr/bin/chromium"
CELLS = [
    "%%spark_etl demo\nfrom pyspark.sql import functions as F\n"
    "df = spark.range(80_000, numPartitions=2).select(*[F.rand(seed=i).alias(f'x{i}') for i in range(4)])\n"
    "df = df.withColumn('y', 2 * F.col('x0') - 3 * F.col('x1') + 0.5 * F.col('x2') + F.col('x3'))\n"
    "val = df.limit(4000)\ndf",
    "%%tf_train demo --workers 2 --epochs 3 --batch-size 128 --label y --validation-df val --restart\n"
    "import tensorflow as tf\n\ndef build_model():\n"
    "    m = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(16, activation='relu'),\n"
    "                             tf.keras.layers.Dense(1)])\n"
    "    m.compile(optimizer=tf.keras.optimizers.Adam(0.01), loss='mse')\n    return m\n",
]


# The stored job's dashboard as a live widget (not its end summary, which is plain HTML).
REPLAY = ("from tfos_magic.job import JobStore\nfrom tfos_magic.ui.views import replay\n"
          "view = replay(JobStore(), 'demo', get_ipython())")


def _notebook(path: Path, cells: list[str]) -> None:
    nb = {"nbformat": 4, "nbformat_minor": 5,
          "metadata": {"kernelspec": {"name": "tfos", "display_name": "Python 3 (tfos-magic)", "language": "python"}},
          "cells": [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "source": src, "outputs": [],
                     "execution_count": None} for i, src in enumerate(cells)]}
    path.write_text(json.dumps(nb))


@pytest.fixture
def lab(tmp_path, tfos_kernel):
    port, token = free_port(), secrets.token_hex(16)
    root = tmp_path / "root"
    root.mkdir()
    _notebook(root / "demo.ipynb", CELLS)
    _notebook(root / "replay.ipynb", [REPLAY])
    env = dict(os.environ, TFOS_HOME=str(tmp_path / "home"), TFOS_SPARK_MASTER="local[2]")
    log = open(tmp_path / "lab.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}",
                             "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}", "--allow-root",
                             f"--ServerApp.root_dir={root}",
                             # A layout of its own: one restored from an earlier run (an open panel) would differ.
                             f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}"],
                            stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError((tmp_path / "lab.log").read_text()[-3000:])
            time.sleep(0.5)
    yield url, token
    os.killpg(proc.pid, 15)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
    log.close()


@contextlib.contextmanager
def chromium_page(tmp_path: Path, height: int = 800) -> Iterator[tuple[Any, Any]]:
    """Debian's Chromium through Playwright (no browser download) and a page in it; a
    failure leaves a screenshot of the page in the test's temp dir."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": height})
        try:
            yield browser, page
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"))
            print("screenshot of the failure:", tmp_path / "failure.png")
            raise
        finally:
            browser.close()


def _dismiss_news(page) -> None:
    """JupyterLab asks whether to fetch its news in a toast that would cover the screenshots."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.locator(".Toastify__toast").get_by_role("button", name="No", exact=True).click(timeout=10_000)
    except PlaywrightTimeout:
        pass


def _widget_in_notebook7(page, url: str, token: str, shots: Path) -> None:
    """Notebook 7 (the classic-looking front end on the same server) draws the widget too."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.goto(f"{url}/notebooks/replay.ipynb?token={token}", timeout=60_000)
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    try:
        # A click on the menu before the page has wired it up runs nothing: click again
        # until a cell shows it ran ([*] or a number).
        for _ in range(4):
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
            try:
                page.wait_for_function("() => [...document.querySelectorAll('.jp-InputArea-prompt')]"
                                       ".some(e => /\\[(\\*|\\d+)\\]/.test(e.textContent))", timeout=20_000)
                break
            except PlaywrightTimeout:
                continue
        page.wait_for_selector(".tfos-dash .uplot canvas", timeout=120_000)
    except Exception:
        page.screenshot(path=str(shots / "notebook7-failure.png"))
        print("screenshot of the failure:", shots / "notebook7-failure.png")
        raise
    stats = page.locator(".tfos-dash .tfos-stats").text_content()
    assert "step" in stats, stats
    page.locator(".tfos-dash").scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "dashboard-notebook7.png"))


@pytest.mark.e2e
def test_dashboard_live_then_summary_in_jupyterlab(lab, tmp_path):
    assert shutil.which(CHROMIUM), "Debian's chromium is missing: run scripts/setup.sh (apt-get install chromium)"
    url, token = lab
    shots = Path(os.environ.get("TFOS_SCREENSHOTS") or tmp_path)
    with chromium_page(tmp_path, height=1000) as (browser, page):
        page.goto(f"{url}/lab/tree/demo.ipynb?token={token}", timeout=60_000)
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
        # The kernel is up when the status bar says so; then Run > Run All Cells.
        page.wait_for_selector(".jp-StatusBar-Widget :text('| Idle')", timeout=120_000)
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
        page.wait_for_selector(".jp-InputArea-prompt:text('[*]')", timeout=30_000)
        _dismiss_news(page)
        # Live: the widget draws the chart (uPlot's canvas) once steps arrive.
        page.wait_for_selector(".tfos-dash .uplot canvas", timeout=int(os.environ.get("TFOS_BROWSER_WAIT", 240)) * 1000)
        page.wait_for_function(
            "() => /step \\d+/.test(document.querySelector('.tfos-dash .tfos-stats')?.textContent || '')"
            " && document.querySelector('.tfos-dash .tfos-badge')?.textContent === 'running'", timeout=120_000)
        time.sleep(2)
        page.locator(".tfos-dash").scroll_into_view_if_needed()
        page.screenshot(path=str(shots / "dashboard-live.png"))
        stats = page.locator(".tfos-dash .tfos-stats").text_content()
        assert "rows/s" in stats and "ETA" in stats, stats
        # The end: the same output becomes the static summary, with its PNG curve.
        page.wait_for_selector(".tfos-summary img", timeout=400_000)
        summary = page.locator(".tfos-summary").text_content()
        assert "succeeded" in summary and "val_loss" in summary, summary
        page.locator(".tfos-summary").scroll_into_view_if_needed()
        page.screenshot(path=str(shots / "dashboard-summary.png"))
        _widget_in_notebook7(browser.new_page(viewport={"width": 1280, "height": 900}), url, token, shots)
    assert (shots / "dashboard-live.png").stat().st_size > 10_000
    assert (shots / "dashboard-summary.png").stat().st_size > 10_000
    assert (shots / "dashboard-notebook7.png").stat().st_size > 10_000

