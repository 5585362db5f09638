"""What a reader shows of a job's metrics.jsonl, folded one event at a time.

`Job` folds the whole file once per question; the server extension keeps one digest per
job and feeds it only the lines appended since its last look (JobStore.reading_events), so
a sidebar that polls every few seconds never re-reads a long job's history. Both fold
with this one class, so `tfos jobs`, `Job.history` and the sidebar agree.

The Jupyter server keeps a digest per job for as long as it runs, and metrics.jsonl is data
anyone who can write the job's directory controls: so a digest's memory is bounded however
long the file (series decimated as points arrive, the latest checkpoints and epochs kept,
values checked and cut), and `feed` takes any JSON object without raising.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Iterable, Sequence, TypeVar

from .store import JobStore

T = TypeVar("T")
SERIES_POINTS = 1000  # the most (step, loss) points a digest keeps; an answer decimates them further
CHECKPOINTS_KEPT = 1000  # the latest checkpoints a digest lists
MODELS_KEPT = 100  # the latest saved models a digest remembers
EPOCHS_KEPT = 5000  # the latest epochs of the history
ROW_METRICS = 32  # the most metrics of one epoch row
NAME_CHARS = 100  # a metric whose name is longer is left out of a row
TEXT_CHARS = 4096  # a longer string (a path, a reason, a metric) is left out (None)


def decimate(points: Sequence[T], most: int) -> list[T]:
    """At most `most` of `points`: every k-th, always keeping the first and the last (a chart
    of a long run keeps its shape and its ends)."""
    n = len(points)
    if n <= most:
        return list(points)
    stride = -(-n // (most - 1))
    return [points[i] for i in range(0, n - 1, stride)] + [points[-1]]


def integer(value: Any) -> int | None:
    """An integer of the event, or None for anything else (a bool, a float, a string)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def finite_number(value: Any) -> float | int | None:
    """A finite number of the event, or None: NaN and infinities are no JSON, and an integer
    too large for a float is no metric."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return value if math.isfinite(value) else None
    except OverflowError:
        return None


def short_text(value: Any) -> str | None:
    return value if isinstance(value, str) and len(value) <= TEXT_CHARS else None


def stopped_early_text(e: dict[str, Any]) -> str | None:
    """The chief's `stopped_early` event in words: at which epoch, of how many, and why."""
    epoch, epochs = integer(e.get("epoch")), integer(e.get("epochs"))
    if epoch is None:
        return None
    return f"Stopped early at epoch {epoch}" + (f" of {epochs}" if epochs else "") + \
        (f": {short_text(e.get('reason'))}" if short_text(e.get("reason")) else "")


def _metrics(event: dict[str, Any]) -> dict[str, Any]:
    """The event's `metrics`, or {} when it is not an object."""
    metrics = event.get("metrics")
    return metrics if isinstance(metrics, dict) else {}


def _row(metrics: dict[str, Any]) -> dict[str, Any]:
    """An epoch's metrics as a history row keeps them: at most ROW_METRICS, each a number
    or a short string (else None), so that a row's size is bounded."""
    named = ((k, v) for k, v in metrics.items() if len(k) <= NAME_CHARS)
    return {k: short_text(v) if isinstance(v, str) else finite_number(v) for k, v in islice(named, ROW_METRICS)}


@dataclass
class ValidationShares:
    """ps mode: each worker scores its own share of the validation rows (`val_loss` and
    `val_rows` in its epoch event), so the job's validation loss of an epoch is the shares
    weighed by their rows. A resumed run's report of an epoch replaces the earlier one."""

    parts: dict[int, dict[int, tuple[float, int]]] = field(default_factory=dict)

    def add(self, e: dict[str, Any]) -> int | None:
        """Take an epoch event's share, if it has one; returns its epoch."""
        metrics, epoch, worker = _metrics(e), integer(e.get("epoch")), integer(e.get("worker"))
        loss, rows = finite_number(metrics.get("val_loss")), integer(metrics.get("val_rows"))
        if epoch is None or worker is None or loss is None or not rows:
            return None
        self.parts.setdefault(epoch, {})[worker] = (loss, rows)
        if len(self.parts) > EPOCHS_KEPT:
            del self.parts[min(self.parts)]
        return epoch

    def reported(self, epoch: int) -> int:
        return len(self.parts.get(epoch, {}))

    def combined(self, epoch: int) -> tuple[float, int] | None:
        """(the rows' mean loss, their number) over the shares reported for `epoch`."""
        shares = self.parts.get(epoch)
        if not shares:
            return None
        rows = sum(n for _, n in shares.values())
        return sum(loss * n for loss, n in shares.values()) / rows, rows


@dataclass
class Series:
    """A series of points kept to at most `keep` however many arrive: every `stride`-th point,
    with the stride doubled (and every other point dropped) whenever `keep` is passed, and
    always the first and the last. A chart of any run keeps its shape in bounded memory."""

    keep: int = SERIES_POINTS
    points: list[Any] = field(default_factory=list)
    last: Any = None
    _stride: int = 1
    _seen: int = 0

    def add(self, point: Any) -> None:
        if self._seen % self._stride == 0:
            self.points.append(point)
            if len(self.points) > self.keep:
                del self.points[1::2]  # what stays: every (2 * stride)-th point since the first
                self._stride *= 2
        self._seen += 1
        self.last = point

    def sample(self, most: int) -> list[Any]:
        """At most `most` points, the first and the last among them."""
        if not self.points:
            return []
        kept = self.points if self.points[-1] is self.last else [*self.points, self.last]
        return decimate(kept, most)


