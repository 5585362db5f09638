"""The JupyterLab sidebar in a real browser, against the real server extension: a job
that a real kernel is running, a finished job and a failed one (those two written to the
job store in its public format) show in the left panel with their states; a row opens
the job's view; Stop on the running job stops it (its kernel honours the request while
busy) and the panel shows `stopped`. Debian's Chromium through Playwright, JupyterLab
served here (the `lab` fixture of test_browser). Screenshots go to TFOS_SCREENSHOTS
(e.g. docs/) when set, else to the test's temp dir.
"""

import os
import time
from pathlib import Path

import pytest
from conftest import kernel_run
from jupyter_client.manager import start_new_kernel
from test_browser import _dismiss_news, chromium_page, lab  # noqa: F401 - `lab` is a fixture

from tfos_magic import get_job

# A PyTorch job: the sidebar shows it, and stops it, as it does a TensorFlow one.
LIVE = ("%%torch_train live --workers 1 --epochs 200 --batch-size 64 --label y --checkpoint-every-steps 100 "
        "--background\nimport torch\n\ndef build_model():\n"
        "    m = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.Flatten(0))\n"
        "    return m, torch.optim.Adam(m.parameters()), torch.nn.MSELoss()\n")


@pytest.fixture
def running_job(lab, tmp_path, tfos_kernel):
    """A real job, running in the background in a real kernel on the lab's job store."""
    env = dict(os.environ, TFOS_HOME=str(tmp_path / "home"), TFOS_SPARK_MASTER="local[2]")
    km, kc = start_new_kernel(kernel_name=tfos_kernel, env=env)
    try:
        reply, out = kernel_run(kc, "%%spark_etl live\nspark.range(20000).selectExpr('rand(1) AS x', 'rand(2) AS y')")
        assert reply["status"] == "ok", out
        reply, out = kernel_run(kc, LIVE)
        assert reply["status"] == "ok", out
        deadline = time.time() + 180
        while not any(e["kind"] == "step" for e in get_job("live", str(tmp_path / "home")).events):
            assert time.time() < deadline, "the job took no step"
            time.sleep(0.5)
        yield kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def _store_jobs(home: Path) -> None:
    """A succeeded job with a loss curve and a checkpoint, stopped early by a callback, and a
    failed one with its error."""
    from tfos_magic.job import JobStore
    from tfos_magic.job.spec import JobSpec
    from tfos_magic.protocol.options import TrainOptions

    store = JobStore(str(home))
    now = time.time()
    store.save_spec(JobSpec(name="curve", train_source="def build_model(): ...", options=TrainOptions(epochs=3)))
    store.append_events("curve", [
        {"v": 1, "kind": "step", "time": now - 60 + s, "worker": 0, "run": 1, "attempt": 1, "step": s * 10,
         "metrics": {"loss": 2.0 / (1 + s), "rows_per_s": 5000.0}} for s in range(1, 30)
    ] + [{"v": 1, "kind": "epoch", "time": now - 30, "worker": 0, "run": 1, "attempt": 1, "epoch": 1,
          "step": 290, "metrics": {"loss": 0.07}},
         {"v": 1, "kind": "checkpoint", "time": now - 30, "worker": 0, "run": 1, "attempt": 1,
          "path": str(home / "ckpt-290"), "step": 290, "epoch": 1, "reason": "epoch"},
         {"v": 1, "kind": "stopped_early", "time": now - 30, "worker": 0, "run": 1, "attempt": 1, "epoch": 1,
          "epochs": 3, "reason": "EarlyStopping: val_loss did not improve for 1 epoch (patience 1)."}])
    store.write_state("curve", state="succeeded", run=1, attempt=1, started=now - 61, ended=now - 29,
                      updated=now - 29, error=None, workers=2,
                      mlflow_link="http://127.0.0.1:5000/#/experiments/1/runs/0a1b2c3d")
    store.save_spec(JobSpec(name="broken", train_source="def build_model(): ..."))
    store.write_state("broken", state="failed", run=1, attempt=1, started=now - 20, ended=now - 19,
                      updated=now - 19, error="Column 'y' has 3 null values.", workers=2)


@pytest.mark.e2e
def test_the_sidebar_shows_every_job_opens_one_and_stops_the_running_one(lab, running_job, tmp_path):  # noqa: F811
    url, token = lab
    home = tmp_path / "home"  # the lab fixture's TFOS_HOME
    _store_jobs(home)
    shots = Path(os.environ.get("TFOS_SCREENSHOTS") or tmp_path)
    with chromium_page(tmp_path) as (_, page):
        page.goto(f"{url}/lab?token={token}", timeout=60_000)
        page.wait_for_selector(".jp-LabShell", timeout=60_000)
        _dismiss_news(page)
        tab = page.locator(".jp-SideBar.jp-mod-left li[data-id='tfos-magic-jobs']")
        if "lm-mod-current" not in (tab.get_attribute("class") or ""):  # a click on an open panel closes it
            tab.click()
        page.wait_for_selector(".tfos-JobRow[data-job='curve']", timeout=30_000)
        badge = ".tfos-JobRow[data-job='{}'] .tfos-StateBadge"
        page.wait_for_selector(badge.format("live") + ":text('running')", timeout=30_000)
        assert page.locator(badge.format("curve")).text_content() == "succeeded"
        assert page.locator(badge.format("broken")).text_content() == "failed"
        assert "null values" in page.locator(".tfos-JobRow[data-job='broken']").text_content()
        early = "Stopped early at epoch 1 of 3: EarlyStopping"
        assert early in page.locator(".tfos-JobRow[data-job='curve'] .tfos-JobRow-note").text_content()
        assert page.locator(".tfos-JobRow[data-job='curve'] .tfos-Sparkline path").count() == 1
        page.screenshot(path=str(shots / "sidebar.png"))
        page.locator(".tfos-JobRow[data-job='curve']").click()
        page.wait_for_selector(".tfos-LossChart-line", timeout=30_000)
        assert "ckpt-290" in page.locator(".tfos-JobDetail-checkpoints").text_content()
        assert early in page.locator(".tfos-JobDetail-note").first.text_content()
        # The MLflow run the job logged to, as a link that opens in a new tab.
        run_link = page.locator(".tfos-JobDetail-mlflow a")
        assert run_link.get_attribute("href") == "http://127.0.0.1:5000/#/experiments/1/runs/0a1b2c3d"
        assert run_link.get_attribute("target") == "_blank"
        page.screenshot(path=str(shots / "sidebar-job.png"))

        # Stop the running job from its view; its kernel is busy with a cell meanwhile.
        running_job.execute("import time; time.sleep(20)")
        page.locator(".tfos-JobRow[data-job='live']").click()
        detail = page.locator(".tfos-JobDetail").filter(has_text="live").last
        detail.locator("button[data-action='stop']").click()
        page.wait_for_selector(badge.format("live") + ":text('stopped')", timeout=30_000)
        page.screenshot(path=str(shots / "sidebar-stopped.png"))
    job = get_job("live", str(home))
    assert job.state == "stopped", (job.state, job.error)
    assert any(e["kind"] == "checkpoint" and e.get("reason") == "stop" for e in job.events), "no stop checkpoint"
