"""The dashboard's model, widget updates, summary and GPU sampler, driven by scripted
event streams and a fake GPU (fast, pure logic); the real runs are in test_browser.py and test_cli.py (a saved notebook's summary)."""

import base64
import time

import numpy as np

from tfos_magic.training.gpu_sampler import GpuSampler, sample, visible_indexes
from tfos_magic.ui import summary
from tfos_magic.ui.model import DashboardModel
from tfos_magic.ui.widget import DashboardObserver


def _ev(kind, worker=0, **fields):
    return {"v": 1, "time": time.time(), "kind": kind, "worker": worker, **fields}


def _script(workers=2, steps=50, epochs=2):
    """started, training, steps from both workers, epochs with val_loss, checkpoints, gpu, an error."""
    events = [_ev("spark", done=1, total=4)]
    events += [_ev("started", w, role="worker", pid=100 + w) for w in range(workers)]
    events.append(_ev("training", 0, initial_step=0, initial_epoch=0, restored_from=None))
    step = 0
    for epoch in range(1, epochs + 1):
        for _ in range(steps):
            step += 1
            for w in range(workers):
                events.append(_ev("step", w, step=step, metrics={"loss": 1.0 / step, "rows_per_s": 1000.0},
                                  rows=step * 64))
        events.append(_ev("epoch", 0, epoch=epoch, step=step, metrics={"loss": 1.0 / step, "val_loss": 2.0 / step,
                                                                       "rows_per_s": 900.0}))
        events.append(_ev("checkpoint", 0, path=f"/ck/ckpt-{step}", step=step, epoch=epoch))
    return events


class FakeGpus:
    """Two devices with fixed readings, as NVML would give them."""

    def devices(self):
        return [0, 1]

    def read(self, index):
        return {"utilization": 50.0 + index, "memory_used": 1000.0, "memory_total": 16000.0,
                "temperature": 60.0, "power": 120.0}


def test_model_follows_a_scripted_run():
    model = DashboardModel("j", workers=2, epochs=3)
    events = _script()
    model.feed(events[0])
    assert model.phase == "Spark is computing the DataFrame: 1 of 4 tasks done"
    model.feed(events[1])
    assert model.phase == "TF processes starting: 1 of 2 (cold start: each process loads TensorFlow)"
    for e in events[2:]:
        model.feed(e)
    status = model.status()
    assert status["epoch"] == 2 and status["step"] == 100 and status["total_steps"] == 150  # 50 steps an epoch
    assert status["rows"] == 2 * 100 * 64
    assert [c["step"] for c in status["checkpoints"]] == [100, 50], "newest first"
    assert model.val_loss.y == [2.0 / 50, 2.0 / 100]
    assert model.eta() is not None and model.final_loss() == 1.0 / 100
    model.feed(_ev("gpu", 1, **sample(FakeGpus())))
    model.feed(_ev("gpu", 0, devices=[], process={"cpu_percent": 90.0, "rss_mb": 800.0}))
    gpu = model.status()["gpu"]
    assert gpu["1"][1] == {"utilization": 51.0, "memory_used": 1000.0, "memory_total": 16000.0, "temperature": 60.0,
                           "power": 120.0, "gpu": 1}
    assert gpu["0"] == [{"cpu_percent": 90.0, "rss_mb": 800.0, "gpu": None}]
    assert model.peak_gpu[1]["utilization"] == 51.0
    model.feed(_ev("error", 1, role="worker", message="ValueError: bad", details_file="/e.txt"))
    assert model.status()["error"] == "worker 1: ValueError: bad" and model.status()["error_file"] == "/e.txt"


def test_ticks_send_only_new_points_as_binary_appends():
    view = DashboardObserver("j", epochs=2, workers=2)
    sent = []
    view.widget.send = lambda content, buffers=None: sent.append((content, buffers))
    events = _script(steps=30)
    for e in events[:40]:
        view.on_event(e)
    view._push(force=True)
    for e in events[40:]:
        view.on_event(e)
    view.on_log("[worker 0] hello")
    view._push(force=True)
    appends = [(c, b) for c, b in sent if c["type"] == "append"]
    total = {}
    for content, buffers in appends:
        assert len(buffers) == 2 * len(content["series"])
        for i, (name, n) in enumerate(content["series"]):
            xs = np.frombuffer(buffers[2 * i], np.float64)
            ys = np.frombuffer(buffers[2 * i + 1], np.float64)
            assert len(xs) == len(ys) == n
            total.setdefault(name, []).extend(xs.tolist())
    # Every point went out exactly once, in order: deltas, never the whole series again.
    assert total["loss/worker 0"] == [float(s) for s in range(1, 61)]
    assert total["loss/worker 1"] == [float(s) for s in range(1, 61)]
    assert total["val_loss"] == [30.0, 60.0]
    assert view.sent_points == 60 + 60 + 2
    assert ["[worker 0] hello"] in [c["logs"] for c, _ in appends]
    assert view.widget.status["step"] == 60


