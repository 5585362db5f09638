"""Which Python, TensorFlow and tfos-magic an environment has, and whether a TF process
started from it can train the kernel's job.

The kernel reads its own versions in process; a Spark task asks the Python its TF
process would run (an executor's, or a shipped `--env`) by running this module's source
with that Python, which reads package metadata and imports nothing heavy: an environment
with the wrong TensorFlow, or none, is refused before any TF process starts. This file
imports only the standard library, so that it runs in any Python.
"""

from __future__ import annotations

import json
import sys
from importlib import metadata

# TensorFlow's distributions go by several names; any one of them is "TensorFlow".
TF_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-macos", "tensorflow-intel")


def _version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def versions() -> dict[str, str | None]:
    """This Python's versions; None for a package it does not have."""
    return {"python": "%d.%d.%d" % sys.version_info[:3], "executable": sys.executable,
            "tensorflow": _version(*TF_DISTRIBUTIONS), "tfos_magic": _version("tfos-magic")}


def probe_source() -> str:
    """This module's source, which prints `versions()` as JSON when run as `python -c`
    in another environment. Read through the loader: in a Spark task the module comes
    from the zip the job ships (driver/executor_env.py), not from a file."""
    source = __loader__.get_source(__name__)  # type: ignore[name-defined]
    assert source is not None
    return source


def mismatch(kernel: dict[str, str | None], env: dict[str, str | None], where: str) -> str | None:
    """Why a TF process from the environment `where` cannot train the kernel's job, or None.

    Python must match to the minor version (the cell's code and its pickled options are
    the kernel's), tfos-magic exactly (the task, the TF process and the kernel speak one
    protocol) and TensorFlow exactly (a model or checkpoint from one version may not load
    in another). A kernel without TensorFlow (a thin client) is not compared on it.
    """
    fix = ("Pack the kernel's environment with `tfos pack-env env.tar.gz` and pass --env env.tar.gz "
           "(or set TFOS_EXECUTOR_ENV), or install the same versions there.")
    if env.get("tfos_magic") is None or env.get("tensorflow") is None:
        missing = " and ".join(n for n, k in (("tfos-magic", "tfos_magic"), ("TensorFlow", "tensorflow"))
                               if env.get(k) is None)
        return f"{where} ({env.get('executable')}) has no {missing}, so it cannot run the TF processes. {fix}"
    ours, theirs = str(kernel.get("python")), str(env.get("python"))
    if ours.split(".")[:2] != theirs.split(".")[:2]:
        return f"{where} has Python {theirs} but the notebook's kernel has Python {ours}. {fix}"
    for key, name in (("tfos_magic", "tfos-magic"), ("tensorflow", "TensorFlow")):
        if kernel.get(key) is not None and kernel[key] != env[key]:
            return f"{where} has {name} {env[key]} but the notebook's kernel has {name} {kernel[key]}. {fix}"
    return None


if __name__ == "__main__":
    print(json.dumps(versions()))
