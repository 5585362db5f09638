"""The JupyterLab sidebar in a real browser, against the real server extension: jobs
written to the job store in its public format (no Spark, no TF) show in the left panel,
and a row opens the job's view. Debian's Chromium through Playwright, JupyterLab served
here (the `lab` fixture of test_browser). Screenshots go to TFOS_SCREENSHOTS when set.

It needs the server extension (tfos_magic/server) and skips without it.
"""

import os
import time
from pathlib import Path

import pytest
from test_browser import CHROMIUM, _dismiss_news, lab  # noqa: F401 - `lab` is a fixture

pytest.importorskip("tfos_magic.server", reason="the sidebar's server extension is not in this tree")


def _store_jobs(home: Path) -> None:
    """A succeeded job with a loss curve and a checkpoint, and a failed one with its error."""
    from tfos_magic.job import JobStore
    from tfos_magic.job.spec import JobSpec

    store = JobStore(str(home))
    now = time.time()
    store.save_spec(JobSpec(name="curve", train_source="def build_model(): ..."))
    store.append_events("curve", [
        {"v": 1, "kind": "step", "time": now - 60 + s, "worker": 0, "run": 1, "attempt": 1, "step": s * 10,
         "metrics": {"loss": 2.0 / (1 + s), "rows_per_s": 5000.0}} for s in range(1, 30)
    ] + [{"v": 1, "kind": "epoch", "time": now - 30, "worker": 0, "run": 1, "attempt": 1, "epoch": 1,
          "step": 290, "metrics": {"loss": 0.07}},
         {"v": 1, "kind": "checkpoint", "time": now - 30, "worker": 0, "run": 1, "attempt": 1,
          "path": str(home / "ckpt-290"), "step": 290, "epoch": 1, "reason": "epoch"}])
    store.write_state("curve", state="succeeded", run=1, attempt=1, started=now - 61, ended=now - 29,
                      updated=now - 29, error=None, workers=2)
    store.save_spec(JobSpec(name="broken", train_source="def build_model(): ..."))
    store.write_state("broken", state="failed", run=1, attempt=1, started=now - 20, ended=now - 19,
                      updated=now - 19, error="Column 'y' has 3 null values.", workers=2)


@pytest.mark.slow
def test_the_sidebar_lists_stored_jobs_and_opens_one(lab, tmp_path):  # noqa: F811 - the fixture
    from playwright.sync_api import sync_playwright

    url, token = lab
    _store_jobs(tmp_path / "home")  # the lab fixture's TFOS_HOME
    shots = Path(os.environ.get("TFOS_SCREENSHOTS") or tmp_path)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"{url}/lab?token={token}", timeout=60_000)
            page.wait_for_selector(".jp-LabShell", timeout=60_000)
            _dismiss_news(page)
            page.locator(".jp-SideBar.jp-mod-left li[data-id='tfos-magic-jobs']").click()
            page.wait_for_selector(".tfos-JobRow[data-job='curve']", timeout=30_000)
            assert page.locator(".tfos-JobRow[data-job='curve'] .tfos-StateBadge").text_content() == "succeeded"
            assert page.locator(".tfos-JobRow[data-job='broken'] .tfos-StateBadge").text_content() == "failed"
            assert page.locator(".tfos-JobRow[data-job='curve'] .tfos-Sparkline path").count() == 1
            page.screenshot(path=str(shots / "sidebar.png"))
            page.locator(".tfos-JobRow[data-job='curve']").click()
            page.wait_for_selector(".tfos-LossChart-line", timeout=30_000)
            assert "ckpt-290" in page.locator(".tfos-JobDetail-checkpoints").text_content()
            page.screenshot(path=str(shots / "sidebar-job.png"))
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"))
            raise
        finally:
            browser.close()
