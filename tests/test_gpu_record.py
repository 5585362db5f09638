"""Which `gpu` samples metrics.jsonl keeps (driver/gpu_record.py): a fake device's
samples, one a second from two workers for ten minutes, on a fake clock."""

import math

from tfos_magic.driver.gpu_record import GpuRecord


def _gpu(worker: int, utilization: float, memory: float) -> dict:
    return {"kind": "gpu", "worker": worker, "rows": 0,
            "devices": [{"gpu": worker, "utilization": utilization, "memory_used": memory, "memory_total": 16000.0}]}


def _written(samples) -> list:
    record = GpuRecord()
    return [w for t, e in samples if (w := record.to_write(e, float(t))) is not None]


def test_a_steady_load_writes_one_sample_a_worker_every_30_s():
    samples = [(t, _gpu(w, 80.0 + (t % 3), 9000.0)) for t in range(600) for w in (0, 1)]
    written = _written(samples)
    assert len(written) == 2 * 20, len(written)  # 600 s / 30 s, each worker; 1,200 samples came


def test_a_wildly_swinging_load_is_bounded_by_the_gap_and_keeps_its_peaks():
    # Utilization swings 0-100 every second and memory climbs: every sample differs.
    samples = [(t, _gpu(w, 100.0 * (t % 2), 1000.0 + 20 * t)) for t in range(600) for w in (0, 1)]
    written = _written(samples)
    assert len(written) <= 2 * math.ceil(600 / 5), len(written)
    # The peaks of the samples a written one stands for are in it: the run's peak survives.
    assert max(d["peak_utilization"] for w in written for d in w["devices"]) == 100.0
    assert all(d.get("peak_memory_used", 0) >= d["memory_used"] for w in written for d in w["devices"])


def test_a_change_is_written_at_once_after_the_gap():
    samples = [(t, _gpu(0, 10.0, 1000.0)) for t in range(10)] + [(10, _gpu(0, 95.0, 1000.0))]
    written = _written(samples)
    assert [w["devices"][0]["utilization"] for w in written] == [10.0, 95.0]


def test_a_process_without_a_gpu_is_thinned_the_same_way():
    record = GpuRecord()
    events = [{"kind": "gpu", "worker": 0, "devices": [], "process": {"cpu_percent": 100.0, "rss_mb": 500.0}}
              for _ in range(60)]
    written = [w for t, e in enumerate(events) if (w := record.to_write(e, float(t))) is not None]
    assert len(written) == 2 and written[0]["process"]["peak_rss_mb"] == 500.0
