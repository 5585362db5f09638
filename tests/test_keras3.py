"""Keras 3 models (`import keras`): the step loop of training/keras3_loop.py trains them
on every worker, with the feed, validation, checkpoints, resume, predict and export of
the legacy path; ps mode refuses them at once, naming the fixes. The same job on the
standalone cluster is in test_cluster.py, its kernel restart in test_resume.py."""

import time

import numpy as np
import pytest
from conftest import error_of, keras3_cell, run
from test_faults import check_recovery

from tfos_magic import JobFailed, TfosError, get_job

pytestmark = pytest.mark.e2e

ETL = """%%spark_etl {name}
from pyspark.sql import functions as F
df = (spark.range({rows}, numPartitions=2).select(F.rand(1).alias("a"), F.rand(2).alias("b"), F.rand(3).alias("c"))
      .withColumn("y", 3 * F.col("a") - 2 * F.col("b") + F.col("c")))
val = df.limit(600)
df
"""
MODEL = keras3_cell(inputs=3, hidden=16, learning_rate=0.01, metrics='["mae"]')



def test_a_keras3_model_trains_on_two_workers_and_loads_back(shell, tmp_path):
    _, err = run(shell, ETL.format(name="k3", rows=4000))
    assert err is None, err
    _, err = run(shell, "%%tf_train k3 --workers 2 --epochs 4 --batch-size 64 --label y --validation-df val "
                        "--checkpoint-every-steps 10 --restart\n" + MODEL)
    assert err is None, err
    job = get_job("k3")
    assert job.state == "succeeded"
    # Each TF process loaded TensorFlow and never PyTorch (installed here too).
    assert [e.get("frameworks") for e in job.events if e["kind"] == "finished"] == [["tensorflow"]] * 2
    history = job.history
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert all("val_loss" in h and "val_mae" in h and "mae" in h for h in history), history
    assert history[-1]["loss"] < 0.3 * history[0]["loss"], history
    # Both workers report the same job-level metrics: each epoch's values are read across workers.
    ends = [e for e in job.events if e["kind"] == "epoch"]
    by_epoch = {}
    for e in ends:
        by_epoch.setdefault(e["epoch"], []).append(e["metrics"]["loss"])
    assert all(len(v) == 2 and abs(v[0] - v[1]) < 1e-6 for v in by_epoch.values()), by_epoch
    # 2,000 rows a worker in batches of 64; the streamed first epoch may end with one empty step.
    first = min(e["step"] for e in ends)
    assert first in (32, 33) and {e["step"] for e in ends} == {first + 32 * n for n in range(4)}, ends
    import keras
    import tensorflow as tf

    model = job.load_model()
    assert isinstance(model, keras.Model), type(model)
    rows = shell.user_ns["val"].limit(50).toPandas()
    features = rows[["a", "b", "c"]].to_numpy("float32")
    mine = model.predict(features, verbose=0)[:, 0]
    scored = job.predict(shell.user_ns["val"].limit(50)).toPandas()
    np.testing.assert_allclose(scored["prediction"].to_numpy(), mine, atol=1e-3)
    # The validation loss in history is the saved model's on the same rows.
    every = shell.user_ns["val"].toPandas()
    mse = float(np.mean((model.predict(every[["a", "b", "c"]].to_numpy("float32"), verbose=0)[:, 0]
                         - every["y"].to_numpy("float32")) ** 2))
    assert abs(mse - history[-1]["val_loss"]) <= 0.01 * history[-1]["val_loss"] + 1e-6, (mse, history[-1])
    served = tf.saved_model.load(job.export(str(tmp_path / "served")))
    out = served.signatures["serving_default"](features=tf.constant(features))
    np.testing.assert_allclose(out["prediction"].numpy()[:, 0], mine, atol=1e-4)


@pytest.mark.parametrize("second", [4000, 0])
def test_uneven_partitions_end_every_epoch(shell, second):
    """Worker 0 has 4,000 rows, worker 1 half as many or none: every epoch ends, at the
    larger partition's step count on both workers."""
    name = f"k3uneven{second}"
    run(shell, f"%%spark_etl {name}\nfrom pyspark.sql import functions as F\n"
               f"spark.range(0, 8000, numPartitions=2).where(F.col('id') < {4000 + second // 2})"
               ".select(F.rand(1).alias('a'), F.rand(2).alias('b'), F.rand(3).alias('c'))"
               ".withColumn('y', F.col('a') - F.col('b'))\n")
    _, err = run(shell, f"%%tf_train {name} --workers 2 --epochs 3 --batch-size 100 --label y\n" + MODEL)
    assert err is None, err
    job = get_job(name)
    ends = {(e["worker"], e["epoch"]): e["step"] for e in job.events if e["kind"] == "epoch"}
    first = ends[(0, 1)]
    assert first in (40, 41) and ends == {(w, n): first + 40 * (n - 1) for w in (0, 1) for n in (1, 2, 3)}, ends
    assert job.history[-1]["loss"] < job.history[0]["loss"], job.history


