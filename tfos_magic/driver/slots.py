"""How many barrier tasks Spark can run at once, checked before a job is submitted.

Spark's own answer to a too-large barrier stage is to retry for minutes ("Barrier
stage requires N slots"); asking first turns that into an immediate, clear error.
"""

from __future__ import annotations

from pyspark import SparkContext

from ..errors import TfosError


def task_slots(sc: SparkContext) -> int:
    jsc = sc._jsc.sc()  # type: ignore[union-attr]
    try:
        profile = jsc.resourceProfileManager().defaultResourceProfile()
        return int(jsc.maxNumConcurrentTasks(profile))
    except Exception:  # noqa: BLE001 - a private API; fall back to the public estimate
        return int(sc.defaultParallelism)


def check_slots(sc: SparkContext, needed: int, what: str) -> None:
    if needed < 1:
        raise TfosError(f"{what} needs at least one task; got {needed}.")
    slots = task_slots(sc)
    if needed > slots:
        raise TfosError(
            f"{what} needs {needed} concurrent Spark tasks, but the cluster ({sc.master}) has "
            f"{slots} task slots now. Lower --workers to at most {slots}, or give Spark more "
            "cores or executors (e.g. local[N], spark.executor.cores, spark.executor.instances)."
        )
