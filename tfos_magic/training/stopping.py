"""A stop the notebook asked for (%tfos_stop, the kernel's stop button), agreed by the
workers on one step so that the chief can checkpoint before the job ends.

Under MultiWorkerMirroredStrategy a checkpoint save runs collectives, so every worker
must save at the same step: the chief alone would hang its peers. The driver sends
"stop" to every TF process; the chief picks a step a moment ahead (its peers are at most
one step away, since each step all-reduces) and announces it in a `stopping` event; the
driver passes that step on as "stop_at"; every worker saves at it and ends. The driver
waits for that checkpoint for a bounded time only, then cancels the job anyway.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any, Callable

# How far ahead of its own step the chief sets the stop: time for the stop_at line to
# reach the other workers through the notebook.
LEAD_S = 1.0
MIN_LEAD_STEPS = 2


class StopRequested(Exception):
    """Raised on every worker at the agreed step, after its checkpoint: ends the cell's
    training. The TF process reports the attempt as stopped, not failed."""


class StopSignal:
    """What the channel's control lines said, and the step check that training calls.

    `lockstep` is True under MWMS (workers must stop on one step); in ps mode workers
    are independent and the chief stops at once.
    """

    def __init__(self, is_chief: bool, announce: Callable[[int], None], lockstep: bool = True) -> None:
        self.is_chief = is_chief
        self.lockstep = lockstep
        self._announce = announce
        self._requested = threading.Event()
        self._at: int | None = None
        self._announced = False
        self._first: tuple[float, int] | None = None

    def on_control(self, message: dict[str, Any]) -> None:
        """Called from the channel's listening thread."""
        if message.get("control") == "stop":
            self._requested.set()
        elif message.get("control") == "stop_at":
            self._at = int(message["step"])
            self._requested.set()

    def should_stop(self, step: int) -> bool:
        """Called after each step (or group of steps) with the global step: True at the
        agreed stop step, on every worker alike."""
        now = time.monotonic()
        if self._first is None:
            self._first = (now, step)
        if self._at is not None:
            return step >= self._at
        if self.is_chief and self._requested.is_set() and not self._announced:
            self._announced = True
            self._at = step + self._lead(now, step)
            self._announce(self._at)
            return step >= self._at
        return False

    def _lead(self, now: float, step: int) -> int:
        if not self.lockstep:
            return 0
        t0, s0 = self._first or (now, step)
        rate = (step - s0) / (now - t0) if now > t0 else 0.0
        return max(MIN_LEAD_STEPS, math.ceil(rate * LEAD_S))
