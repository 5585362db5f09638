"""The job spec: everything needed to run a job again from its directory alone.

Sources travel as text, never pickles, so a stored job can be re-run by a new
kernel or a batch tool, and read by the sidebar in another process.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SPEC_FORMAT = "tfos-job/1"


@dataclass
class TrainOptions:
    """Options of a `%%tf_train` cell; defaults are what a new user should get."""

    workers: int = 1
    epochs: int = 1
    batch_size: int = 128
    label: str | None = None
    features: list[str] | None = None
    validation_df: str | None = None
    checkpoint_dir: str | None = None
    checkpoint_every_steps: int = 0
    restart: bool = False
    fillna: float | None = None
    inputs: str = "auto"
    strategy: str = "allreduce"
    ps: int = 0
    gpus_per_worker: int = 0
    zookeeper: str | None = None
    zk_auth: str | None = None
    max_restarts: int = 2
    start_timeout: float = 180.0

    def to_dict(self, secrets: bool = True) -> dict[str, Any]:
        """As plain data; without `secrets`, the ZooKeeper password is masked (for spec.json)."""
        out = dataclasses.asdict(self)
        if not secrets and out["zk_auth"]:
            out["zk_auth"] = out["zk_auth"].split(":", 1)[0] + ":***"
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainOptions":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class JobSpec:
    """One job: the ETL cell that builds its DataFrame and the train cell that consumes it."""

    name: str
    etl_source: str | None = None
    etl_df_var: str | None = None
    train_source: str | None = None
    options: TrainOptions = field(default_factory=TrainOptions)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SPEC_FORMAT,
            "name": self.name,
            "etl": {"source": self.etl_source, "df_var": self.etl_df_var},
            "train": {"source": self.train_source, "options": self.options.to_dict(secrets=False)},
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
        )
