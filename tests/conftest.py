"""Shared fixtures: one local[2] Spark session for the whole run, a fresh job store per test."""

from __future__ import annotations

import os
import sys

# Before TF can be imported anywhere in this process (legacy tf.keras, as in the workers).
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["PYSPARK_PYTHON"] = sys.executable

import pytest


@pytest.fixture(scope="session")
def spark():
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[2]")
        .appName("tfos-magic-tests")
        .config("spark.pyspark.python", sys.executable)
        .config("spark.ui.enabled", "false")
        .config("spark.driver.memory", "3g")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture
def tfos_home(tmp_path, monkeypatch):
    home = tmp_path / "tfos-home"
    monkeypatch.setenv("TFOS_HOME", str(home))
    return home


@pytest.fixture
def shell(spark, tfos_home):
    """A real IPython shell with the extension loaded, bound to the shared Spark session."""
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.user_ns["spark"] = spark
    result = ip.run_cell("%load_ext tfos_magic")
    assert result.success, result.error_in_exec
    # Each test gets a store under its own TFOS_HOME and no DataFrames from earlier tests.
    from tfos_magic.job import JobStore
    from tfos_magic.magics import TfosMagics

    magics = ip.magics_manager.registry["TfosMagics"]
    assert isinstance(magics, TfosMagics)
    magics.store = JobStore(tfos_home)
    magics.frames.clear()
    yield ip


def run(ip, source: str):
    """Run a cell; return (result, error) where error is the exception raised, if any."""
    result = ip.run_cell(source)
    return result, (result.error_in_exec or result.error_before_exec)


@pytest.fixture(scope="session")
def tfos_kernel(tmp_path_factory):
    """The project's own kernel spec (kernels/tfos), found first on JUPYTER_PATH.

    Its "python" runs this interpreter, so a kernelspec named python3 elsewhere on the
    machine cannot swap in a Python without TF.
    """
    import shutil
    from pathlib import Path

    root = tmp_path_factory.mktemp("jupyter-path")
    shutil.copytree(Path(__file__).parents[1] / "kernels" / "tfos", root / "kernels" / "tfos")
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(root) + (os.pathsep + old if old else "")
    yield "tfos"
    if old is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = old
