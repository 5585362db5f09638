"""The `tfos` command line, run as real processes (`python -m tfos_magic.cli`, what the
console script runs): `tfos run` trains a job from a parameterized notebook on the real
`tfos` kernel; `tfos jobs` and `tfos status` read the store it left; `tfos submit`
trains that stored job again in a new process with no notebook, and reaches the same
loss; Ctrl-C stops a job at a checkpoint (or a notebook at its cell) and exits 130;
failures say what failed in one line and exit non-zero."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import nbformat
import pytest
from conftest import assert_stop_checkpoint, regression_cell, tf_processes_gone
from nbformat.v4 import new_code_cell, new_notebook

from tfos_magic import get_job
from tfos_magic.job import JobStore

ROOT = Path(__file__).parents[1]
JOB = "quickstart"  # trained by example-notebooks/quickstart.ipynb, which CI runs here
QUICKSTART = ROOT / "example-notebooks" / "quickstart.ipynb"
ROWS = 20000


def tfos(*args: str, env: dict[str, str], timeout: float = 240, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tfos_magic.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=cwd)


def write_notebook(path: Path, *sources: str, parameters: str | None = None) -> Path:
    cells = [new_code_cell(parameters, metadata={"tags": ["parameters"]})] if parameters else []
    nbformat.write(new_notebook(cells=cells + [new_code_cell(s) for s in sources]), path)
    return path


def outputs_text(path: Path) -> str:
    return "".join(o.get("text", "") + o.get("evalue", "") for c in nbformat.read(path, 4).cells
                   for o in c.get("outputs", []))


def interrupted(args: list[str], env: dict[str, str], ready, never: str, timeout: float = 180) -> tuple[int, str]:
    """Start `tfos ARGS` as a terminal would, and press Ctrl-C once `ready()`: SIGINT to its
    whole process group (Spark's JVM and the TF processes too). Returns (exit status, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "tfos_magic.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        deadline = time.time() + timeout
        while not ready():
            assert proc.poll() is None and time.time() < deadline, never
            time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    return proc.returncode, err


@pytest.fixture(scope="module")
def env(tmp_path_factory, tfos_kernel) -> dict[str, str]:
    """The environment of every `tfos` process: a store of its own, local[2] Spark, this
    tree's package, and the project's `tfos` kernel spec (JUPYTER_PATH, set by tfos_kernel)."""
    home = tmp_path_factory.mktemp("cli") / "home"
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, TFOS_HOME=str(home), TFOS_SPARK_MASTER="local[2]", PYTHONPATH=path)


@pytest.fixture(scope="module")
def trained(env, tmp_path_factory) -> dict:
    """`tfos run` of the quickstart example, its `rows` and `epochs` parameters set by -p."""
    folder = tmp_path_factory.mktemp("notebook")
    proc = tfos("run", str(QUICKSTART), "-p", f"rows={ROWS}", "-p", "epochs=3", "-o", str(folder / "train.out.ipynb"),
                "--html", str(folder / "train.html"), "--progress", "lines", env=env)
    return {"proc": proc, "folder": folder, "home": Path(env["TFOS_HOME"])}


