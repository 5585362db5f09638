"""What a job sends to the executors besides its data: the package's own Python code
(so that a Spark worker with only pyspark and pyarrow can run the feeder) and, with
`--env`, the environment the TF processes run on.

Both go through Spark's own mechanisms (`addPyFile`, `addArchive`), which work the same
on local, standalone, YARN and Kubernetes masters: the cluster manager fetches and
unpacks them on each executor before its first task of the job.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from pathlib import Path

from pyspark import SparkContext

from ..errors import TfosError
from ..protocol.plan import EnvPlan
from ..protocol.versions import versions

PACKAGE = Path(__file__).resolve().parents[1]
# What Spark unpacks as an archive (org.apache.spark.util.Utils.unpack); anything else is a directory.
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip", ".jar")
# Zip files added to each SparkContext, by content: adding one again is a no-op.
_SHIPPED: dict[int, set[str]] = {}


def ship_package(sc: SparkContext) -> str:
    """Add the package's Python modules as a zip to `sc`, once per content. A Spark task
    imports only task/ and protocol/ from it; the rest travels so that nothing of the
    package is ever half there. Named by content hash: a changed package is a new file."""
    sources = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)
    digest = hashlib.sha256()
    for path in sources:
        digest.update(str(path.relative_to(PACKAGE)).encode())
        digest.update(path.read_bytes())
    name = f"tfos_magic-{digest.hexdigest()[:16]}.zip"
    shipped = _SHIPPED.setdefault(id(sc), set())
    if name in shipped:
        return name
    folder = Path(tempfile.gettempdir()) / f"tfos-ship-{os.getuid()}"
    folder.mkdir(exist_ok=True)
    target = folder / name
    if not target.exists():
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in sources:
                zf.write(path, str(Path(PACKAGE.name) / path.relative_to(PACKAGE)))
        os.replace(tmp, target)
    sc.addPyFile(str(target))
    shipped.add(name)
    return name


def plan_env(sc: SparkContext, given: str | None) -> EnvPlan:
    """The job's `--env` (or $TFOS_EXECUTOR_ENV) as the tasks will find it; an archive is
    added to `sc` so that Spark ships it. The kernel's versions go with it: each task
    checks the environment against them before it starts a TF process."""
    kernel = versions()
    if not given:
        return EnvPlan("executor", "", "", kernel)
    if not given.lower().endswith(ARCHIVE_SUFFIXES):
        return EnvPlan("path", given, given, kernel)
    uri = given
    stamp = ""
    if "://" not in given or given.startswith("file://"):
        path = os.path.abspath(os.path.expanduser(given.removeprefix("file://")))
        if not os.path.isfile(path):
            raise TfosError(f"--env {given}: no such archive. Make one with `tfos pack-env {given}`, or pass a "
                            "directory that exists on every node.")
        stat = os.stat(path)
        uri, stamp = path, f"{stat.st_mtime_ns}:{stat.st_size}"
    # Spark keeps the first archive added under a name for the whole session; an alias
    # that follows the file's mtime and size ships a rebuilt archive again.
    alias = "tfos-env-" + hashlib.sha256(f"{uri}|{stamp}".encode()).hexdigest()[:12]
    try:
        sc.addArchive(f"{uri}#{alias}")
    except Exception as exc:  # noqa: BLE001 - py4j errors have many types
        raise TfosError(f"--env {given}: Spark could not add the archive: "
                        f"{str(exc).strip().splitlines()[0][:500]}") from None
    return EnvPlan("archive", alias, given, kernel)
