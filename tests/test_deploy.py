"""Acceptance on a real standalone cluster whose executors run a bare Python: a fresh venv
with only pyspark and pyarrow (linked from this environment's installs, so nothing is
downloaded), no TensorFlow and no tfos-magic, as on a YARN or Kubernetes cluster that
was never prepared for tfos:

- a job without --env fails fast, naming what is missing and how to ship it;
- `tfos pack-env` packs this environment (tfos-magic is an editable install here, which
  venv-pack alone refuses) and a job with --env trains on it;
- an environment whose TensorFlow differs from the kernel's is refused before training;
- a job larger than the cluster's slots gets the numbers, at once;
- a session with dynamic allocation on (as EMR and Dataproc default to) gets the exact
  settings to change, instead of Spark's refusal of the barrier stage.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

import pytest
from conftest import make_venv, regression_cell, tf_processes_gone
from test_cluster import ETL, Kernel

from tfos_magic import get_job
from tfos_magic.driver.pack_env import editable_installs, pack_env

pytestmark = pytest.mark.e2e

MODEL = regression_cell(inputs=4, hidden=16, learning_rate=0.003)
SITE = glob.glob(os.path.join(sys.prefix, "lib", "python*", "site-packages"))[0]
# What the TF processes never use: left out of the archive to keep the test's copy small.
# PyTorch and its CUDA libraries (5 GB) too: the TF jobs here then also show that the TF
# path never imports torch.
EXCLUDES = ["lib/python3.*/site-packages/pyspark/*", "lib/python3.*/site-packages/playwright/*",
            "lib/python3.*/site-packages/tensorflow/include/*", "lib/python3.*/site-packages/jupyterlab*",
            "lib/python3.*/site-packages/torch/*", "lib/python3.*/site-packages/nvidia/*",
            "lib/python3.*/site-packages/triton/*", "lib/python3.*/site-packages/cuda/*"]




@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> str:
    """A venv holding pyspark, py4j (pyspark's dependency) and pyarrow, and nothing else."""
    root = tmp_path_factory.mktemp("bare") / "venv"
    site = make_venv(root)
    for name in ("pyspark", "py4j", "pyarrow"):
        for path in [os.path.join(SITE, name), *glob.glob(os.path.join(SITE, f"{name}-*.dist-info"))]:
            os.symlink(path, os.path.join(site, os.path.basename(path)))
    return str(root / "bin" / "python")


@pytest.fixture(scope="module")
def bare_kernel(spark_standalone, tfos_kernel, bare_python, tmp_path_factory):
    """A kernel whose session (made by %%spark_etl, as for a user) runs executors on the bare venv."""
    home = tmp_path_factory.mktemp("deploy-home")
    env = dict(os.environ, TFOS_HOME=str(home), TFOS_SPARK_MASTER=spark_standalone, SPARK_LOCAL_IP="127.0.0.1",
               PYSPARK_PYTHON=bare_python)
    env.pop("TFOS_EXECUTOR_ENV", None)
    kernel = Kernel(tfos_kernel, env)
    yield kernel, str(home)
    kernel.close()


@pytest.fixture(scope="module")
def packed_env(tmp_path_factory):
    """This environment packed by the real command line, as a user would."""
    out = str(tmp_path_factory.mktemp("packed") / "env.tar.gz")
    cmd = [os.path.join(sys.prefix, "bin", "tfos"), "pack-env", out, "--compress-level", "1"]
    for pattern in EXCLUDES:
        cmd += ["--exclude", pattern]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"--env {out}" in done.stdout, done.stdout
    yield out
    os.remove(out)  # GBs: pytest keeps the last runs' folders


def _run_ok(kernel, code):
    reply, out = kernel.run(code)
    assert reply["status"] == "ok", out
    return out


def _run_error(kernel, code):
    started = time.monotonic()
    reply, out = kernel.run(code)
    assert reply["status"] == "error", out
    return out, time.monotonic() - started


def test_the_executors_python_has_no_tensorflow_and_a_too_large_job_gets_the_numbers(bare_kernel, bare_python):
    kernel, home = bare_kernel
    _run_ok(kernel, ETL.format(name="dep_base", rows=40000))
    out = _run_ok(kernel, "import json\nprint(json.dumps(spark.sparkContext.parallelize(range(4), 4).map(lambda _: ("
                          "__import__('sys').executable, __import__('importlib').util.find_spec('tensorflow') is None,"
                          " __import__('importlib').util.find_spec('tfos_magic') is None)).collect()))")
    seen = json.loads(out.strip().splitlines()[-1])
    assert {tuple(s) for s in seen} == {(bare_python, True, True)}, seen
    out, took = _run_error(kernel, "%%tf_train dep_base --workers 5 --epochs 1 --label y\n" + MODEL)
    assert "needs 5 concurrent Spark tasks" in out and "has 4 task slots" in out, out
    assert took < 60, took


def test_a_job_without_env_fails_fast_with_what_to_do(bare_kernel):
    kernel, home = bare_kernel
    out, took = _run_error(kernel, "%%tf_train dep_base --workers 2 --epochs 1 --label y --restart\n" + MODEL)
    assert "has no tfos-magic and TensorFlow" in out and "tfos pack-env" in out and "--env" in out, out
    assert took < 90, took
    job = get_job("dep_base", home)
    assert job.state == "failed" and not [e for e in job.events if e["kind"] == "started"], job.events[-3:]


def test_a_packed_editable_environment_trains_on_the_bare_executors(bare_kernel, packed_env):
    kernel, home = bare_kernel
    # tfos-magic is an editable install here (scripts/setup.sh), the case venv-pack refuses:
    # the archive holds a wheel's files instead of the .pth that points at the checkout.
    assert [e.name for e in editable_installs(SITE)] == ["tfos-magic"]
    with tarfile.open(packed_env) as tar:
        names = set(tar.getnames())
    package = [n for n in names if n.endswith("site-packages/tfos_magic/task/feeder.py")]
    assert package and not [n for n in names if "_editable_impl_" in n or "__editable__" in n], sorted(names)[:20]
    _run_ok(kernel, ETL.format(name="dep_env", rows=40000))
    _run_ok(kernel, f"%%tf_train dep_env --workers 2 --epochs 3 --batch-size 256 --label y --restart "
                    f"--env {packed_env}\n" + MODEL)
    job = get_job("dep_env", home)
    assert job.state == "succeeded", job.error
    assert job.history[-1]["loss"] / job.history[0]["loss"] < 0.2, job.history
    # Each TF process ran the archive's Python, as unpacked by its own executor.
    pythons = [e.get("python") for e in job.events if e["kind"] == "started"]
    assert len(pythons) == 2 and all("/tfos-env-" in p and not p.startswith(sys.prefix) for p in pythons), pythons
    assert tf_processes_gone("tfos-dep_env-")
    # A parameter server is a task of another Spark job (not a barrier one): it runs the archive's Python too.
    _run_ok(kernel, ETL.format(name="dep_ps", rows=8000))
    _run_ok(kernel, f"%%tf_train dep_ps --strategy ps --ps 1 --workers 2 --epochs 1 --batch-size 128 --label y "
                    f"--restart --env {packed_env}\n" + MODEL)
    job = get_job("dep_ps", home)
    assert job.state == "succeeded", job.error
    roles = {(e.get("role"), "/tfos-env-" in (e.get("python") or "")) for e in job.events if e["kind"] == "started"}
    assert roles == {("ps", True), ("worker", True)}, [e for e in job.events if e["kind"] == "started"]
    pythons += [e["python"] for e in job.events if e["kind"] == "started"]
    assert tf_processes_gone("tfos-dep_ps-")
    for python in set(pythons):  # each executor's unpacked copy (GBs); no later job uses it
        shutil.rmtree(os.path.dirname(os.path.dirname(python)), ignore_errors=True)


def test_an_environment_with_another_tensorflow_is_refused_before_training(bare_kernel, tmp_path):
    """An archive whose TensorFlow is 2.15.1 (its installed metadata says so; the rest of
    it is a real venv, packed by pack_env) against the kernel's TensorFlow."""
    kernel, home = bare_kernel
    site = make_venv(tmp_path / "old-tf")
    for name, version in (("tensorflow", "2.15.1"), ("tfos_magic", "0.1.0")):
        info = os.path.join(site, f"{name}-{version}.dist-info")
        os.makedirs(info)
        with open(os.path.join(info, "METADATA"), "w") as f:
            f.write(f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n")
    archive = pack_env(str(tmp_path / "old-tf.tar.gz"), prefix=str(tmp_path / "old-tf"), log=lambda _: None)
    from importlib import metadata

    ours = metadata.version("tensorflow")
    out, took = _run_error(kernel, f"%%tf_train dep_base --workers 2 --epochs 1 --label y --restart "
                                   f"--env {archive}\n" + MODEL)
    assert f"has TensorFlow 2.15.1 but the notebook's kernel has TensorFlow {ours}" in out, out
    assert took < 90, took
    assert not [e for e in get_job("dep_base", home).events if e["kind"] == "started"]


def test_dynamic_allocation_gets_the_settings_to_change(bare_kernel, spark_standalone):
    """Spark itself refuses a barrier stage under dynamic allocation; tfos says so before
    submitting, with the settings. Last in this module: it replaces the session."""
    kernel, home = bare_kernel
    _run_ok(kernel, "spark.stop()\nfrom pyspark.sql import SparkSession\n"
                    f"spark = SparkSession.builder.master({spark_standalone!r})"
                    ".config('spark.dynamicAllocation.enabled', 'true')"
                    ".config('spark.dynamicAllocation.shuffleTracking.enabled', 'true')"
                    ".config('spark.pyspark.python', __import__('os').environ['PYSPARK_PYTHON']).getOrCreate()")
    out, _ = _run_error(kernel, "spark.range(4, numPartitions=2).rdd.barrier().mapPartitions(lambda it: it).collect()")
    assert "dynamic" in out.lower(), out  # Spark's own refusal, which the check below anticipates
    _run_ok(kernel, ETL.format(name="dep_da", rows=4000))
    out, took = _run_error(kernel, "%%tf_train dep_da --workers 2 --epochs 1 --label y\n" + MODEL)
    assert "spark.dynamicAllocation.enabled=false" in out and "spark.executor.instances" in out, out
    assert took < 10, took