@pytest.mark.e2e
@pytest.mark.spark35
def test_run_injects_the_parameters_and_writes_the_notebook_and_html(trained):
    proc, folder = trained["proc"], trained["folder"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = folder / "train.out.ipynb"
    injected = [c for c in nbformat.read(out, 4).cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and f"rows = {ROWS}" in injected[0].source and "epochs = 3" in injected[0].source
    # The notebook's own checks ran: a loss drop, and a held-out RMSE below half the mean's.
    assert "held-out RMSE" in outputs_text(out)
    assert "held-out RMSE" in (folder / "train.html").read_text()
    # The job ran in the kernel; this process followed it through the store.
    assert f"tfos {JOB}: run 1 started: 2 worker(s), 3 epoch(s)" in proc.stdout, proc.stdout
    assert f"tfos job '{JOB}' succeeded" in proc.stdout and "loss: final" in proc.stdout, proc.stdout
    # Only the run's own lines: Spark's JVM and TensorFlow's native logging go to the kernel's log.
    log = folder / "train.out.log"
    assert f"(the kernel's log: {log})" in proc.stdout, proc.stdout
    shown = proc.stdout + proc.stderr
    assert not [w for w in ("oneDNN", "cuInit", " WARN ", "absl::") if w in shown], shown
    assert len(shown.splitlines()) <= 40, shown
    assert log.stat().st_size > 0


@pytest.mark.e2e
def test_the_saved_notebook_keeps_the_dashboard_as_a_summary(trained):
    """What a headless run leaves in the file, read without a kernel: the live widget's
    output became the static summary (PNG curve, HTML, text), the widget state is saved
    for viewers such as GitHub, and nbconvert's HTML shows the curve: no dead boxes."""
    out = trained["folder"] / "train.out.ipynb"
    nb = nbformat.read(out, 4)
    train = next(c for c in nb.cells if c.source.startswith(f"%%tf_train {JOB}"))
    last = train.outputs[-1]
    assert last.output_type == "display_data", train.outputs
    assert {"image/png", "text/html", "text/plain"} <= set(last.data), last.data.keys()
    assert "application/vnd.jupyter.widget-view+json" not in last.data, "the live view became the summary"
    final = get_job(JOB, str(trained["home"])).history[-1]
    assert f"final {final['loss']:.4g}" in last.data["text/html"], last.data["text/html"][-600:]
    assert "val_loss" in last.data["text/plain"]
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]
    assert "state" in state and state["state"], "GitHub needs the widget state to render the file"
    html = subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "html", "--stdout", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert html.returncode == 0, html.stderr[-2000:]
    assert f"<img alt='loss curve of tfos job {JOB}'" in html.stdout.replace('"', "'")


@pytest.mark.e2e
def test_jobs_and_status_read_the_store_the_run_left(trained, env):
    job = get_job(JOB, str(trained["home"]))
    assert job.state == "succeeded", job.error
    table = tfos("jobs", env=env)
    assert table.returncode == 0, table.stderr
    assert JOB in table.stdout and "succeeded" in table.stdout, table.stdout
    (row,) = json.loads(tfos("jobs", "--json", env=env).stdout)
    last_step = max(e["step"] for e in job.events if e["kind"] in ("step", "epoch") and e["worker"] == 0)
    assert (row["job"], row["state"], row["step"]) == (JOB, "succeeded", last_step), row
    assert row["loss"] == pytest.approx(job.history[-1]["loss"])

    status = json.loads(tfos("status", JOB, "--json", env=env).stdout)
    assert status["options"]["workers"] == 2 and status["options"]["epochs"] == 3, status["options"]
    assert status["latest_checkpoint"] == job.latest_checkpoint and os.path.exists(job.latest_checkpoint + ".index")
    assert status["last_metrics"]["epoch"] == 3
    text = tfos("status", JOB, env=env).stdout
    assert "state: succeeded" in text and f"latest checkpoint: {job.latest_checkpoint}" in text, text

    # A run whose driver died reads `interrupted`: a copy of the job, `running` under a gone process.
    store = JobStore(trained["home"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(30)
    store.save_spec(job.spec.__class__.from_dict(dict(job.spec.to_dict(), name="lost")))
    store.write_state("lost", state="running", run=1, driver_pid=gone.pid, driver_host=socket.gethostname(),
                      heartbeat=time.time())
    rows = {r["job"]: r for r in json.loads(tfos("jobs", "--json", env=env).stdout)}
    assert rows["lost"]["state"] == "interrupted", rows["lost"]
    assert "tfos submit lost resumes it" in tfos("jobs", env=env).stdout


@pytest.mark.e2e
@pytest.mark.spark35
def test_submit_trains_the_stored_job_again_in_a_new_process(trained, env):
    home = trained["home"]
    before = get_job(JOB, str(home)).history
    assert len(before) == 3, before
    proc = tfos("submit", JOB, "--restart", "-p", f"rows={ROWS}", "-p", "workers=2", "--progress", "lines", env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"tfos job '{JOB}' succeeded" in proc.stdout, proc.stdout
    job = get_job(JOB, str(home))
    after = job.history
    assert [r["epoch"] for r in after] == [1, 2, 3], after
    assert job.spec.spark["master"] == "local[2]"
    # The same data, model and options: the same loss band, well below the first epoch's.
    first, final, again = before[0]["loss"], before[-1]["loss"], after[-1]["loss"]
    assert final < first / 3 and again < first / 3, (before, after)
    assert again < max(3 * final, 0.05) and final < max(3 * again, 0.05), (before, after)


@pytest.mark.e2e
def test_ctrl_c_stops_a_submitted_job_at_a_checkpoint_and_exits_130(trained, env):
    """Ctrl-C once the resumed run has taken steps: the workers checkpoint, then it exits 130."""
    home = trained["home"]
    run = JobStore(home).read_state(JOB)["run"] + 1
    rc, err = interrupted(["submit", JOB, "-p", f"rows={ROWS}", "-p", "workers=2", "--epochs", "200", "--progress", "bar"], env,
                          lambda: sum(e["kind"] == "step" and e.get("run") == run
                                      for e in get_job(JOB, str(home)).events) >= 2, "the resumed run took no steps")
    assert rc == 130, err[-3000:]
    assert f"job '{JOB}' stopped: `tfos submit {JOB}` continues it" in err, err[-3000:]
    assert "step" in err and "loss" in err, "the progress bar (tqdm writes to stderr)"
    job = get_job(JOB, str(home))
    assert job.state == "stopped" and job.error == "interrupted by the user", (job.state, job.error)
    assert_stop_checkpoint(job)
    assert tf_processes_gone(f"tfos-{JOB}-", timeout=30), "TF processes outlived the interrupt"


@pytest.mark.e2e
def test_run_of_a_failing_notebook_names_the_cell_and_its_error(env, tmp_path):
    notebook = write_notebook(tmp_path / "fails.ipynb", "import os\nx = 1\nos.write(2, b'native noise\\n')",
                              "raise ValueError(f'bad value {x + 41}')", "print('never')")
    proc = tfos("run", str(notebook), env=env, timeout=180)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "cell 2 (In [2]) failed: ValueError: bad value 42" in proc.stderr, proc.stderr
    # What the kernel's process wrote is in its log, whose path and last lines close the report.
    log = tmp_path / "fails.out.log"
    assert f"the kernel's log (Spark, TensorFlow): {log}; its last lines:" in proc.stderr, proc.stderr
    assert proc.stderr.count("native noise") == 1 and "native noise" in log.read_text(), proc.stderr
    assert "Traceback" not in proc.stderr and "never" not in outputs_text(tmp_path / "fails.out.ipynb")


@pytest.mark.e2e
def test_ctrl_c_interrupts_the_running_cell_and_runs_no_other(env, tmp_path):
    started = tmp_path / "started"
    notebook = write_notebook(tmp_path / "long.ipynb", f"import time\nopen({str(started)!r}, 'w').close()\n"
                              "time.sleep(120)", "print('the next cell ran')")
    rc, err = interrupted(["run", str(notebook)], env, started.exists, "the cell never started")
    assert rc == 130, err
    assert "interrupted in cell 1" in err, err
    assert "the next cell ran" not in outputs_text(tmp_path / "long.out.ipynb")


def test_missing_inputs_and_unknown_jobs_are_clear_errors(env, tfos_kernel, tmp_path, monkeypatch, capsys):
    from tfos_magic.cli.main import main

    empty = dict(env, TFOS_HOME=str(tmp_path / "empty"))
    # As real processes: the exit status and stderr a shell sees.
    proc = tfos("submit", "nosuch", env=empty, timeout=60)
    assert proc.returncode == 1 and "tfos: error: Unknown job 'nosuch'" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    proc = tfos("run", str(tmp_path / "absent.ipynb"), env=empty, timeout=60)
    assert proc.returncode == 1 and f"No notebook at {tmp_path / 'absent.ipynb'}" in proc.stderr, proc.stderr
    assert tfos("frobnicate", env=empty, timeout=60).returncode == 2  # argparse: a usage error

    # The other cases through the same entry point, in this process (no interpreter start each).
    monkeypatch.setenv("TFOS_HOME", str(tmp_path / "empty"))
    notebook = write_notebook(tmp_path / "nb.ipynb", "1")
    cases = [
        (["run", str(notebook), "--kernel", "no-such-kernel"], "No Jupyter kernel named 'no-such-kernel'"),
        (["run", str(notebook), "-p", "not a pair"], "a parameter is KEY=VALUE"),
        (["status", "nosuch"], "Unknown job 'nosuch'"),
        (["submit", "../escape"], "Invalid job name '../escape'"),
        (["status", "a b"], "Invalid job name 'a b'"),
    ]
    for args, message in cases:
        assert main(args) == 1, args
        assert message in capsys.readouterr().err, args
    assert main(["jobs"]) == 0 and "No tfos jobs" in capsys.readouterr().out
    assert main(["jobs", "--json"]) == 0 and capsys.readouterr().out.strip() == "[]"


def test_submit_names_the_notebook_parameter_a_stored_etl_cell_reads(spark, tfos_home, capsys):
    """The stored ETL cell reads `rows`, which its notebook's parameters cell defined: one
    line names it and says how to give it. (In this process, on the tests' Spark session.)"""
    from tfos_magic.cli.main import main
    from tfos_magic.job import JobSpec

    etl = "df = spark.range(rows).selectExpr('rand(1) AS x0', 'rand(2) AS y')\ndf\n"
    JobStore(tfos_home).save_spec(JobSpec("params", etl_source=etl,
                                          train_source=regression_cell(inputs=4, hidden=4, learning_rate=0.01)))
    assert main(["submit", "params", "--restart"]) == 1
    err = capsys.readouterr().err
    assert "The stored %%spark_etl cell of job 'params' failed: NameError: name 'rows' is not defined" in err, err
    assert "-p NAME=VALUE" in err and "Traceback" not in err, err


def test_parameters_are_python_literals_else_strings():
    from tfos_magic.cli.parameters import parse_parameters

    got = parse_parameters(["n=3", "lr=1e-3", "flag=True", "cols=['a', 'b']", "name=ratings", "text='x y'",
                            "path=/data/in.parquet", "empty="])
    assert got == {"n": 3, "lr": 0.001, "flag": True, "cols": ["a", "b"], "name": "ratings", "text": "x y",
                   "path": "/data/in.parquet", "empty": ""}


def test_the_console_script_names_the_cli_entry_point():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["tfos"].partition(":")
    import importlib

    entry = getattr(importlib.import_module(module), attr)
    assert callable(entry)
    with pytest.raises(SystemExit) as done:
        entry(["--help"])
    assert done.value.code == 0