def test_snapshot_is_decimated_and_keeps_the_last_point():
    model = DashboardModel("j")
    for step in range(1, 5001):
        model.feed(_ev("step", 0, step=step, metrics={"loss": float(step)}))
    xs, ys = model.snapshot()["loss/worker 0"]
    assert len(xs) <= 2000 and xs[0] == 1 and xs[-1] == 5000 and ys[-1] == 5000.0


def test_summary_bundle_reads_without_a_kernel():
    model = DashboardModel("j", workers=2, epochs=2)
    for e in _script():
        model.feed(e)
    model.feed(_ev("gpu", 0, devices=[], process={"cpu_percent": 90.0, "rss_mb": 800.0}))
    model.end("succeeded")
    out = summary.bundle(model)
    assert base64.b64decode(out["image/png"]).startswith(b"\x89PNG")
    assert "<img" in out["text/html"] and "final 0.01" in out["text/html"]
    assert out["text/plain"].startswith("tfos job 'j' succeeded in ")
    assert "worker 0: no GPU" in out["text/plain"] and "/ck/ckpt-100" in out["text/plain"]


def test_gpu_sampler_reads_a_fake_device_and_no_gpu_gives_process_stats():
    readings = []
    sampler = GpuSampler(readings.append, FakeGpus(), interval=0.05).start()
    deadline = time.time() + 5
    while len(readings) < 2 and time.time() < deadline:
        time.sleep(0.02)
    sampler.close()
    assert readings and [d["gpu"] for d in readings[0]["devices"]] == [0, 1]
    assert readings[0]["devices"][0]["utilization"] == 50.0
    # This machine has no GPU: NVML finds none, and the reading is the process's own load.
    from tfos_magic.training.gpu_sampler import default_source

    assert default_source() is None
    none = sample(None)
    assert none["devices"] == [] and set(none["process"]) == {"cpu_percent", "rss_mb"}
    assert visible_indexes(4, {"CUDA_VISIBLE_DEVICES": "2,0"}) == [2, 0]
    assert visible_indexes(2, {}) == [0, 1]


def test_checkpoint_sizes_are_read_from_local_files(tmp_path):
    from tfos_magic.ui.widget import checkpoint_size

    (tmp_path / "ckpt-7.index").write_bytes(b"x" * 10)
    (tmp_path / "ckpt-7.data-00000-of-00001").write_bytes(b"x" * 90)
    (tmp_path / "ckpt-70.index").write_bytes(b"x" * 1000)
    assert checkpoint_size(str(tmp_path / "ckpt-7")) == 100
    assert checkpoint_size("hdfs://nn/ck/ckpt-7") is None
    view = DashboardObserver("j", epochs=1, workers=1)
    view.on_event(_ev("checkpoint", 0, path=str(tmp_path / "ckpt-7"), step=7, epoch=1))
    assert view.model.status()["checkpoints"][0]["size"] == 100


def test_the_start_up_line_says_whether_the_tf_processes_started_warm():
    cold = DashboardModel(job="j", workers=2)
    cold.feed(_ev("started", 0, role="worker"))
    assert cold.phase == "TF processes starting: 1 of 2 (cold start: each process loads TensorFlow)"
    cold.feed(_ev("step", 0, step=1, metrics={"loss": 1.0}))
    assert cold.phase == "training", "a cold start is not worth a note once training"
    warm = DashboardModel(job="j", workers=2)
    warm.feed(_ev("started", 0, role="worker", warm=True))
    warm.feed(_ev("started", 1, role="worker", warm=False))
    assert warm.phase == "TF cluster joining, first step building (warm start: 1 of 2 processes)"
    warm.feed(_ev("attempt", attempt=2))  # a new attempt starts its own processes
    for w in range(2):
        warm.feed(_ev("started", w, role="worker", warm=True))
    warm.feed(_ev("step", 0, step=1, metrics={"loss": 1.0}))
    assert warm.phase == "training (warm start)"


def test_a_pytorch_job_is_named_as_such_while_it_starts():
    model = DashboardModel(job="j", workers=2)
    model.feed(_ev("task", 0, role="worker", framework="torch"))
    assert model.phase == "Spark tasks of the training stage running; PyTorch processes starting"
    model.feed(_ev("started", 0, role="worker", framework="torch"))
    assert model.phase == "PyTorch processes starting: 1 of 2 (cold start: each process loads PyTorch)"
    model.feed(_ev("started", 1, role="worker", framework="torch"))
    assert model.phase.startswith("PyTorch cluster joining")
