"""ps mode's one validation loss per epoch: each worker's share of the validation rows,
weighed by rows, in the history (job/digest.py) and on the dashboard (ui/model.py)."""

from tfos_magic.job.digest import JobDigest
from tfos_magic.ui.model import DashboardModel


def _epoch(worker: int, epoch: int, step: int, val_loss: float, rows: int | None) -> dict:
    metrics = {"loss": 1.0, "val_loss": val_loss}
    if rows is not None:
        metrics["val_rows"] = rows
    return {"kind": "epoch", "worker": worker, "epoch": epoch, "step": step, "metrics": metrics, "time": 1.0}


def test_the_history_weighs_the_shares_by_rows_and_a_resumed_epoch_replaces_its_share():
    events = [_epoch(0, 1, 100, 0.5, 600), _epoch(1, 1, 90, 0.8, 900),
              _epoch(1, 2, 180, 0.4, 900), _epoch(0, 2, 200, 0.2, 600),
              _epoch(0, 2, 210, 0.3, 600)]  # a resumed run's report of epoch 2 from the chief
    history = JobDigest.of(events).history
    assert [round(r["val_loss"], 6) for r in history] == [round((0.5 * 600 + 0.8 * 900) / 1500, 6),
                                                           round((0.3 * 600 + 0.4 * 900) / 1500, 6)]
    assert [r["val_rows"] for r in history] == [1500, 1500]


def test_all_reduce_rows_are_the_chiefs_as_before():
    history = JobDigest.of([_epoch(0, 1, 100, 0.5, None), _epoch(1, 1, 100, 0.5, None)]).history
    assert history == [{"epoch": 1, "loss": 1.0, "val_loss": 0.5}]


def test_the_dashboard_plots_an_epochs_validation_once_every_worker_scored_its_share():
    model = DashboardModel(job="ps", workers=2)
    model.feed(_epoch(0, 1, 100, 0.5, 600))
    assert model.val_loss.y == [], "half the rows are not the job's loss"
    model.feed(_epoch(1, 1, 90, 0.8, 900))
    assert model.val_loss.x == [100.0] and model.val_loss.y == [(0.5 * 600 + 0.8 * 900) / 1500]
    model.feed(_epoch(1, 2, 180, 0.4, 900))  # the other worker first, this time
    model.feed(_epoch(0, 2, 200, 0.2, 600))
    assert model.val_loss.x == [100.0, 200.0] and model.val_loss.y[-1] == (0.2 * 600 + 0.4 * 900) / 1500
