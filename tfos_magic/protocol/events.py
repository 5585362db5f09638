"""Metric events: the public, versioned format of metrics.jsonl (docs/metrics.md).

Every event is a flat JSON object with "v", "time", "kind" and "worker"; the kinds are
task, started, training, step, epoch, checkpoint, model, log, error, finished, gpu and stopping.
"""

from __future__ import annotations

import math
import time
from typing import Any

EVENT_VERSION = 1
KINDS = ("task", "started", "training", "step", "epoch", "checkpoint", "model", "log", "error", "finished", "gpu", "stopping",
         "stopped_early")


def _plain(value: Any) -> Any:
    """Numbers from numpy/TF become plain floats; NaN/inf become None (valid JSON)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# An error's traceback and log tail travel with it, under the channel's line limit.
MAX_DETAILS = 256 * 1024


def make_event(kind: str, worker: int, **fields: Any) -> dict[str, Any]:
    if kind not in KINDS:
        raise ValueError(f"unknown event kind {kind!r}")
    details = fields.get("details")
    if isinstance(details, str) and len(details) > MAX_DETAILS:  # the end says most: the last frames and lines
        fields["details"] = f"[... {len(details) - MAX_DETAILS} characters cut ...]\n" + details[-MAX_DETAILS:]
    event = {"v": EVENT_VERSION, "time": time.time(), "kind": kind, "worker": worker}
    for key, value in fields.items():
        if isinstance(value, dict):
            value = {k: _plain(v) for k, v in value.items()}
        event[key] = _plain(value)
    return event


def log_line(event: dict[str, Any]) -> str:
    """A `log` event as the one line every view prints: `[worker 0] text`."""
    return f"[{event.get('role', 'worker')} {event.get('worker')}] {event.get('text', '')}"
