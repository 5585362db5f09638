"""Samples the GPUs a TF process owns, about once a second, as `gpu` events.

Runs in the TF process (where the task's GPUs are visible) on a daemon thread. The
devices are read through a small `DeviceSource` interface: NVML (`nvidia-ml-py`) in
production, a fake in tests. A process without a GPU reports its own CPU % and RSS
instead, so the dashboard can say "no GPU on worker N" and still show the load.
Needs neither TensorFlow nor Spark.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Protocol

INTERVAL_S = 1.0
MB = 1024 * 1024


class DeviceSource(Protocol):
    def devices(self) -> list[int]:
        """The indexes of the GPUs this process owns (may be empty)."""

    def read(self, index: int) -> dict[str, float | None]:
        """utilization (%), memory_used and memory_total (MB), temperature (C), power (W)."""


def visible_indexes(count: int, env: dict[str, str] | None = None) -> list[int]:
    """The devices CUDA_VISIBLE_DEVICES leaves this process (all when unset)."""
    value = (env if env is not None else os.environ).get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return list(range(count))
    out = []
    for part in value.split(","):
        part = part.strip()
        if part.isdigit() and int(part) < count:
            out.append(int(part))
    return out


class NvmlSource:
    """NVML through nvidia-ml-py. `available()` is False where there is no driver or GPU."""

    def __init__(self) -> None:
        self._nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._indexes = visible_indexes(pynvml.nvmlDeviceGetCount())
        except Exception:  # noqa: BLE001 - no library, no driver, no device: all mean "no GPU"
            self._nvml, self._indexes = None, []

    def available(self) -> bool:
        return self._nvml is not None and bool(self._indexes)

    def devices(self) -> list[int]:
        return list(self._indexes)

    def read(self, index: int) -> dict[str, float | None]:
        nvml = self._nvml
        handle = nvml.nvmlDeviceGetHandleByIndex(index)

        def safe(fn: Callable[[], float]) -> float | None:
            try:
                return float(fn())
            except Exception:  # noqa: BLE001 - a reading a device does not support
                return None

        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        return {
            "utilization": safe(lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
            "memory_used": memory.used / MB,
            "memory_total": memory.total / MB,
            "temperature": safe(lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
            "power": safe(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0),
        }

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass


def process_stats(pid: int | None = None) -> dict[str, float]:
    """CPU % (since the last call) and RSS of a process: the view of a worker without a GPU."""
    import psutil

    proc = _PROCS.setdefault(pid or os.getpid(), psutil.Process(pid or os.getpid()))
    return {"cpu_percent": proc.cpu_percent(None), "rss_mb": proc.memory_info().rss / MB}


_PROCS: dict[int, Any] = {}


def sample(source: DeviceSource | None) -> dict[str, Any]:
    """One reading: {"devices": [...]} for GPUs, or {"devices": [], "process": {...}}."""
    indexes = source.devices() if source is not None else []
    if indexes:
        return {"devices": [dict(source.read(i), gpu=i) for i in indexes]}
    return {"devices": [], "process": process_stats()}


class GpuSampler:
    """Calls `send(reading)` every `interval` seconds on a daemon thread until `close()`."""

    def __init__(self, send: Callable[[dict[str, Any]], None], source: DeviceSource | None = None,
                 interval: float = INTERVAL_S) -> None:
        self._send, self._source, self.interval = send, source, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tfos-gpu-sampler", daemon=True)

    def start(self) -> "GpuSampler":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._send(sample(self._source))
            except Exception:  # noqa: BLE001 - monitoring never stops training
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(self.interval + 1)
        closer = getattr(self._source, "close", None)
        if callable(closer):
            closer()


def default_source() -> DeviceSource | None:
    nvml = NvmlSource()
    return nvml if nvml.available() else None


if __name__ == "__main__":  # a stand-alone check on a GPU machine: python -m tfos_magic.training.gpu_sampler
    import json
    import sys
    import time

    src = default_source()
    print(json.dumps({"nvml": src is not None}), flush=True)
    for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 5):
        print(json.dumps(sample(src)), flush=True)
        time.sleep(INTERVAL_S)
