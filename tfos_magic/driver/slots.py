"""Whether the cluster can run the job's barrier stage, checked before a job is submitted.

Spark's own answers are slow or late: a barrier stage larger than the cluster is retried
for minutes ("Barrier stage requires N slots"), and one under dynamic allocation fails
only once submitted. Asking first turns both into an immediate error naming the settings.
"""

from __future__ import annotations

import time
from typing import Callable

from pyspark import SparkContext

from ..errors import TfosError

# A standalone, YARN or Kubernetes session returns before its executors have registered:
# a job submitted at once would see too few slots. How long to let them come.
REGISTRATION_WAIT = 15.0


def task_slots(sc: SparkContext) -> int:
    jsc = sc._jsc.sc()  # type: ignore[union-attr]
    try:
        profile = jsc.resourceProfileManager().defaultResourceProfile()
        return int(jsc.maxNumConcurrentTasks(profile))
    except Exception:  # noqa: BLE001 - a private API; fall back to the public estimate
        return int(sc.defaultParallelism)


def check_dynamic_allocation(sc: SparkContext) -> None:
    """Spark refuses barrier stages while dynamic allocation is on, outside local mode
    (BarrierJobRunWithDynamicAllocationException); YARN platforms such as EMR and Dataproc
    turn it on by default. The setting is read when the SparkContext starts, so no job can
    switch it off: the session must be created again with the settings named here."""
    conf = sc.getConf()
    enabled = conf.get("spark.dynamicAllocation.enabled", "false").strip().lower() == "true"
    testing = conf.get("spark.dynamicAllocation.testing", "false").strip().lower() == "true"
    if not enabled or (sc.master.startswith("local") and not testing):
        return
    raise TfosError(
        "This Spark session has dynamic allocation on (spark.dynamicAllocation.enabled=true), and Spark "
        "refuses the barrier stage every tfos job runs while it is. Stop the session (spark.stop()) and create it "
        "again with spark.dynamicAllocation.enabled=false and a fixed number of executors, for example "
        "--conf spark.dynamicAllocation.enabled=false --conf spark.executor.instances=N (enough executors x "
        "spark.executor.cores for --workers, plus --ps in ps mode). On EMR and Dataproc, set both in the "
        "notebook's Spark configuration (docs/deploy.md).")


def check_slots(sc: SparkContext, needed: int, what: str, wait: float = REGISTRATION_WAIT,
                sleep: Callable[[float], None] = time.sleep) -> None:
    """Refuse a job the cluster cannot run at once. Outside local mode, executors that are
    still registering get up to `wait` seconds: the check never waits longer."""
    if needed < 1:
        raise TfosError(f"{what} needs at least one task; got {needed}.")
    slots = task_slots(sc)
    deadline = time.monotonic() + (0 if sc.master.startswith("local") else wait)
    while needed > slots and time.monotonic() < deadline:
        sleep(1.0)
        slots = task_slots(sc)
    if needed > slots:
        raise TfosError(
            f"{what} needs {needed} concurrent Spark tasks, but the cluster ({sc.master}) has "
            f"{slots} task slots now. Lower --workers to at most {max(slots, 1)}, or give Spark more "
            "cores or executors (e.g. local[N], spark.executor.cores, spark.executor.instances)."
        )