@dataclass
class JobDigest:
    """The chief's progress, the epoch history, the checkpoints and the last GPU reading."""

    step: int | None = None  # the chief's last reported global step
    loss: float | None = None  # the chief's last reported loss (a step's, or an epoch's mean)
    rows_per_s: float | None = None  # the chief's last rate (rows a second on one worker)
    gpu_util: float | None = None  # mean utilization (%) over the last `gpu` event's devices
    loss_series: Series = field(default_factory=Series)  # (step, loss) of the chief's steps
    checkpoints: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=CHECKPOINTS_KEPT))
    models: deque[str] = field(default_factory=lambda: deque(maxlen=MODELS_KEPT))  # saved final models
    stopped_early: str | None = None  # a callback of the cell ended training before --epochs, and why
    _epochs: dict[int, dict[str, Any]] = field(default_factory=dict)
    _validation: ValidationShares = field(default_factory=ValidationShares)
    # Where this digest has read metrics.jsonl to (JobStore.reading_events' inode and offset).
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
        """One dict per epoch from the chief worker; a resumed run overrides epochs it redid.
        In ps mode its `val_loss` is every worker's share weighed by rows (`val_rows` all of them)."""
        rows = []
        for k in sorted(self._epochs):
            shared = self._validation.combined(k)
            rows.append({**self._epochs[k], "val_loss": shared[0], "val_rows": shared[1]} if shared else self._epochs[k])
        return rows

    @property
    def latest_checkpoint(self) -> str | None:
        return self.checkpoints[-1]["path"] if self.checkpoints else None

    def loss_curve(self, most: int) -> list[dict[str, Any]]:
        """The chief's per-step loss, at most `most` points, the first and the last among them."""
        return [{"step": s, "loss": v} for s, v in self.loss_series.sample(most)]

    def feed(self, e: dict[str, Any]) -> None:
        """Fold one event in. Any JSON object is taken: a key of the wrong type is ignored."""
        kind = e.get("kind")
        if kind == "epoch" and e.get("role", "worker") == "worker":
            self._validation.add(e)
        if kind in ("step", "epoch") and e.get("worker", 0) == 0:
            self._progress(kind, e)
        elif kind == "checkpoint":
            self.checkpoints.append({"step": integer(e.get("step")), "epoch": integer(e.get("epoch")),
                                     "path": short_text(e.get("path")), "reason": short_text(e.get("reason")),
                                     "time": finite_number(e.get("time"))})
        elif kind == "model" and short_text(e.get("path")):
            self.models.append(e["path"])
        elif kind == "gpu":
            self._gpu(e.get("devices"))
        elif kind == "training" and e.get("worker", 0) == 0:
            self.stopped_early = None  # a new run, or a resumed one, trains on
        elif kind == "stopped_early" and e.get("worker", 0) == 0:
            self.stopped_early = stopped_early_text(e)

    def _progress(self, kind: str, e: dict[str, Any]) -> None:
        """A chief's step or epoch: the last step, loss and rate; a step's loss joins the
        curve, and an epoch's metrics are its history row."""
        metrics, step = _metrics(e), integer(e.get("step"))
        loss = finite_number(metrics.get("loss"))
        if step is not None:
            self.step = step
        if "loss" in metrics:
            self.loss = loss
        if "rows_per_s" in metrics:
            self.rows_per_s = finite_number(metrics["rows_per_s"])
        if kind == "step" and step is not None and loss is not None:
            self.loss_series.add((step, loss))
        epoch = integer(e.get("epoch"))
        if kind == "epoch" and epoch is not None:
            self._epochs[epoch] = {"epoch": epoch, **_row(metrics)}
            if len(self._epochs) > EPOCHS_KEPT:  # keep the latest; drop a tenth at a time, not one per epoch
                for old in sorted(self._epochs)[: len(self._epochs) - EPOCHS_KEPT * 9 // 10]:
                    del self._epochs[old]

    def _gpu(self, devices: Any) -> None:
        readings = [finite_number(d.get("utilization")) for d in devices if isinstance(d, dict)] \
            if isinstance(devices, list) else []
        readings = [r for r in readings if r is not None]
        self.gpu_util = finite_number(sum(readings) / len(readings)) if readings else None

    def refresh(self, store: JobStore, name: str, max_bytes: int | None = None) -> "JobDigest":
        """Fold in what was appended since the last refresh (at most `max_bytes` of it: a
        longer backlog is folded over the next refreshes); start over when the file was
        replaced (a `--restart` drops the metrics). Returns the digest to use from now on.

        The offset moves past each event before it is folded, so an event is never folded
        twice, even if folding it failed."""
        with store.reading_events(name, self.offset, self.inode if self.offset else None, max_bytes) as read:
            digest = JobDigest() if read.restarted else self
            digest.inode = read.inode
            for event in read:
                digest.offset = read.offset
                digest.feed(event)
            digest.offset = read.offset
        return digest