def test_a_worker_killed_after_a_checkpoint_resumes_at_its_step(shell, monkeypatch):
    run(shell, ETL.format(name="k3fault", rows=8000))
    monkeypatch.setenv("TFOS_FAILPOINT", "streaming:1:27:0.0")
    _, err = run(shell, "%%tf_train k3fault --workers 2 --epochs 3 --batch-size 100 --label y --validation-df val "
                        "--checkpoint-every-steps 10 --max-restarts 1 --restart\n" + MODEL)
    assert err is None, err
    job = get_job("k3fault")
    assert job.state == "succeeded", job.error
    resumed = [e for e in job.events if e["attempt"] == 2 and e["kind"] == "training"]
    assert resumed and all(e["initial_step"] == 20 for e in resumed), resumed
    check_recovery(job, "streaming:1:27", steps=120, loss=job.history[-1]["val_loss"], step_slack=1, interval=10)
    assert [r["epoch"] for r in job.history] == [1, 2, 3]


def test_keras3_callbacks_act_on_the_job_and_tensorboard_logs(shell, capsys):
    run(shell, ETL.format(name="k3cb", rows=2000))
    capsys.readouterr()
    _, err = run(shell, "%%tf_train k3cb --workers 2 --epochs 6 --batch-size 50 --label y --restart\n" + MODEL + """
def callbacks():
    # No epoch improves on the first by 10: EarlyStopping stops after the second.
    return [keras.callbacks.EarlyStopping(monitor="loss", patience=1, min_delta=10.0),
            keras.callbacks.ReduceLROnPlateau(monitor="loss", patience=0, min_delta=10.0, factor=0.5)]
""")
    assert err is None, err
    job = get_job("k3cb")
    assert job.state == "succeeded", job.error
    assert [h["epoch"] for h in job.history] == [1, 2], job.history
    assert [round(h["lr"], 6) for h in job.history] == [0.01, 0.005], job.history
    stopped = [e for e in job.events if e["kind"] == "stopped_early"]
    assert stopped and "EarlyStopping: loss did not improve" in stopped[0]["reason"], stopped
    import glob
    import os

    assert job.tensorboard_dir == os.path.join(job.dir, "logs")
    assert glob.glob(os.path.join(job.tensorboard_dir, "**", "events.out.tfevents.*"), recursive=True), "no TensorBoard"
    assert f"TensorBoard: %tensorboard --logdir {job.tensorboard_dir}" in capsys.readouterr().out


def test_train_ctx_with_a_keras3_model_under_the_strategy(shell):
    run(shell, ETL.format(name="k3ctx", rows=2000))
    _, err = run(shell, "%%tf_train k3ctx --workers 2 --epochs 2 --batch-size 50 --label y\n" + '''
import keras
import tensorflow as tf

def train(ctx):
    with ctx.strategy.scope():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        optimizer = keras.optimizers.SGD(0.1)
        optimizer.build(model.trainable_variables)

    @tf.function
    def step(batch):
        def replica(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((model(x, training=True)[:, 0] - y) ** 2) / ctx.strategy.num_replicas_in_sync
            optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
            return loss
        return ctx.strategy.reduce("SUM", ctx.strategy.run(replica, args=batch), axis=None)

    for epoch in range(ctx.epochs):
        losses = [float(step(b)) for b in ctx.distributed_dataset()]
        ctx.report(step=int(optimizer.iterations.numpy()), epoch=epoch + 1, loss=sum(losses) / len(losses))
    return model
''')
    assert err is None, err
    job = get_job("k3ctx")
    assert job.state == "succeeded" and len(job.history) == 2
    assert job.history[-1]["loss"] < job.history[0]["loss"], job.history
    import keras

    assert isinstance(job.load_model(), keras.Model)


def test_ps_mode_refuses_a_keras3_model_at_once_naming_the_fix(shell):
    run(shell, ETL.format(name="k3ps", rows=400))
    started = time.monotonic()
    err = error_of(shell, "%%tf_train k3ps --strategy ps --ps 1 --workers 1 --label y --max-restarts 2\n" + MODEL)
    assert isinstance(err, JobFailed), err
    assert "Keras 3" in str(err) and "--strategy allreduce" in str(err) and "tf_keras" in str(err), err
    assert time.monotonic() - started < 60
    job = get_job("k3ps")
    assert job.state == "failed" and {e["attempt"] for e in job.events} == {1}, "no restart spent"


def test_wrong_models_are_named_with_their_keras(shell):
    run(shell, ETL.format(name="k3bad", rows=200))
    err = error_of(shell, "%%tf_train k3bad --label y\ndef build_model():\n    return object()\n")
    assert isinstance(err, JobFailed) and "builtins.object" in str(err) and "Keras 3 model" in str(err), err
    err = error_of(shell, "%%tf_train k3bad --label y\n" + MODEL.replace(
        "    m = keras.Sequential", "    m = keras.layers.Dense(1)\n    return m\n    m = keras.Sequential"))
    assert isinstance(err, JobFailed) and "keras.src.layers.core.dense.Dense (Keras 3." in str(err), err
    err = error_of(shell, "%%tf_train k3bad --label y\n" + MODEL.replace(
        "    m.compile", "    cb = 1\n    m.compile") + "\ndef callbacks():\n    import tensorflow as tf\n"
        "    return [tf.keras.callbacks.EarlyStopping()]\n")
    assert isinstance(err, JobFailed) and "keras callbacks for this model (a Keras 3 model)" in str(err), err


def test_a_keras3_model_on_another_backend_names_the_fix(monkeypatch):
    """Keras picks its backend once, at import: a model built on JAX or torch holds no
    TensorFlow variables for the strategy. (Neither backend is installed here: the
    answer of keras.backend.backend() is what tfos reads.)"""
    import keras

    from tfos_magic.training.keras3_loop import check_model

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    assert check_model(model) == "keras"
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(TfosError, match="on the jax backend.*KERAS_BACKEND"):
        check_model(model)
