"""The Spark lines tfos-magic runs on (3.5 and 4.x), kept apart in one place
(driver/spark_backend.py): fast checks on the tests' local session. The 3.5 tier runs the
real jobs on pyspark 3.5 (test_spark35.py and the tests marked `spark35`)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
from packaging.requirements import Requirement

from tfos_magic.driver import spark_backend
from tfos_magic.driver.spark_backend import ClassicSpark, backend_for, schema_text
from tfos_magic.errors import TfosError

ROOT = Path(__file__).parents[1]


def test_the_package_installs_beside_pyspark_35_and_4():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pyspark = next(Requirement(d) for d in deps if Requirement(d).name == "pyspark")
    for version in ("3.5.0", "3.5.9", "4.0.1", "4.3.0"):
        assert pyspark.specifier.contains(version), (pyspark, version)
    assert not pyspark.specifier.contains("3.4.4") and not pyspark.specifier.contains("5.0.0")


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


def test_a_spark_connect_session_is_named_with_what_to_do():
    connect_session = type("SparkSession", (), {"__module__": "pyspark.sql.connect.session"})()
    with pytest.raises(TfosError, match="Spark Connect session.*classic session"):
        backend_for(connect_session)
