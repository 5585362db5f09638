"""What a reader shows of a job's metrics.jsonl, folded one event at a time.

`Job` folds the whole file once per question; the server extension keeps one digest per
job and feeds it only the lines appended since its last look (JobStore.read_events), so
a sidebar that polls every few seconds never re-reads a long job's history. Both fold
with this one class, so `tfos jobs`, `Job.history` and the sidebar agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence, TypeVar

from .store import JobStore

T = TypeVar("T")


def decimate(points: Sequence[T], most: int) -> list[T]:
    """At most `most` of `points`: every k-th, always keeping the first and the last (a chart
    of a long run keeps its shape and its ends)."""
    n = len(points)
    if n <= most:
        return list(points)
    stride = -(-n // (most - 1))
    return [points[i] for i in range(0, n - 1, stride)] + [points[-1]]


@dataclass
class JobDigest:
    """The chief's progress, the epoch history, the checkpoints and the last GPU reading."""

    step: int | None = None  # the chief's last reported global step
    loss: float | None = None  # the chief's last reported loss (a step's, or an epoch's mean)
    rows_per_s: float | None = None  # the chief's last rate (rows a second on one worker)
    gpu_util: float | None = None  # mean utilization (%) over the last `gpu` event's devices
    loss_points: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) of the chief's steps
    checkpoints: list[dict[str, Any]] = field(default_factory=list)  # in the order they were saved
    models: list[str] = field(default_factory=list)  # saved final models, oldest first
    _epochs: dict[int, dict[str, Any]] = field(default_factory=dict)
    # Where this digest has read metrics.jsonl to (JobStore.read_events' inode and offset).
    inode: int = 0
    offset: int = 0

    @classmethod
    def of(cls, events: Iterable[dict[str, Any]]) -> "JobDigest":
        digest = cls()
        for event in events:
            digest.feed(event)
        return digest

    @property
    def history(self) -> list[dict[str, Any]]:
        """One dict per epoch from the chief worker; a resumed run overrides epochs it redid."""
        return [self._epochs[k] for k in sorted(self._epochs)]

    @property
    def latest_checkpoint(self) -> str | None:
        return self.checkpoints[-1]["path"] if self.checkpoints else None

    def feed(self, e: dict[str, Any]) -> None:
        kind, chief = e.get("kind"), e.get("worker", 0) == 0
        if kind in ("step", "epoch") and chief:
            metrics = e.get("metrics") or {}
            self.step = e.get("step", self.step)
            self.loss = metrics.get("loss", self.loss)
            self.rows_per_s = metrics.get("rows_per_s", self.rows_per_s)
            if kind == "step" and e.get("step") is not None and metrics.get("loss") is not None:
                self.loss_points.append((int(e["step"]), float(metrics["loss"])))
            if kind == "epoch":
                self._epochs[int(e["epoch"])] = {"epoch": e["epoch"], **metrics}
        elif kind == "checkpoint":
            self.checkpoints.append({k: e.get(k) for k in ("step", "epoch", "path", "reason", "time")})
        elif kind == "model" and e.get("path"):
            self.models.append(e["path"])
        elif kind == "gpu":
            readings = [float(d["utilization"]) for d in e.get("devices") or () if d.get("utilization") is not None]
            self.gpu_util = sum(readings) / len(readings) if readings else None

    def refresh(self, store: JobStore, name: str) -> "JobDigest":
        """Fold in what was appended since the last refresh; start over when the file was
        replaced (a `--restart` drops the metrics). Returns the digest to use from now on."""
        read = store.read_events(name, self.offset, self.inode if self.offset else None)
        digest = JobDigest() if read.restarted else self
        for event in read.events:
            digest.feed(event)
        digest.inode, digest.offset = read.inode, read.offset
        return digest
