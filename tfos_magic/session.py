"""The notebook's SparkSession: the active one, or a local one made for the user."""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

from .errors import TfosError


def get_spark(user_ns: dict[str, Any] | None = None, master: str | None = None,
              conf: dict[str, str] | None = None):
    """Return the active SparkSession, else create one (bound as `spark`): on
    TFOS_SPARK_MASTER, else `master` (a stored job's), else `local[*]`, with `conf` (the
    settings a stored job ran with) under the ones this package needs."""
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    if SparkContext._active_spark_context is not None:
        spark = SparkSession.builder.getOrCreate()
    else:
        spark = _create(master, conf or {})
    if user_ns is not None and not isinstance(user_ns.get("spark"), SparkSession):
        user_ns["spark"] = spark
    return spark


def _create(master: str | None, conf: dict[str, str]):
    from pyspark.sql import SparkSession

    # Executors must run this interpreter, which has pyarrow, TF and tfos_magic.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    master = os.environ.get("TFOS_SPARK_MASTER") or master or "local[*]"
    check_reachable(master)
    builder = SparkSession.builder.master(master).appName("tfos-magic")
    for key, value in conf.items():
        builder = builder.config(key, value)
    try:
        return (
            builder
            .config("spark.pyspark.python", os.environ["PYSPARK_PYTHON"])
            .config("spark.sql.execution.arrow.pyspark.enabled", "true")
            .config("spark.ui.showConsoleProgress", "false")
            .getOrCreate()
        )
    except Exception as exc:  # noqa: BLE001 - py4j/Java errors have many types
        raise TfosError(
            f"Could not start a Spark session (master {master!r}): {str(exc).strip().splitlines()[0]}. "
            "Spark 4 needs Java 17+ on PATH or JAVA_HOME; for a cluster, set TFOS_SPARK_MASTER to a "
            "reachable master URL, or create the SparkSession yourself before the %%spark_etl cell."
        ) from None


def check_reachable(master: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not after Spark's minute of retries, when a standalone master is down."""
    if not master.startswith("spark://"):
        return
    errors = []
    for hostport in master[len("spark://"):].split(","):
        host, _, port = hostport.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=timeout).close()
            return
        except (OSError, ValueError) as exc:
            errors.append(f"{hostport}: {exc}")
    raise TfosError(
        f"Cannot reach the Spark master {master} ({'; '.join(errors)}). Start the master, fix "
        "TFOS_SPARK_MASTER, or create the SparkSession yourself before the %%spark_etl cell."
    )
