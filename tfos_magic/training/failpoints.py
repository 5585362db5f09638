"""Fault injection, for the recovery tests: a TF process kills itself (SIGKILL, as the
OOM killer or a lost executor would) at a chosen point of attempt 1.

Inert unless the kernel that launches the job has TFOS_FAILPOINT set; the plan carries
it to the TF processes, wherever they run. The form is PHASE:WORKER[:AFTER[:DELAY]]:
worker WORKER dies at its AFTER-th pass through PHASE (0 = the first), DELAY seconds
later (so that it lands inside the work that follows, such as a checkpoint's writes).
Phases: startup (as the TF process connects, before it joins the cluster), streaming (a training step of the first
epoch, while Spark still streams the partition), checkpoint (a checkpoint save),
validation (a validation batch), final_save (saving the final model).
"""

from __future__ import annotations

import os
import signal
import threading

PHASES = ("startup", "streaming", "checkpoint", "validation", "final_save")


class Failpoint:
    def __init__(self, spec: str | None, worker: int, attempt: int, role: str = "worker") -> None:
        self.phase: str | None = None
        self._count = 0
        if not spec or attempt != 1 or role != "worker":
            return
        parts = spec.split(":")
        if parts[0] not in PHASES:
            raise ValueError(f"TFOS_FAILPOINT {spec!r}: the phase must be one of {', '.join(PHASES)}")
        if int(parts[1]) != worker:
            return
        self.phase = parts[0]
        self.after = int(parts[2]) if len(parts) > 2 else 0
        self.delay = float(parts[3]) if len(parts) > 3 else 0.0

    def hit(self, phase: str) -> None:
        """Called at each pass through `phase`; kills this process at the chosen one."""
        if phase != self.phase:
            return
        self._count += 1
        if self._count - 1 != self.after:
            return
        if self.delay:
            threading.Timer(self.delay, _die).start()
        else:
            _die()


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
