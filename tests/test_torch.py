"""%%torch_train: PyTorch DistributedDataParallel on the same Arrow feed, job store,
dashboard events, checkpoints and resume as TensorFlow jobs (training/torch_runner.py).
The same job on the standalone cluster is in test_cluster.py, its kernel restart in
test_resume.py, and the MovieLens example under `tfos run` in test_examples.py."""

import json

import numpy as np
import pytest
from conftest import error_of, run, torch_cell
from test_faults import check_recovery

from tfos_magic import JobFailed, TfosError, get_job

pytestmark = pytest.mark.e2e

ETL = """%%spark_etl {name}
from pyspark.sql import functions as F
df = (spark.range({rows}, numPartitions=2).select(F.rand(1).alias("a"), F.rand(2).alias("b"), F.rand(3).alias("c"))
      .withColumn("y", 3 * F.col("a") - 2 * F.col("b") + F.col("c")))
val = spark.range(600).select(F.rand(4).alias("a"), F.rand(5).alias("b"), F.rand(6).alias("c")).withColumn(
    "y", 3 * F.col("a") - 2 * F.col("b") + F.col("c"))
df
"""
MODEL = torch_cell(inputs=3, hidden=16, learning_rate=0.01)


def _finished(job) -> list[dict]:
    return [e for e in job.events if e["kind"] == "finished" and e.get("role", "worker") == "worker"]


@pytest.mark.spark35
def test_a_torch_regression_trains_on_two_workers_and_loads_back(shell):
    _, err = run(shell, ETL.format(name="tr", rows=4000))
    assert err is None, err
    _, err = run(shell, "%%torch_train tr --workers 2 --epochs 4 --batch-size 64 --label y --validation-df val "
                        "--checkpoint-every-steps 10 --restart\n" + MODEL)
    assert err is None, err
    job = get_job("tr")
    assert job.state == "succeeded"
    history = job.history
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert all("val_loss" in h and "loss" in h for h in history), history
    assert history[-1]["loss"] < 0.2 * history[0]["loss"], history
    ends = [e for e in job.events if e["kind"] == "epoch"]
    by_epoch = {}
    for e in ends:
        by_epoch.setdefault(e["epoch"], []).append(e["metrics"]["loss"])
    assert all(len(v) == 2 and abs(v[0] - v[1]) < 1e-9 for v in by_epoch.values()), by_epoch
    # 2,000 rows a worker in batches of 64: 32 steps an epoch, agreed, on both workers.
    assert {e["step"] for e in ends} == {32, 64, 96, 128}, ends
    scheduled = [e["step"] for e in job.events if e["kind"] == "checkpoint" and e["reason"] == "schedule"]
    assert scheduled[:3] == [10, 20, 30], scheduled
    # Each process loaded PyTorch and never TensorFlow.
    assert [e["frameworks"] for e in _finished(job)] == [["torch"], ["torch"]], _finished(job)
    import torch

    model = job.load_model()
    assert isinstance(model, torch.nn.Module) and type(model).__name__ == "Net"
    every = shell.user_ns["val"].toPandas()
    features = every[["a", "b", "c"]].to_numpy("float32")
    with torch.no_grad():
        mine = model(torch.from_numpy(features)).numpy()
    mse = float(np.mean((mine - every["y"].to_numpy("float32")) ** 2))
    assert abs(mse - history[-1]["val_loss"]) <= 1e-4 * history[-1]["val_loss"] + 1e-6, (mse, history[-1])
    scored = job.predict(shell.user_ns["val"]).toPandas()
    np.testing.assert_allclose(scored["prediction"].to_numpy(), mine, atol=1e-5)


@pytest.mark.parametrize("second", [4000, 0])
def test_uneven_partitions_end_every_epoch(shell, second):
    """Worker 0 has 2,000 rows, worker 1 twice as many or none: every epoch ends, at the
    larger partition's step count on both workers, and the job trains."""
    name = f"truneven{second}"
    # range's two partitions are kept as the workers' (a plan that runs nothing when planned).
    _, err = run(shell, f"%%spark_etl {name}\nfrom pyspark.sql import functions as F\n"
                        "spark.range(0, 12000, numPartitions=2).where((F.col('id') < 2000) | "
                        f"((F.col('id') >= 6000) & (F.col('id') < 6000 + {second})))"
                        ".select(F.rand(1).alias('a'), F.rand(2).alias('b'), F.rand(3).alias('c'))"
                        ".withColumn('y', F.col('a') - F.col('b'))\n")
    assert err is None, err
    _, err = run(shell, f"%%torch_train {name} --workers 2 --epochs 3 --batch-size 100 --label y\n" + MODEL)
    assert err is None, err
    job = get_job(name)
    ends = {(e["worker"], e["epoch"]): e["step"] for e in job.events if e["kind"] == "epoch"}
    per_epoch = max(2000, second) // 100
    assert ends == {(w, n): per_epoch * n for w in (0, 1) for n in (1, 2, 3)}, ends
    assert job.history[-1]["loss"] < job.history[0]["loss"], job.history


