"""What `pip install` of the wheel brings: the dashboard's bundled JS (no Node needed at
install), the `tfos` kernel spec, which Jupyter lists with no extra command, and the
config that enables the server extension."""

import json
import os
import subprocess
import zipfile

import pytest
from conftest import venv_with_wheel


def test_the_wheel_holds_the_bundled_widget_and_the_kernel_spec(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "tfos_magic/ui/static/dashboard.js" in names
    spec = next(n for n in names if n.endswith("share/jupyter/kernels/tfos/kernel.json"))
    kernel = json.loads(zipfile.ZipFile(wheel).read(spec))
    assert kernel["argv"][0] == "python" and "--InteractiveShellApp.extensions=tfos_magic" in kernel["argv"]
    assert not any("node_modules" in n or n.startswith(("widget/", "labextension/")) for n in names)
    # The server extension (the sidebar's API) is enabled by installing the wheel.
    config = next(n for n in names if n.endswith("etc/jupyter/jupyter_server_config.d/tfos_magic.json"))
    assert json.loads(zipfile.ZipFile(wheel).read(config)) == {"ServerApp": {"jpserver_extensions": {"tfos_magic": True}}}


@pytest.mark.e2e
def test_a_plain_pip_install_into_a_fresh_venv_lists_the_kernel(wheel, tmp_path):
    fresh = tmp_path / "fresh"
    python = venv_with_wheel(wheel, fresh)
    # Only what the install put in place: no JUPYTER_PATH of the test session or the user.
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER")}
    listing = subprocess.run([str(python), "-m", "jupyter_client.kernelspecapp", "list", "--json"],
                             capture_output=True, text=True, timeout=120, env=env)
    assert listing.returncode == 0, listing.stderr[-2000:]
    specs = json.loads(listing.stdout)["kernelspecs"]
    assert "tfos" in specs, specs.keys()
    assert specs["tfos"]["resource_dir"].startswith(str(fresh)), specs["tfos"]["resource_dir"]
    assert specs["tfos"]["spec"]["display_name"] == "Python 3 (tfos-magic)"
