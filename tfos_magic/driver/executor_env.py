"""What a job sends to the executors besides its data: the package's own Python code
(so that a Spark worker with only pyspark and pyarrow can run the feeder) and, with
`--env`, the environment the TF processes run on.

Both go through Spark's own mechanisms (`addPyFile`, `addArchive` on a classic session,
the session's artifacts on Spark Connect: `SparkBackend.ship_py_file`/`ship_archive`),
which work the same on local, standalone, YARN and Kubernetes masters: the cluster
manager fetches and unpacks them on each executor before its first task of the job.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
import zipfile
from pathlib import Path

from ..errors import TfosError
from ..protocol.plan import EnvPlan
from ..protocol.versions import versions
from .spark_backend import SparkBackend

PACKAGE = Path(__file__).resolve().parents[1]
# What Spark unpacks as an archive (org.apache.spark.util.Utils.unpack); anything else is a directory.
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip", ".jar")
# Zip files added to each session, by content: adding one again is a no-op.
_SHIPPED: dict[int, set[str]] = {}


def ship_package(backend: SparkBackend) -> str:
    """Add the package's Python modules as a zip to the session, once per content. A Spark task
    imports only task/ and protocol/ from it; the rest travels so that nothing of the
    package is ever half there. Named by content hash: a changed package is a new file."""
    target = package_zip()
    shipped = _SHIPPED.setdefault(backend.session_key, set())
    if target.name in shipped:
        return target.name
    backend.ship_py_file(str(target))
    shipped.add(target.name)
    return target.name


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _digest(files: list[tuple[str, bytes]]) -> str:
    """The package's content digest: each module's path in the package and its bytes."""
    digest = hashlib.sha256()
    for name, data in files:
        digest.update(name.encode())
        digest.update(data)
    return digest.hexdigest()


def package_zip() -> Path:
    """The zip of this package's modules, in a folder only this user can write, checked
    against the package's own files before it is shipped.

    The executors import it as the notebook's owner, so neither its folder nor its
    content may come from anyone else: a predictable folder in the shared temp dir
    could be made first by another local user, with a zip of their own under the name
    a hash of public sources predicts. A zip already there is used only when its
    content digest is the package's; otherwise it is written again."""
    sources = [(str(p.relative_to(PACKAGE)), p.read_bytes()) for p in _sources()]
    expected = _digest(sources)
    target = _private_dir() / f"tfos_magic-{expected[:16]}.zip"
    if not (target.is_file() and not target.is_symlink() and _zip_digest(target) == expected):
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in sources:
                zf.writestr(str(Path(PACKAGE.name) / name), data)
        os.replace(tmp, target)
    return target


def _zip_digest(path: Path) -> str | None:
    """The content digest of a shipped zip, as `_digest` counts it; None if unreadable."""
    try:
        with zipfile.ZipFile(path) as zf:
            prefix = PACKAGE.name + "/"
            files = sorted((i.filename.removeprefix(prefix), zf.read(i)) for i in zf.infolist()
                           if not i.is_dir())
    except (OSError, zipfile.BadZipFile, ValueError):
        return None
    return _digest(files)


def _private_dir() -> Path:
    """This user's folder for shipped zips: under the user's cache dir, made 0700 and
    checked to be a directory (not a link) that this user owns and no one else can
    write. If the cache dir is unusable, a fresh private temp dir of this process's."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tfos-magic" / "ship"
    try:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        if _owned_and_private(base):
            return base
    except OSError:
        pass
    global _FALLBACK
    if _FALLBACK is None:
        _FALLBACK = Path(tempfile.mkdtemp(prefix="tfos-ship-"))  # 0700, a name no one can predict
    return _FALLBACK


def _owned_and_private(path: Path) -> bool:
    info = os.lstat(path)
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022


_FALLBACK: Path | None = None


def plan_env(backend: SparkBackend, given: str | None) -> EnvPlan:
    """The job's `--env` (or $TFOS_EXECUTOR_ENV) as the tasks will find it; an archive is
    added to the session so that Spark ships it. The kernel's versions go with it: each task
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
        backend.ship_archive(uri, alias)
    except TfosError:
        raise
    except Exception as exc:  # noqa: BLE001 - py4j errors have many types
        raise TfosError(f"--env {given}: Spark could not add the archive: "
                        f"{str(exc).strip().splitlines()[0][:500]}") from None
    return EnvPlan("archive", alias, given, kernel)
