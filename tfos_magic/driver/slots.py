"""Whether the cluster can run the job's barrier stage, checked before a job is submitted.

Spark's own answers are slow or late: a barrier stage larger than the cluster is retried
for minutes ("Barrier stage requires N slots"), and one under dynamic allocation fails
only once submitted. Asking first turns both into an immediate error naming the settings.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from ..errors import TfosError
from .spark_backend import SparkBackend

# A standalone, YARN or Kubernetes session returns before its executors have registered:
# a job submitted at once would see too few slots. How long after the session's start to
# let them come.
REGISTRATION_WAIT = 15.0


def check_dynamic_allocation(backend: SparkBackend) -> None:
    """Spark refuses barrier stages while dynamic allocation is on, outside local mode
    (BarrierJobRunWithDynamicAllocationException); YARN platforms such as EMR and Dataproc
    turn it on by default. The setting is read when the SparkContext starts, so no job can
    switch it off: the session must be created again with the settings named here."""
    enabled = (backend.conf("spark.dynamicAllocation.enabled") or "false").strip().lower() == "true"
    testing = (backend.conf("spark.dynamicAllocation.testing") or "false").strip().lower() == "true"
    if not enabled or (backend.local and not testing):
        return
    raise TfosError(
        "This Spark session has dynamic allocation on (spark.dynamicAllocation.enabled=true), and Spark "
        "refuses the barrier stage every tfos job runs while it is. Stop the session (spark.stop()) and create it "
        "again with spark.dynamicAllocation.enabled=false and a fixed number of executors, for example "
        "--conf spark.dynamicAllocation.enabled=false --conf spark.executor.instances=N (enough executors x "
        "spark.executor.cores for --workers, plus --ps in ps mode). On EMR and Dataproc, set both in the "
        "notebook's Spark configuration (docs/deploy.md).")


def check_slots(backend: SparkBackend, needed: int, what: str, profile: Any = None, gpus: int = 0,
                others: int = 0, wait: float = REGISTRATION_WAIT, sleep: Callable[[float], None] = time.sleep) -> None:
    """Refuse a job the cluster cannot run at once: `needed` tasks under `profile` (the
    workers, with their GPUs), and `others` more under the default profile (the
    parameter servers). Outside local mode, executors that are still registering get up
    to `wait` seconds after the session started: a settled cluster is answered at once.
    A session that cannot count its slots (Spark Connect on a cluster) is not checked."""
    if needed < 1:
        raise TfosError(f"{what} needs at least one task; got {needed}.")
    if backend.task_slots(profile) is None or backend.task_slots() is None:
        return
    deadline = time.monotonic() + (0 if backend.local else max(0.0, wait - backend.session_age()))
    while True:
        slots = backend.task_slots(profile) or 0
        default = (backend.task_slots() or 0) if profile is not None else slots
        fits = needed <= slots and needed + others <= default
        if fits or time.monotonic() >= deadline:
            break
        sleep(1.0)
    if fits:
        return
    if needed > slots and profile is not None:
        raise TfosError(
            f"{what} needs {needed} concurrent Spark tasks with {gpus} GPU(s) each, but the cluster "
            f"({backend.master}) has {slots} task slots with that many GPUs now. Lower --workers to at most "
            f"{max(slots, 1)} or --gpus-per-worker, or give the executors more GPUs "
            "(spark.executor.resource.gpu.amount, spark.worker.resource.gpu.amount).")
    raise TfosError(
        f"{what} needs {needed + others} concurrent Spark tasks, but the cluster ({backend.master}) has "
        f"{default} task slots now. Lower --workers to at most {max(default - others, 1)}, or give Spark more "
        "cores or executors (e.g. local[N], spark.executor.cores, spark.executor.instances)."
    )