def test_a_worker_killed_after_a_checkpoint_resumes_at_its_step(shell, monkeypatch):
    """Worker 1 dies at step 28 of the first epoch (SIGKILL, as the OOM killer would): the
    job resumes from the step-20 checkpoint on both workers, skips the rows those steps
    took, and ends at the unfaulted step count (3 epochs of 40 steps)."""
    run(shell, ETL.format(name="trfault", rows=8000))
    monkeypatch.setenv("TFOS_FAILPOINT", "streaming:1:27:0.0")
    _, err = run(shell, "%%torch_train trfault --workers 2 --epochs 3 --batch-size 100 --label y --validation-df val "
                        "--checkpoint-every-steps 10 --max-restarts 1 --restart\n" + MODEL)
    assert err is None, err
    job = get_job("trfault")
    assert job.state == "succeeded", job.error
    resumed = [e for e in job.events if e["attempt"] == 2 and e["kind"] == "training"]
    assert len(resumed) == 2 and all(e["initial_step"] == 20 and e["skipped_steps"] == 20 for e in resumed), resumed
    assert resumed[0]["restored_from"].endswith("ckpt-20.pt"), resumed
    check_recovery(job, "streaming:1:27", steps=120, loss=job.history[-1]["val_loss"], interval=10)
    assert [r["epoch"] for r in job.history] == [1, 2, 3]


def test_train_ctx_runs_a_loop_of_its_own(shell):
    """train(ctx): the cell's own DDP loop over ctx.dataloader(), with ctx.report, a
    checkpoint and the agreed stop check; the module it returns is saved and loads back,
    built again from its class."""
    run(shell, ETL.format(name="trctx", rows=2000))
    _, err = run(shell, "%%torch_train trctx --workers 2 --epochs 2 --batch-size 50 --label y\n" + '''
import torch
import torch.distributed as dist
from torch.distributed.algorithms.join import Join

class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def forward(self, x):
        return self.layer(x).squeeze(-1)

def train(ctx):
    torch.manual_seed(0)
    model = ctx.wrap(Linear())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = ctx.checkpoint(model=model.module, optimizer=optimizer)
    ckpt.restore()
    step = ckpt.step
    assert ctx.world_size == 2 and ctx.rank in (0, 1) and ctx.device.type == "cpu"
    for epoch in range(ckpt.epoch, ctx.epochs):
        losses = []
        with Join([model]):
            for x, y in ctx.dataloader():
                optimizer.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                optimizer.step()
                step += 1
                losses.append(float(loss))
        total = torch.tensor([sum(losses), len(losses)], dtype=torch.float64)
        dist.all_reduce(total)
        ctx.report(step=step, epoch=epoch + 1, loss=float(total[0] / total[1]))
        ckpt.save(step, epoch=epoch + 1, reason="epoch")
    return model
''')
    assert err is None, err
    job = get_job("trctx")
    assert job.state == "succeeded" and len(job.history) == 2, job.history
    assert job.history[-1]["loss"] < job.history[0]["loss"], job.history
    assert [e["step"] for e in job.events if e["kind"] == "checkpoint"] == [20, 40]
    import torch

    model = job.load_model()
    assert type(model).__name__ == "Linear" and isinstance(model, torch.nn.Module)



def test_wrong_cells_and_options_are_named(shell):
    run(shell, ETL.format(name="trbad", rows=200))
    err = error_of(shell, "%%torch_train trbad --label y\ndef build_model():\n    return object()\n")
    assert isinstance(err, JobFailed) and "(model, optimizer, loss_fn)" in str(err) and "object" in str(err), err
    err = error_of(shell, "%%torch_train trbad --label y --strategy ps\n" + MODEL)
    assert isinstance(err, TfosError) and "DistributedDataParallel" in str(err), err
    err = error_of(shell, "%%torch_train trbad --label y --sample-weight a\n" + MODEL)
    assert isinstance(err, TfosError) and "--sample-weight" in str(err) and "train(ctx)" in str(err), err
    err = error_of(shell, "%%torch_train trbad --label y\n" + MODEL + "\ndef callbacks():\n    return []\n")
    assert isinstance(err, TfosError) and "callbacks()" in str(err), err
    err = error_of(shell, "%%tf_train trbad --label y --framework torch\n" + MODEL)
    assert isinstance(err, TfosError) and "%%torch_train" in str(err), err
    # A module that cannot be built again where it is loaded fails its job, not "succeeds".
    err = error_of(shell, "%%torch_train trbad --label y --max-restarts 0\n" + '''
import torch

class Needs(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.layer = torch.nn.Linear(width, 1)

    def forward(self, x):
        return self.layer(x)

def train(ctx):
    for batch in ctx.dataloader():
        pass
    return Needs(3)
''')
    assert isinstance(err, JobFailed) and "Needs() failed" in str(err) and "build_model()" in str(err), err
    assert get_job("trbad").state == "failed"
