"""Executor environments, the fast parts: the version check's rules, the probe run in a
Python with nothing installed, `tfos pack-env`'s refusals and archive, and `--env`'s
checks in the kernel. The cluster acceptance (a bare executor Python, a packed editable
environment that trains, a TensorFlow mismatch, dynamic allocation) is test_deploy.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile

import pytest
from conftest import make_venv

from tfos_magic.driver.executor_env import plan_env
from tfos_magic.driver.pack_env import pack_env
from tfos_magic.errors import TfosError
from tfos_magic.protocol.versions import mismatch, probe_source, versions

KERNEL = {"python": "3.11.7", "executable": "/k/bin/python", "tensorflow": "2.21.0", "tfos_magic": "0.1.0"}




@pytest.mark.parametrize("env, expected", [
    (dict(KERNEL, python="3.11.2"), None),  # the same minor version is enough for Python
    (dict(KERNEL, tensorflow=None), "has no TensorFlow"),
    (dict(KERNEL, tensorflow=None, tfos_magic=None), "has no tfos-magic and TensorFlow"),
    (dict(KERNEL, python="3.12.1"), "has Python 3.12.1 but the notebook's kernel has Python 3.11.7"),
    (dict(KERNEL, tfos_magic="0.0.9"), "has tfos-magic 0.0.9 but the notebook's kernel has tfos-magic 0.1.0"),
    (dict(KERNEL, tensorflow="2.20.0"), "has TensorFlow 2.20.0 but the notebook's kernel has TensorFlow 2.21.0"),
])
def test_an_environment_must_match_the_kernel(env, expected):
    problem = mismatch(KERNEL, env, "The --env environment 'e.tar.gz'")
    if expected is None:
        assert problem is None
    else:
        assert problem.startswith("The --env environment 'e.tar.gz'") and expected in problem, problem
        assert "tfos pack-env" in problem


def test_a_kernel_without_tensorflow_is_not_compared_on_it():
    assert mismatch(dict(KERNEL, tensorflow=None), dict(KERNEL, tensorflow="2.15.0"), "x") is None


def test_the_probe_runs_in_a_python_with_nothing_installed(tmp_path):
    make_venv(tmp_path / "empty")
    python = str(tmp_path / "empty" / "bin" / "python")
    out = subprocess.run([python, "-c", probe_source()], capture_output=True, text=True, check=True, timeout=60)
    found = json.loads(out.stdout)
    assert found == {"python": versions()["python"], "executable": python, "tensorflow": None, "tfos_magic": None}
    assert "has no tfos-magic and TensorFlow" in mismatch(versions(), found, "The Spark executors' Python")


def test_pack_env_refuses_a_plain_tar_and_an_existing_archive(tmp_path):
    with pytest.raises(TfosError, match=r"\.tar\.gz, \.tgz or \.zip"):
        pack_env(str(tmp_path / "env.tar"))
    (tmp_path / "env.tar.gz").write_bytes(b"old")
    with pytest.raises(TfosError, match="--force"):
        pack_env(str(tmp_path / "env.tar.gz"))


def test_pack_env_packs_a_venv_and_refuses_a_path_outside_it(tmp_path):
    site = make_venv(tmp_path / "v")
    with open(os.path.join(site, "mine.py"), "w") as f:
        f.write("X = 1\n")
    archive = pack_env(str(tmp_path / "v.tar.gz"), prefix=str(tmp_path / "v"), log=lambda _: None)
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        assert tar.getmember("bin/python").issym()
    assert "pyvenv.cfg" in names and any(n.endswith("site-packages/mine.py") for n in names), sorted(names)
    # A .pth that points outside the environment, and is no editable install, is refused.
    with open(os.path.join(site, "elsewhere.pth"), "w") as f:
        f.write(str(tmp_path / "src") + "\n")
    with pytest.raises(TfosError, match="elsewhere.pth"):
        pack_env(str(tmp_path / "v2.tar.gz"), prefix=str(tmp_path / "v"), log=lambda _: None)


def test_env_is_checked_in_the_kernel_before_anything_runs(tmp_path):
    with pytest.raises(TfosError, match="no such archive.*tfos pack-env"):
        plan_env(None, str(tmp_path / "missing.tar.gz"))
    plan = plan_env(None, "/opt/envs/tf")  # a directory on every node: checked by each task
    assert (plan.kind, plan.where) == ("path", "/opt/envs/tf") and plan.kernel == versions()
    assert plan_env(None, None).kind == "executor"
