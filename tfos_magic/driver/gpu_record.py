"""Which `gpu` events go to metrics.jsonl.

Every TF process samples its GPUs (or its CPU and memory) about once a second, and the
live dashboard takes every sample from the channel. The job's file keeps fewer: a
worker's sample is written when it differs from the worker's last written one by more
than a threshold, or when the last one is older than `every_s`, and never more often
than `min_gap_s`. A written sample carries the peaks of the samples it stands for
(`peak_utilization`, `peak_memory_used`; `peak_cpu_percent`, `peak_rss_mb`), so the
summary's peaks are the run's. At the defaults a worker adds at most one line every
5 s, and one every 30 s while its load holds steady, where it was one a second.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

EVERY_S = 30.0  # a steady worker's sample is written this often
MIN_GAP_S = 5.0  # and no worker's more often than this
UTILIZATION_POINTS = 10.0  # a change in utilization or CPU % (percentage points) worth writing
MEMORY_SHARE = 0.05  # a change in memory worth writing: this share of the device's total (or of the last RSS)
PEAKS = {"utilization": "peak_utilization", "memory_used": "peak_memory_used",
         "cpu_percent": "peak_cpu_percent", "rss_mb": "peak_rss_mb"}


@dataclass
class _Worker:
    written: dict[str, float] = field(default_factory=dict)  # the last written sample, flattened
    at: float | None = None  # when it was written
    peaks: dict[str, float] = field(default_factory=dict)  # since then, flattened keys


def _flatten(event: dict[str, Any]) -> dict[str, float]:
    """"gpu0/utilization" -> value, and "process/cpu_percent" -> value, for the numbers."""
    out: dict[str, float] = {}
    for device in event.get("devices") or []:
        for key, value in device.items():
            if key != "gpu" and isinstance(value, (int, float)):
                out[f"gpu{device.get('gpu')}/{key}"] = float(value)
    for key, value in (event.get("process") or {}).items():
        if isinstance(value, (int, float)):
            out[f"process/{key}"] = float(value)
    return out


def _changed(now: dict[str, float], before: dict[str, float]) -> bool:
    if now.keys() != before.keys():
        return True
    for key, value in now.items():
        where, name = key.split("/", 1)
        old = before[key]
        if name in ("utilization", "cpu_percent") and abs(value - old) >= UTILIZATION_POINTS:
            return True
        if name == "memory_used" and abs(value - old) >= MEMORY_SHARE * now.get(f"{where}/memory_total", old or 1.0):
            return True
        if name == "rss_mb" and abs(value - old) >= MEMORY_SHARE * max(old, 1.0):
            return True
    return False


class GpuRecord:
    """Decides, per worker, whether a `gpu` event is written; adds the peaks to those that are."""

    def __init__(self, every_s: float = EVERY_S, min_gap_s: float = MIN_GAP_S) -> None:
        self.every_s, self.min_gap_s = every_s, min_gap_s
        self._workers: dict[tuple[str, Any], _Worker] = {}

    def to_write(self, event: dict[str, Any], now: float) -> dict[str, Any] | None:
        """The event to append to metrics.jsonl (a copy with its peaks), or None to skip it."""
        worker = self._workers.setdefault((event.get("role", "worker"), event.get("worker")), _Worker())
        reading = _flatten(event)
        for key, value in reading.items():
            if key.split("/", 1)[1] in PEAKS:
                worker.peaks[key] = max(worker.peaks.get(key, value), value)
        if worker.at is not None:
            since = now - worker.at
            if since < self.min_gap_s or (since < self.every_s and not _changed(reading, worker.written)):
                return None
        written = _with_peaks(event, worker.peaks)
        worker.written, worker.at, worker.peaks = reading, now, {}
        return written


def _with_peaks(event: dict[str, Any], peaks: dict[str, float]) -> dict[str, Any]:
    out = dict(event)
    devices = []
    for device in event.get("devices") or []:
        device = dict(device)
        for key, peak in PEAKS.items():
            if f"gpu{device.get('gpu')}/{key}" in peaks:
                device[peak] = peaks[f"gpu{device.get('gpu')}/{key}"]
        devices.append(device)
    if devices:
        out["devices"] = devices
    if event.get("process"):
        process = dict(event["process"])
        for key, peak in PEAKS.items():
            if f"process/{key}" in peaks:
                process[peak] = peaks[f"process/{key}"]
        out["process"] = process
    return out
