"""Resume after a kernel restart, with real kernels (jupyter_client): a background job's
kernel is SIGKILLed after a checkpoint; another process sees the job `interrupted`, the
dead kernel's TF processes are gone, and a new kernel's `%tfos_resume` finishes the job
from the checkpoint. Then the newest checkpoint is truncated, and a resume falls back to
the one before it, with a warning naming both."""

import os
import signal
import time
from pathlib import Path

import pytest
from conftest import keras3_cell, kernel_run, regression_cell, tf_processes, tf_processes_gone
from jupyter_client.manager import start_new_kernel

from tfos_magic import get_job

ETL = """%%spark_etl rs
from pyspark.sql import functions as F
df = spark.range(24000, numPartitions=2).select(*[F.rand(seed=i).alias(f"x{i}") for i in range(4)])
df.withColumn("y", 2 * F.col("x0") - 3 * F.col("x1") + 0.5 * F.col("x2") + F.col("x3") + 1.0)
"""
TRAIN = ("%%tf_train rs --workers 2 --epochs 3 --batch-size 32 --label y --checkpoint-every-steps 60 "
         "--background\n" + regression_cell(inputs=4, hidden=16, learning_rate=0.003))


def _events(home: Path, name: str = "rs") -> list[dict]:
    return get_job(name, str(home)).events if (home / f"jobs/{name}/metrics.jsonl").exists() else []


def _kernel(tfos_kernel):
    km, kc = start_new_kernel(kernel_name=tfos_kernel)
    return km, kc


def _close(km, kc) -> None:
    kc.stop_channels()
    km.shutdown_kernel(now=True)


def _kill_then_resume(tfos_kernel, home: Path, name: str, train: str) -> tuple:
    """Run `train` in the background in a kernel, SIGKILL the kernel after a checkpoint,
    see the job `interrupted` and its TF processes gone, then `%tfos_resume` it in a new
    kernel. Returns (that kernel's manager and client, the job, the checkpoint step)."""
    km, kc = _kernel(tfos_kernel)
    try:
        reply, out = kernel_run(kc, ETL.replace("rs", name, 1))
        assert reply["status"] == "ok", out
        reply, out = kernel_run(kc, train)
        assert reply["status"] == "ok", out
        deadline = time.time() + 240
        while not any(e["kind"] == "checkpoint" for e in _events(home, name)):
            assert time.time() < deadline, "no checkpoint before the kill"
            time.sleep(0.3)
        saved = max(e["step"] for e in _events(home, name) if e["kind"] == "checkpoint")
        assert len(tf_processes(f"tfos-{name}-")) == 2
        km.signal_kernel(signal.SIGKILL)
        killed = time.time()
    finally:
        _close(km, kc)

    # Another process (this one) reads the store.
    while get_job(name, str(home)).state != "interrupted":
        assert time.time() - killed < 30, f"still {get_job(name, str(home)).state!r} 30 s after the kill"
        time.sleep(0.5)
    assert tf_processes_gone(f"tfos-{name}-", timeout=60 - (time.time() - killed)), \
        "the dead kernel's TF processes outlived it by 60 s"

    km, kc = _kernel(tfos_kernel)
    try:
        reply, out = kernel_run(kc, "%tfos_jobs")
        assert "interrupted" in out, out
        reply, out = kernel_run(kc, f"%tfos_resume {name}", timeout=400)
        assert reply["status"] == "ok", out
        job = get_job(name, str(home))
        assert job.state == "succeeded", job.error
        resumed = [e for e in job.events if e["kind"] == "training" and e.get("run") == 2 and e["worker"] == 0]
        assert resumed and resumed[0]["initial_step"] >= saved, (resumed, saved)
        first_step = min(e["step"] for e in job.events if e["kind"] == "step" and e.get("run") == 2)
        assert first_step >= saved
        assert [row["epoch"] for row in job.history] == [1, 2, 3], job.history
        chief_epochs = [e["epoch"] for e in job.events if e["kind"] == "epoch" and e["worker"] == 0]
        assert sorted(chief_epochs) == sorted(set(chief_epochs)), f"an epoch was trained twice: {chief_epochs}"
    except BaseException:
        _close(km, kc)
        raise
    return km, kc, job, saved


