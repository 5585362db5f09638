"""The loss curve the dashboard, the summary and the sidebar plot has no cliff at an epoch
boundary: a `build_model()` job's step events carry the mean loss of each reporting
interval (keras_fit.TfosCallback), not Keras' running mean since the epoch began, which
drops at every epoch's start as it forgets the early, larger losses (ps mode's own loop
kept the same running mean)."""

import pytest
from conftest import keras3_cell, regression_cell, run

from tfos_magic import get_job
from tfos_magic.ui.model import DashboardModel

pytestmark = pytest.mark.e2e

ETL = """%%spark_etl {name}
from pyspark.sql import functions as F
df = spark.range(100000, numPartitions=1).select(*[F.rand(seed=i).alias(f"x{{i}}") for i in range(4)])
df.withColumn("y", 2 * F.col("x0") - 3 * F.col("x1") + F.col("x2") + 0.5 * F.randn(seed=9))
"""


@pytest.mark.parametrize("keras", ["legacy", "keras3", "ps"])
def test_the_plotted_loss_has_no_cliff_at_the_epoch_boundary(shell, keras):
    """The model reaches the label's noise floor (0.25) early in epoch 1; Keras' running mean
    still holds the first steps' losses at the epoch's end, and starts afresh at the floor."""
    name = f"curve{keras}"
    cell = (keras3_cell if keras == "keras3" else regression_cell)(inputs=4, hidden=16, learning_rate=0.01)
    run(shell, ETL.format(name=name))
    # One step a call and the spill read each epoch: several reports an epoch on this machine.
    strategy = "--strategy ps --ps 1 " if keras == "ps" else ""
    _, err = run(shell, f"%%tf_train {name} {strategy}--epochs 2 --batch-size 8 --label y --steps-per-call 1 "
                        f"--memory-cache 0 --restart\n" + cell)
    assert err is None, err
    job = get_job(name)
    model = DashboardModel(job=name)
    for event in job.events:
        model.feed(event)
    steps, losses = model.loss[0].x, model.loss[0].y
    boundary = next(e["step"] for e in job.events if e["kind"] == "epoch" and e["epoch"] == 1)
    first = [(s, v) for s, v in zip(steps, losses) if s <= boundary]
    second = [v for s, v in zip(steps, losses) if s > boundary]
    assert len(first) >= 3 and len(second) >= 3, (steps, boundary)
    noise = max(abs(a - b) for a, b in zip(second, second[1:]))
    drop = first[-1][1] - second[0]
    assert drop <= 2 * noise + 1e-3, f"a step down of {drop:.4g} at the epoch boundary, noise {noise:.4g}: {losses}"
    # The raw running mean is still there, for who wants Keras' own number.
    raw = [e["metrics"]["loss_epoch_mean"] for e in job.events if e["kind"] == "step"]
    assert raw and all(v > 0 for v in raw)
