"""The options of a `%%tf_train` cell: stored in spec.json, and sent with every task's plan."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


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
