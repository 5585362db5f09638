"""`tfos pack-env`: pack the kernel's environment into an archive for `--env`.

A venv goes through venv-pack and a conda environment through conda-pack, the tools
Spark's own docs use for `spark.archives`. venv-pack refuses an environment with an
editable install (`pip install -e .`), which notebook environments often hold, since the
archive would point at a source folder the executors do not have. Here each editable
project is built into a wheel instead, installed into a staging prefix, and its files
replace the editable install's in the archive: the environment itself is not changed.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Callable, Iterator, Sequence
from urllib.parse import unquote, urlparse

from ..errors import TfosError

# Spark unpacks a plain .tar with its own Java code, which refuses the absolute link a
# venv keeps to its base interpreter; .tar.gz and .tgz go through `tar`, .zip through unzip.
FORMATS = (".tar.gz", ".tgz", ".zip")


@dataclass(frozen=True)
class Editable:
    """One editable install in the environment: its name, source folder and files."""

    name: str
    project: str
    files: frozenset[str]  # absolute paths, as its RECORD lists them


def editable_installs(site_packages: str) -> list[Editable]:
    """The distributions in `site_packages` installed in editable mode (PEP 610's
    direct_url.json says so), with the files their installs made (.pth, finder, dist-info)."""
    found = []
    for dist in metadata.distributions(path=[site_packages]):
        try:
            direct = json.loads(dist.read_text("direct_url.json") or "{}")
        except ValueError:
            continue
        if not direct.get("dir_info", {}).get("editable"):
            continue
        url = urlparse(direct.get("url", ""))
        project = unquote(url.path) if url.scheme == "file" else ""
        files = frozenset(os.path.normpath(os.path.join(site_packages, str(f))) for f in dist.files or ())
        found.append(Editable(dist.metadata["Name"], project, files))
    return found


def pack_env(output: str, *, prefix: str | None = None, exclude: Sequence[str] = (),
             python_prefix: str | None = None, compress_level: int = 4, force: bool = False,
             log: Callable[[str], None] = print) -> str:
    """Pack the environment at `prefix` (default: this Python's) into `output`; returns
    its absolute path. `exclude` holds glob patterns of paths inside the environment to
    leave out (what the TF processes never use, such as JupyterLab)."""
    prefix = os.path.abspath(prefix or sys.prefix)
    output = os.path.abspath(os.path.expanduser(output))
    if not output.lower().endswith(FORMATS):
        raise TfosError(f"{output}: name the archive .tar.gz, .tgz or .zip (Spark unpacks a plain .tar with "
                        "code that refuses the environment's link to its Python).")
    if os.path.exists(output) and not force:
        raise TfosError(f"{output} exists; pass --force to replace it.")
    started = time.monotonic()
    if os.path.isdir(os.path.join(prefix, "conda-meta")):
        _pack_conda(prefix, output, exclude, python_prefix, compress_level, force)
    elif os.path.exists(os.path.join(prefix, "pyvenv.cfg")):
        _pack_venv(prefix, output, exclude, python_prefix, compress_level, force, log)
    else:
        raise TfosError(f"{prefix} is neither a virtualenv nor a conda environment: run the kernel in one "
                        "(python -m venv, conda create), install tfos-magic there, and pack that.")
    size = os.path.getsize(output) / 2**20
    log(f"tfos: packed {prefix} into {output} ({size:,.0f} MiB, {time.monotonic() - started:.0f} s).")
    log(f"tfos: pass --env {output} to %%tf_train (or set TFOS_EXECUTOR_ENV={output}).")
    return output


def _pack_conda(prefix: str, output: str, exclude: Sequence[str], python_prefix: str | None,
                compress_level: int, force: bool) -> None:
    if python_prefix:
        raise TfosError("--python-prefix applies to virtualenvs: a conda environment carries its own Python.")
    try:
        import conda_pack
    except ImportError:
        raise TfosError("Packing a conda environment needs conda-pack: conda install conda-pack "
                        "(or pip install conda-pack).") from None
    try:
        conda_pack.pack(prefix=prefix, output=output, compress_level=compress_level,
                        force=force, filters=[("exclude", p) for p in exclude])
    except conda_pack.CondaPackException as exc:
        raise TfosError(f"conda-pack could not pack {prefix}: {exc}") from None


def _pack_venv(prefix: str, output: str, exclude: Sequence[str], python_prefix: str | None,
               compress_level: int, force: bool, log: Callable[[str], None]) -> None:
    import venv_pack
    from venv_pack import core

    site_packages = _site_packages(prefix)
    editables = editable_installs(site_packages)
    with tempfile.TemporaryDirectory(prefix="tfos-pack-") as tmp:
        staged: list[core.File] = []
        for editable in editables:
            log(f"tfos: {editable.name} is an editable install of {editable.project}: packing a wheel built from it")
            staged += _stage_wheel(prefix, editable, os.path.join(tmp, editable.name))
        replaced = {path for e in editables for path in e.files}
        with _editables_replaced(core, prefix, site_packages, replaced):
            env = venv_pack.Env(prefix)
        targets = {f.target for f in staged}
        parents = {folder for t in targets for folder in _ancestors(t)}
        # The editable install's own files go; so does anything where a staged file or
        # folder lands (a link the install made into the source folder, an old script).
        env.files = [f for f in env.files if os.path.normpath(f.source) not in replaced
                     and f.target not in targets and f.target not in parents] + staged
        for pattern in exclude:
            env = env.exclude(pattern)
        try:
            env.pack(output=output, python_prefix=python_prefix, compress_level=compress_level, force=force)
        except venv_pack.VenvPackException as exc:
            raise TfosError(f"venv-pack could not pack {prefix}: {exc}") from None


def _site_packages(prefix: str) -> str:
    found = glob.glob(os.path.join(prefix, "lib", "python*", "site-packages"))
    if len(found) != 1:
        raise TfosError(f"{prefix}: expected one lib/pythonX.Y/site-packages, found {len(found)}.")
    return found[0]


def _ancestors(path: str) -> Iterator[str]:
    while path:
        path = os.path.dirname(path)
        if path:
            yield path


def _stage_wheel(prefix: str, editable: Editable, folder: str) -> list:
    """Build `editable`'s wheel with the environment's own pip (offline first: its build
    backend is usually installed; else with pip's build isolation) and install it, with
    no dependencies, into a staging prefix; the files as venv-pack records."""
    from venv_pack.core import File

    if not editable.project or not os.path.isdir(editable.project):
        raise TfosError(f"{editable.name} is an editable install of {editable.project or 'an unknown folder'}, "
                        "which does not exist: reinstall it (pip install -e PATH or pip install NAME).")
    python = os.path.join(prefix, "bin", "python")
    wheels, staging = os.path.join(folder, "wheels"), os.path.join(folder, "prefix")
    build = [python, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", wheels, editable.project]
    result = subprocess.run(build[:4] + ["--no-build-isolation"] + build[4:], capture_output=True, text=True)
    if result.returncode != 0:
        result = subprocess.run(build, capture_output=True, text=True)
    built = glob.glob(os.path.join(wheels, "*.whl"))
    if result.returncode != 0 or not built:
        raise TfosError(f"Could not build a wheel of the editable install {editable.name} from {editable.project}:\n"
                        f"{(result.stderr or result.stdout).strip()[-2000:]}")
    install = [python, "-m", "pip", "install", "--quiet", "--no-deps", "--ignore-installed", "--no-compile",
               "--no-warn-script-location", "--prefix", staging, *built]
    result = subprocess.run(install, capture_output=True, text=True)
    if result.returncode != 0:
        raise TfosError(f"Could not install the wheel of {editable.name}: {result.stderr.strip()[-2000:]}")
    staged = []
    for root, _dirs, files in os.walk(staging):
        for name in files:
            source = os.path.join(root, name)
            staged.append(File(source, os.path.relpath(source, staging)))
    return staged


@contextlib.contextmanager
def _editables_replaced(core, prefix: str, site_packages: str, handled: set[str]) -> Iterator[None]:
    """venv-pack refuses every .pth line that points outside the environment, and has no
    option to skip that check. The editable installs' files (`handled`) are being replaced
    by wheels, so their .pth files may point outside; any other such line is still refused."""
    original = core.check_no_editable_packages

    def check(_context) -> None:
        outside = []
        for pth in glob.glob(os.path.join(site_packages, "*.pth")):
            if os.path.normpath(pth) in handled:
                continue
            with open(pth) as f:
                for line in f:
                    line = line.rstrip()
                    if line and not line.startswith(("#", "import ")):
                        where = os.path.normpath(os.path.join(site_packages, line))
                        if not where.startswith(prefix):
                            outside.append(f"{os.path.basename(pth)}: {line}")
        if outside:
            raise TfosError("The environment has .pth entries outside it that are not editable installs, which "
                            "the executors could not follow:\n" + "\n".join(f"- {o}" for o in outside))

    core.check_no_editable_packages = check
    try:
        yield
    finally:
        core.check_no_editable_packages = original