@pytest.mark.e2e
def test_kernel_kill_then_resume_then_corrupt_checkpoint(tmp_path, monkeypatch, tfos_kernel):
    home = tmp_path / "home"
    monkeypatch.setenv("TFOS_HOME", str(home))
    monkeypatch.setenv("TFOS_SPARK_MASTER", "local[2]")
    km, kc, job, _ = _kill_then_resume(tfos_kernel, home, "rs", TRAIN)
    try:
        # Truncate the newest checkpoint's data: the next resume takes the one before it.
        ckpts = list(dict.fromkeys(e["path"] for e in job.events if e["kind"] == "checkpoint"))
        newest, previous = ckpts[-1], ckpts[-2]
        data = [p for p in Path(newest).parent.iterdir() if p.name.startswith(Path(newest).name + ".data")]
        assert data, newest
        with open(data[0], "r+b") as f:
            f.truncate(max(1, os.path.getsize(data[0]) // 3))
        reply, out = kernel_run(kc, "%tfos_resume rs --epochs 4", timeout=400)
        assert reply["status"] == "ok", out
        job = get_job("rs", str(home))
        assert job.state == "succeeded" and [r["epoch"] for r in job.history] == [1, 2, 3, 4], job.history
        third = [e for e in job.events if e.get("run") == 3]
        restored = [e["restored_from"] for e in third if e["kind"] == "training" and e["worker"] == 0]
        assert restored == [previous], (restored, previous, newest)
        warnings = [e["text"] for e in third if e["kind"] == "log" and "incomplete or corrupt" in e["text"]]
        assert warnings and newest in warnings[0] and previous in warnings[0], warnings
    finally:
        _close(km, kc)


@pytest.mark.e2e
def test_a_keras3_job_resumes_in_a_new_kernel(tmp_path, monkeypatch, tfos_kernel):
    """The same kill and `%tfos_resume` with the model written with `import keras`: the step
    loop restores the Keras 3 model and optimizer and goes on from the checkpoint."""
    home = tmp_path / "home"
    monkeypatch.setenv("TFOS_HOME", str(home))
    monkeypatch.setenv("TFOS_SPARK_MASTER", "local[2]")
    train = TRAIN.replace("%%tf_train rs", "%%tf_train rs3").split("\n")[0] + "\n" + \
        keras3_cell(inputs=4, hidden=16, learning_rate=0.003)
    km, kc, job, _ = _kill_then_resume(tfos_kernel, home, "rs3", train)
    try:
        reply, out = kernel_run(kc, "import keras\nfrom tfos_magic import get_job\n"
                                    "print('KERAS3', isinstance(get_job('rs3').load_model(), keras.Model))")
        assert reply["status"] == "ok" and "KERAS3 True" in out, out
        assert job.history[-1]["loss"] < 0.3 * job.history[0]["loss"], job.history
    finally:
        _close(km, kc)


@pytest.mark.e2e
def test_a_torch_job_resumes_in_a_new_kernel(tmp_path, monkeypatch, tfos_kernel):
    """The same kill and `%tfos_resume` for a %%torch_train job: the chief's torch.save
    checkpoint restores the module and its optimizer, and the run goes on from its step."""
    home = tmp_path / "home"
    monkeypatch.setenv("TFOS_HOME", str(home))
    monkeypatch.setenv("TFOS_SPARK_MASTER", "local[2]")
    train = TRAIN.replace("%%tf_train rs", "%%torch_train rst").split("\n")[0] + "\n" + """
import torch

def build_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1), torch.nn.Flatten(0))
    return model, torch.optim.Adam(model.parameters(), lr=0.003), torch.nn.MSELoss()
"""
    km, kc, job, saved = _kill_then_resume(tfos_kernel, home, "rst", train)
    try:
        assert any(e["kind"] == "training" and e.get("run") == 2 and (e.get("restored_from") or "").endswith(
            f"ckpt-{e['initial_step']}.pt") for e in job.events), "not restored from a torch checkpoint"
        reply, out = kernel_run(kc, "import torch\nfrom tfos_magic import get_job\n"
                                    "print('TORCH', isinstance(get_job('rst').load_model(), torch.nn.Module))")
        assert reply["status"] == "ok" and "TORCH True" in out, out
        assert job.history[-1]["loss"] < 0.2 * job.history[0]["loss"], job.history
    finally:
        _close(km, kc)
