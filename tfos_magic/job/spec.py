"""The job spec: everything needed to run a job again from its directory alone.

Sources travel as text, never pickles, so a stored job can be re-run by a new
kernel or a batch tool, and read by the sidebar in another process.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..protocol.options import TrainOptions

SPEC_FORMAT = "tfos-job/1"
__all__ = ["SPEC_FORMAT", "JobSpec", "RunOrigin", "TrainOptions", "redact_conf", "REDACTED"]
# Spark's own default for spark.redaction.regex: the keys whose values its UI and logs hide.
DEFAULT_REDACTION = r"(?i)secret|password|token|access[.]?key"
REDACTED = "*********(redacted)"


def redact_conf(conf: dict[str, str], pattern: str | None = None) -> dict[str, str]:
    """`conf` with the value of every secret-looking key replaced, as Spark redacts them
    (`pattern`: the session's spark.redaction.regex): a stored job, `tfos status --json`
    and the sidebar never show a password or an access key in clear."""
    try:
        secret = re.compile(pattern or DEFAULT_REDACTION)
    except re.error:
        secret = re.compile(DEFAULT_REDACTION)
    return {k: REDACTED if secret.search(k) else v for k, v in conf.items()}


@dataclass
class JobSpec:
    """One job: the ETL cell that builds its DataFrame and the train cell that consumes it."""

    name: str
    etl_source: str | None = None
    etl_df_var: str | None = None
    train_source: str | None = None
    options: TrainOptions = field(default_factory=TrainOptions)
    # The Spark session it last ran on: {"master": ..., "conf": {key: value}} (the keys a
    # user sets, not Spark's runtime ones), so a new kernel can make the same session.
    spark: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SPEC_FORMAT,
            "name": self.name,
            "etl": {"source": self.etl_source, "df_var": self.etl_df_var},
            "train": {"source": self.train_source, "options": self.options.to_dict(secrets=False)},
            "spark": self.spark,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobSpec":
        etl = data.get("etl") or {}
        train = data.get("train") or {}
        return cls(
            name=data["name"],
            etl_source=etl.get("source"),
            etl_df_var=etl.get("df_var"),
            train_source=train.get("source"),
            options=TrainOptions.from_dict(train.get("options") or {}),
            spark=data.get("spark"),
        )


@dataclass(frozen=True)
class RunOrigin:
    """Where a run was started: the notebook (the path the Jupyter server gave its kernel)
    and the id of the cell that ran it. Written into state.json when the run starts, so the
    sidebar can lead from a job back to its cell; both are None for a run with no
    notebook (the `tfos` command line), and for a kernel that does not say them."""

    notebook_path: str | None = None
    cell_id: str | None = None

    def state_fields(self) -> dict[str, str | None]:
        return {"notebook_path": self.notebook_path, "cell_id": self.cell_id}
