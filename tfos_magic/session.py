"""The notebook's SparkSession: the active one, or a local one made for the user."""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

from .errors import TfosError
from .job.spec import REDACTED


def get_spark(user_ns: dict[str, Any] | None = None, master: str | None = None,
              conf: dict[str, str] | None = None, remote: str | None = None):
    """Return the notebook's `spark` when it is a Spark Connect session, else the active
    classic one, else create one (bound as `spark`): a Connect session on `remote` (a
    stored job's sc:// server), else on TFOS_SPARK_MASTER, else `master` (a stored
    job's), else `local[*]`, with `conf` (the settings a stored job ran with) under the
    ones this package needs."""
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    from .driver.spark_backend import held_session

    given = (user_ns or {}).get("spark")
    if held_session(given) is not None:
        return given
    if SparkContext._active_spark_context is not None:
        spark = SparkSession.builder.getOrCreate()
    elif remote and not os.environ.get("TFOS_SPARK_MASTER"):
        spark = _connect(remote)
    else:
        spark = _create(master, conf or {})
    if user_ns is not None and not isinstance(given, SparkSession):
        user_ns["spark"] = spark
    return spark


def _connect(remote: str):
    """A Spark Connect session on the server a stored job ran on."""
    from pyspark.sql import SparkSession

    try:
        return SparkSession.builder.remote(remote).getOrCreate()
    except Exception as exc:  # noqa: BLE001 - gRPC errors have many types
        raise TfosError(f"Could not connect to the Spark Connect server {remote} the job last ran on: "
                        f"{str(exc).strip().splitlines()[0]}. Start it, or create the SparkSession yourself "
                        "before the %%spark_etl cell (or set TFOS_SPARK_MASTER).") from None


def executor_python(master: str, conf: dict[str, str]) -> str | None:
    """The Python the session's executors run: PYSPARK_PYTHON (or the stored job's
    setting) when given; in local mode this kernel's own, which has pyarrow, TF and
    tfos-magic; on a cluster None, the nodes' own `python3`. The kernel's interpreter
    path means nothing on other hosts, and the TF processes run the job's --env anyway
    (docs/deploy.md)."""
    given = os.environ.get("PYSPARK_PYTHON") or conf.get("spark.pyspark.python")
    if given:
        return given
    return sys.executable if master.startswith("local") else None


def _create(master: str | None, conf: dict[str, str]):
    from pyspark.sql import SparkSession

    master = os.environ.get("TFOS_SPARK_MASTER") or master or "local[*]"
    check_reachable(master)
    python = executor_python(master, conf)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    if python is not None:
        os.environ.setdefault("PYSPARK_PYTHON", python)
    builder = SparkSession.builder.master(master).appName("tfos-magic")
    for key, value in conf.items():
        if value != REDACTED:  # a secret the store did not keep: Spark's own config files give it
            builder = builder.config(key, value)
    if python is not None:
        builder = builder.config("spark.pyspark.python", python)
    try:
        return (
            builder
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
