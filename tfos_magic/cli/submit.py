"""`tfos submit JOB`: run a stored job from its directory, with no notebook and no kernel.

A job's directory holds both cells' sources, its options and the Spark session it ran
on, so this process can be its driver: it makes a like session, re-runs the stored ETL
source to rebuild the DataFrame, and trains with the stored train source. By default it
continues from the latest checkpoint, as `%tfos_resume` does (a crashed or stopped job
goes on; a finished one trains only what a raised --epochs asks for); `--restart`
trains from step 0. Options given on the line replace the stored ones.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from .. import api
from ..errors import TfosError
from ..job import JobStore
from ..job.store import check_name
from ..protocol.options import TrainOptions
from . import INTERRUPTED
from .progress import ProgressObserver

OPTION_NAMES = tuple(f.name for f in dataclasses.fields(TrainOptions))


def overrides_from(args: Any) -> dict[str, Any]:
    """The train options given on the command line; those not given parse as None, and
    then the stored ones stand (`options_from` with the stored options as its base)."""
    given = {name: getattr(args, name) for name in OPTION_NAMES if getattr(args, name, None) is not None}
    if "zk_auth" in given:
        given["zk_auth"] = zk_auth_from(given["zk_auth"])
    return given


def zk_auth_from(value: str) -> str:
    """A command line shows every argument to every user of the machine (`ps`), so it
    takes the ZooKeeper password only from a file (`--zk-auth @FILE`, its first line) or
    from TFOS_ZK_AUTH, never in clear."""
    if not value.startswith("@"):
        raise TfosError("--zk-auth USER:PASSWORD on a command line shows the password to every user of this machine "
                        "(ps). Put USER:PASSWORD in a file only you can read and pass --zk-auth @FILE, or set "
                        "TFOS_ZK_AUTH.")
    path = Path(value[1:]).expanduser()
    try:
        line = path.read_text().strip().splitlines()[0].strip()
    except (OSError, IndexError, UnicodeDecodeError):
        raise TfosError(f"--zk-auth @{path}: cannot read a USER:PASSWORD line from that file.") from None
    return line


def submit(name: str, overrides: dict[str, Any], parameters: dict[str, Any] | None = None,
           master: str | None = None, bar: bool | None = None) -> int:
    """Run the stored job to its end here; returns 0 when it succeeded, 1 when it was
    stopped (by `%tfos_stop` elsewhere), 130 on Ctrl-C; raises JobFailed (or TfosError)
    when it failed."""
    store = JobStore()
    spec = store.load_spec(check_name(name))
    if not spec.train_source:
        raise TfosError(f"Job {name!r} has never been trained, so its store holds no train cell to run. Train "
                        f"it once from a notebook (`%%tf_train {name} ...`), then `tfos submit {name}` re-runs it.")
    if master:
        os.environ["TFOS_SPARK_MASTER"] = master  # above the stored master, as the variable itself is
    # The driver's tf.keras (e.g. to load the model afterwards) must match the workers'.
    if "tensorflow" not in sys.modules:
        os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    namespace = dict(parameters or {})
    restart = bool(overrides.pop("restart", False))
    try:
        _rebuild_frame(name, namespace, store)
        final = api.resume(name, namespace=namespace, store=store, overrides=overrides, restart=restart,
                           views=lambda spec, spark, has_validation, background: ProgressObserver.for_spec(spec, bar))
    except KeyboardInterrupt:  # the launcher stopped the workers at a checkpoint first
        stopped = (store.read_state(name) or {}).get("state") == "stopped"
        print(f"tfos submit: interrupted; job {name!r} " + (f"stopped: `tfos submit {name}` continues it from "
              "its latest checkpoint" if stopped else "did not start training"), file=sys.stderr)
        return INTERRUPTED
    state = (final or {}).get("state")
    if state == "succeeded":
        return 0
    print(f"tfos submit: job {name!r} ended {state}: {(final or {}).get('error') or 'no error recorded'}",
          file=sys.stderr)
    return 1


def _rebuild_frame(name: str, namespace: dict[str, Any], store: JobStore) -> None:
    """Re-run the stored ETL cell (api.resume then finds its DataFrame). Its errors are the
    user's cell's, so they are told as one line: the exception and what to do."""
    try:
        api.frame(name, namespace, rerun_etl=True, store=store)
    except (TfosError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - anything the user's cell (or Spark for it) raises
        first = (str(exc).strip().splitlines() or [""])[0]
        hint = (" The cell reads a name that an earlier cell of its notebook defined (a notebook parameter?): "
                "bind it with -p NAME=VALUE.") if isinstance(exc, NameError) else \
            " Run the cell in a notebook to see the whole traceback."
        raise TfosError(f"The stored %%spark_etl cell of job {name!r} failed: {type(exc).__name__}: {first}.{hint}"
                        ) from None
