"""Runs in the Spark task's Python worker: warm starts.

`import tensorflow` alone takes seconds, and a user tuning a cell runs it again and again.
Spark keeps its Python workers between tasks, so once a worker's TF task has succeeded,
this module starts one spare TF process there (TensorFlow imported, nothing else: no
job, cell, data or secret), and the next TF task in that worker hands it its config
instead of starting a process from nothing (training/child.py, `--spare`).

A spare is one process per Python worker that ran a TF task, never more, and it
carries nothing from one job into the next: it was started before the job that takes
it and serves that one task only. It ends
- when its Python worker ends (parent-death signal: a lost executor, `spark.stop()`);
- after --warm-start seconds without a task;
- when the notebook retires the spares (a stop, an interrupt or a failure of any job,
  a new attempt) or goes away: it listens on the notebook's channel as a spare, and a
  closed connection ends it (driver/channel.py, `DriverChannel.retire_spares`);
- when a task needs what it cannot give: another Python, GPUs (CUDA_VISIBLE_DEVICES must
  be set before TensorFlow starts), or --warm-start 0.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..protocol.plan import SPARE_TAKEN, SPARE_TOKEN_ENV, TaskPlan

CHILD_MODULE = "tfos_magic.training.child"
HAND_OVER_S = 60.0  # a spare still importing TensorFlow answers once the import is done


@dataclass
class Spare:
    process: subprocess.Popen
    python: str  # the Python it runs: a task of another environment cannot take it

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        _end(self.process)


def _end(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


_spare: Spare | None = None  # this Python worker's spare, if any


def take(plan: TaskPlan, python: str, gpus: bool) -> subprocess.Popen | None:
    """This worker's spare for a task of `plan`, now the caller's; None if there is none
    it may take (any other is ended: it would only wait out its idle time)."""
    global _spare
    spare, _spare = _spare, None
    if spare is None:
        return None
    if spare.alive() and spare.python == python and not gpus and plan.options.warm_start > 0:
        return spare.process
    spare.kill()
    return None


def hand_over(process: subprocess.Popen, config_path: str, wait_s: float, log_path: str,
              env: dict[str, str], within_s: float = HAND_OVER_S) -> bool:
    """What a fresh TF process gets on its command line and in its environment, as the
    first line of its stdin; the Arrow stream follows on the same pipe. True once the spare
    says on its stdout that it took the task (after its import, if it was still loading).
    A spare that ends instead (retired or idle at that moment) or does not answer within
    `within_s` is ended, and False has the task start a fresh process: a spare decides
    to serve or to end in one place, so no task is left with a process that was leaving."""
    line = json.dumps({"config": config_path, "wait": wait_s, "log": log_path, "env": env}) + "\n"
    taken = False
    try:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(line.encode())
        process.stdin.flush()
        deadline = time.monotonic() + within_s
        while not taken and time.monotonic() < deadline:
            ready, _, _ = select.select([process.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            answer = process.stdout.readline()
            if not answer:
                break  # it ended
            taken = answer == SPARE_TAKEN
    except OSError:
        taken = False
    if process.stdout is not None:
        process.stdout.close()  # its stdout is the task's log from here on
    if not taken:
        _end(process)
    return taken


def start(plan: TaskPlan, python: str, base_env: dict[str, str], preexec_fn: Callable[[], Any]) -> None:
    """A spare for this worker's next TF task, after this one succeeded (at most one)."""
    global _spare
    if plan.options.warm_start <= 0 or not plan.spare_token or (_spare is not None and _spare.alive()):
        return
    env = dict(base_env, **{SPARE_TOKEN_ENV: plan.spare_token})
    process = subprocess.Popen(
        [python, "-m", CHILD_MODULE, "--spare", str(plan.options.warm_start), plan.channel_address],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
        preexec_fn=preexec_fn, cwd=os.getcwd())
    _spare = Spare(process, python)


def end() -> None:
    """End this worker's spare (tests; a task that must not leave one)."""
    global _spare
    spare, _spare = _spare, None
    if spare is not None:
        spare.kill()
