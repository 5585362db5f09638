"""The Spark lines tfos-magic runs on (3.5 and 4.x), kept apart in one place
(driver/spark_backend.py): fast checks on the tests' local session. The 3.5 tier runs the
real jobs on pyspark 3.5 (test_spark35.py and the tests marked `spark35`)."""

from __future__ import annotations

import threading
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from packaging.requirements import Requirement

from tfos_magic.driver import spark_backend
from tfos_magic.driver.spark_backend import ClassicSpark, GroupActivity, backend_for, schema_text
from tfos_magic.errors import TfosError

ROOT = Path(__file__).parents[1]


def test_the_package_installs_beside_pyspark_35_and_4():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pyspark = next(Requirement(d) for d in deps if Requirement(d).name == "pyspark")
    for version in ("3.5.0", "3.5.9", "4.0.1", "4.3.0"):
        assert pyspark.specifier.contains(version), (pyspark, version)
    assert not pyspark.specifier.contains("3.4.4") and not pyspark.specifier.contains("5.0.0")
    assert "connect" in pyspark.extras, "a Spark Connect session needs the client's packages"


def test_without_stage_level_scheduling_gpus_come_from_the_sessions_task_resources(spark, monkeypatch):
    monkeypatch.setattr(spark_backend, "STAGE_PROFILES", False)
    backend = ClassicSpark(spark)  # local[2]: no task-level GPUs
    with pytest.raises(TfosError, match=r"spark\.task\.resource\.gpu\.amount=2.*smaller --gpus-per-worker"):
        backend.gpu_request(2)
    backend.sc = SimpleNamespace(getConf=lambda: {"spark.task.resource.gpu.amount": "2"}, version="3.5.9")
    request = backend.gpu_request(1)
    assert request.profile is None and "task-level resources: 2 a task" in request.note, request
    with pytest.raises(TfosError, match="gives each task 2 GPU"):
        backend.gpu_request(3)


def test_with_stage_level_scheduling_the_workers_stage_gets_a_profile_of_its_own(spark, monkeypatch):
    monkeypatch.setattr(spark_backend, "STAGE_PROFILES", True)
    request = ClassicSpark(spark).gpu_request(2)
    assert request.note is None
    assert request.profile.taskResources["gpu"].amount == 2


def test_the_schema_prints_as_print_schema_does(spark):
    df = spark.range(3).selectExpr("id", "array(1.0, 2.0) AS v", "'a' AS s")
    text = schema_text(df)
    assert text == df._jdf.schema().treeString(), text
    assert text.splitlines()[:2] == ["root", " |-- id: long (nullable = false)"], text


def test_a_connect_client_older_than_spark_4_is_named_with_what_to_do():
    old_client = type("SparkSession", (), {"__module__": "pyspark.sql.connect.session", "version": "3.5.9"})()
    with pytest.raises(TfosError, match="Spark 4 Connect client.*classic session"):
        backend_for(old_client)


def test_connect_progress_reports_are_told_apart_by_the_thread_s_job_group():
    """The Connect client calls its progress handler on the thread running the action:
    the group that thread works under owns the stages. A broken report is dropped rather
    than failing the user's action."""
    from tfos_magic.driver.connect_backend import _Progress

    progress = _Progress()
    stage = SimpleNamespace
    seen: dict[str, Any] = {}

    def action(group: str, stages: list, inflight: int) -> None:
        progress.current.group = group
        progress(stages=stages, inflight_tasks=inflight, operation_id="op", done=False)
        seen[group] = progress.activity(group)

    threads = [threading.Thread(target=action, args=("a", [stage(stage_id=1, num_tasks=4, num_completed_tasks=1)], 3)),
               threading.Thread(target=action, args=("b", [stage(stage_id=2, num_tasks=2, num_completed_tasks=2)], 0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert seen["a"] == GroupActivity(1, 4, 3) and seen["b"] == GroupActivity(2, 2, 0)
    progress.current.group = "a"
    progress(stages=[stage(stage_id=1, num_tasks=4, num_completed_tasks=4), stage(stage_id=5, num_tasks=2,
                                                                              num_completed_tasks=0)],
             inflight_tasks=0, operation_id="op", done=True)
    assert progress.activity("a") == GroupActivity(4, 6, 0)
    progress(stages=[object()], inflight_tasks=1, operation_id="op", done=False)  # no exception reaches Spark
    assert progress.activity("nobody") is None
