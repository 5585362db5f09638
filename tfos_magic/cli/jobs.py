"""`tfos jobs` and `tfos status JOB`: read the job store, start nothing.

Both read what every other reader reads (state.json reconciled, so a run whose kernel
died shows `interrupted`), as a table or, with --json, as data for scripts.
"""

from __future__ import annotations

import json
import time
from typing import Any

from ..job import Job, JobStore
from ..job.spec import redact_conf
from ..job.store import check_name
from ..protocol.options import TrainOptions

DEFAULTS = TrainOptions().to_dict()


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def jobs(as_json: bool = False) -> int:
    store = JobStore()
    rows = [Job(n, store).overview() for n in store.names()]
    if as_json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"No tfos jobs in {store.jobs_dir}.")
        return 0
    print(f"{'job':24} {'state':11} {'step':>7} {'loss':>10}  updated")
    for r in rows:
        note = f"  (kernel lost {_when(r['interrupted_at'])}; tfos submit {r['job']} resumes it)" \
            if r["state"] == "interrupted" else ""
        print(f"{r['job']:24} {r['state']:11} {_num(r['step']):>7} {_num(r['loss']):>10}  {_when(r['updated'])}{note}")
    return 0


def status(name: str, as_json: bool = False) -> int:
    job = Job(check_name(name), JobStore())  # an unknown job: a TfosError naming the known ones
    spark = dict(job.spec.spark or {})
    if spark.get("conf"):  # a job stored by an older version may hold secrets in clear
        spark["conf"] = redact_conf(spark["conf"])
    info = dict(job.overview(), options=job.spec.options.to_dict(secrets=False), spark=spark or None,
                dir=job.dir, checkpoint_dir=job.checkpoint_dir)
    if as_json:
        print(json.dumps(info, indent=1))
        return 0
    lines = [
        ("state", info["state"] + (f" (kernel lost {_when(lost)})" if (lost := info["interrupted_at"]) else "")),
        ("run", str(info["run"])),
        ("progress", f"epoch {info['epoch']} of {info['epochs']}, step {_num(info['step'])}, "
                     f"loss {_num(info['loss'])}"),
        ("updated", _when(info["updated"])),
        ("latest checkpoint", info["latest_checkpoint"] or "none"),
        ("last metrics", ", ".join(f"{k}={_num(v)}" for k, v in (info["last_metrics"] or {}).items()) or "none"),
        ("options", " ".join(f"{k}={v}" for k, v in info["options"].items() if v != DEFAULTS.get(k)) or "defaults"),
        # A Connect job's server (sc://host:port) says more than the server's own master.
        ("spark", (info["spark"] or {}).get("remote") or (info["spark"] or {}).get("master") or "-"),
        ("dir", info["dir"]),
    ]
    if info["error"]:
        lines.append(("error", info["error"] + (f" (details: {info['error_file']})" if info["error_file"] else "")))
    print(f"tfos job {name!r}")
    for label, text in lines:
        print(f"  {label}: {text}")
    return 0
