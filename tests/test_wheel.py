"""The JupyterLab sidebar ships prebuilt in the wheel: `pip install` puts it where
JupyterLab finds it, enabled, with no Node and no `jupyter lab build`.

How the install is checked, cheaply and honestly: the wheel goes, with `--no-deps`, into
a fresh virtualenv (no system site-packages) whose PATH is its own bin alone, so no
Node. TensorFlow and Spark are not needed to serve a lab extension, so instead of
installing them the venv borrows this environment's libraries (jupyterlab,
jupyter_server) through a plain path entry (conftest.venv_with_wheel), which hides this
checkout's editable install: tfos_magic and the extension's files come from the wheel
only. Jupyter's user and config dirs point into the test's temp dir, so an extension
linked for development elsewhere cannot stand in for the installed one.
"""

import json
import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from conftest import venv_with_wheel

SHARE = "share/jupyter/labextensions/tfos-magic"


def _data(names: list[str], suffix: str) -> str:
    """The wheel entry of a shared-data file (under tfos_magic-VERSION.data/data/)."""
    return next(n for n in names if n.endswith(f"{SHARE}/{suffix}"))


def test_the_wheel_holds_the_prebuilt_lab_extension_once(wheel):
    archive = zipfile.ZipFile(wheel)
    names = archive.namelist()
    package = json.loads(archive.read(_data(names, "package.json")))
    assert package["name"] == "tfos-magic" and package["jupyterlab"]["extension"] is True
    # The built entry point and the style module are there, next to package.json.
    assert any(n.endswith(f"{SHARE}/{package['jupyterlab']['_build']['load']}") for n in names)
    assert any(n.endswith(f"{SHARE}/static/style.js") for n in names)
    install = json.loads(archive.read(_data(names, "install.json")))
    assert (install["packageManager"], install["packageName"]) == ("python", "tfos-magic")
    # Shipped once: not also inside the Python package, and no sources or node_modules.
    assert not any(n.startswith("tfos_magic/labextension/") for n in names)
    assert not any(n.endswith(".ts") or "node_modules" in n for n in names)


@pytest.mark.e2e
def test_pip_install_enables_the_sidebar_without_node(wheel, tmp_path):
    fresh = tmp_path / "fresh"
    python = venv_with_wheel(wheel, fresh)
    # Nothing of this session's setup: no PYTHONPATH to a checkout, no Jupyter paths.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "JUPYTER", "NODE", "NPM"))}
    env.update(PATH=str(fresh / "bin"), HOME=str(tmp_path / "home"),
               JUPYTER_DATA_DIR=str(tmp_path / "data"), JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"))
    assert shutil.which("node", path=env["PATH"]) is None

    def run(*args: str) -> str:
        done = subprocess.run([str(python), *args], capture_output=True, text=True, timeout=300, env=env,
                              cwd=tmp_path)
        assert done.returncode == 0, f"{args}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
        return re.sub(r"\x1b\[[0-9;]*m", "", done.stdout + done.stderr)  # no colour codes

    where = run("-c", "import tfos_magic; print(tfos_magic.__file__)").strip()
    assert where.startswith(str(fresh)), where

    # `jupyter labextension list`: the extension, from the venv's share dir, enabled and OK.
    listing = run("-m", "jupyterlab.labextensions", "list")
    line = re.search(r"^\s*tfos-magic v\S+ (.*)$", listing, re.MULTILINE)
    assert line, listing
    # Enabled and compatible, and known as installed by pip (the wheel's install.json).
    assert line.group(1).split()[:2] == ["enabled", "OK"], listing
    assert "(python, tfos-magic)" in line.group(1), listing
    folders = re.findall(r"^(/\S+)$", listing[: line.start()], re.MULTILINE)
    assert folders and folders[-1] == str(fresh / SHARE.rsplit("/", 1)[0]), listing

    # JupyterLab's own smoke test of a server with the installed extensions, no browser.
    run("-m", "jupyterlab.browser_check", "--no-browser-test", "--allow-root")
    assert Path(fresh / SHARE / "install.json").is_file()
