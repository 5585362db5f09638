"""The options of a training run, declared once: each field of `TrainOptions` carries its
flag, default, help text and environment variable. The `%%tf_train` and `%tfos_resume`
parsers (and the `tfos` command line) are generated from these declarations, the README
table is checked against them, and they travel in spec.json and in every task's plan.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import TfosError


def option(default: Any, help: str, *, type: Callable[[str], Any] | None = None, env: str | None = None,
           metavar: str | None = None, choices: tuple[str, ...] | None = None, shown_default: str | None = None,
           minimum: float | None = None) -> Any:
    """A TrainOptions field with what its parsers and docs need. `env` names the variable
    that sets its default for a whole site (a cluster's ZooKeeper, a restart policy)."""
    return field(default=default, metadata={
        "help": help, "type": type, "env": env, "metavar": metavar, "choices": choices,
        "shown_default": shown_default, "minimum": minimum})


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _class_weights(text: str) -> dict[int, float]:
    """`0:1,1:20` -> {0: 1.0, 1: 20.0}."""
    weights = {}
    for item in _csv(text):
        cls, sep, weight = item.partition(":")
        try:
            weights[int(cls)] = float(weight)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--class-weight takes CLASS:WEIGHT pairs such as 0:1,1:20, not {item!r}")
        if not sep:
            raise argparse.ArgumentTypeError(f"--class-weight takes CLASS:WEIGHT pairs such as 0:1,1:20, not {item!r}")
    return weights


def _lengths(text: str) -> dict[str, int]:
    """`tokens=64,events=20` -> {"tokens": 64, "events": 20}."""
    out = {}
    for item in _csv(text):
        name, sep, length = item.rpartition("=")
        try:
            out[name] = int(length)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--pad takes COLUMN=LENGTH pairs such as tokens=64, not {item!r}")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"--pad takes COLUMN=LENGTH pairs such as tokens=64, not {item!r}")
    return out


def _fill_value(text: str) -> float | str:
    """A number fills numeric columns; any other text fills text and binary ones."""
    try:
        return float(text)
    except ValueError:
        return text


@dataclass
class TrainOptions:
    """Options of a `%%tf_train` cell; defaults are what a new user should get."""

    workers: int = option(1, "TF workers, one Spark barrier task each", type=int, env="TFOS_WORKERS",
                          metavar="N", minimum=1)
    epochs: int = option(1, "train until N epochs in total (a resumed job continues to N)", type=int,
                         metavar="N", minimum=1)
    batch_size: int = option(128, "rows per step on each worker", type=int, metavar="N", minimum=1)
    label: str | None = option(None, "label column (required by `build_model`)", metavar="COL")
    features: list[str] | None = option(None, "feature columns", type=_csv, metavar="a,b",
                                        shown_default="all but the label and weight")
    inputs: str = option("auto", "one float32 matrix, or a dict of named tensors; auto picks the matrix when "
                         "every feature is floating point (scalars, float arrays, ML vectors, side by side in "
                         "column order) and the dict when an integer, text, binary or ragged column is among them",
                         choices=("auto", "matrix", "dict"))
    ragged: list[str] | None = option(None, "array columns whose rows differ in length, fed as "
                                      "`tf.RaggedTensor`s (--inputs dict)", type=_csv, metavar="a,b")
    pad: dict[str, int] | None = option(None, "array columns whose rows differ in length, padded with zeros "
                                        "(or cut) to LENGTH values", type=_lengths, metavar="COL=LENGTH,...")
    validation_df: str | None = option(None, "a DataFrame streamed as validation data (a variable, or a job "
                                       "registered under that name)", metavar="NAME")
    checkpoint_dir: str | None = option(None, "any `tf.io.gfile` path (local, HDFS, object store); on a cluster, "
                                        "storage the kernel and every executor share (checked before the job runs)",
                                        metavar="PATH", shown_default="`$TFOS_CHECKPOINT_ROOT`/JOB, else job dir")
    checkpoint_every_steps: int = option(0, "also checkpoint every N global steps (always every epoch); "
                                         "a failure loses at most this many steps", type=int, metavar="N",
                                         env="TFOS_CHECKPOINT_EVERY_STEPS", minimum=0)
    shuffle: int = option(65536, "rows each worker's feed mixes at a time as they stream in; later epochs take "
                          "every row in a new order (from memory, see --memory-cache) or the spill's 1,024-row "
                          "blocks in a new order, mixed again; seeded by job, run, worker and epoch; 0 keeps the "
                          "DataFrame's order", type=int, metavar="ROWS", env="TFOS_SHUFFLE", minimum=0)
    memory_cache: int = option(512, "MiB of training rows a worker keeps in memory, decoded once, for its "
                               "epochs after the first (each epoch all rows in a new order, when shuffling); a larger "
                               "partition reads its local spill every epoch; 0 always reads the spill", type=int, metavar="MIB", env="TFOS_MEMORY_CACHE",
                               minimum=0)
    warm_start: int = option(300, "seconds a spare TF process (TensorFlow loaded, nothing else), left in each "
                             "Spark Python worker whose TF task succeeded, waits for the next task there: a re-run "
                             "starts warm; 0: no spares, every task starts its own TF process",
                             type=int, metavar="SECONDS", env="TFOS_WARM_START", minimum=0)
    steps_per_call: int = option(0, "training steps Keras runs in one call (its steps_per_execution): 0 keeps "
                                 "the model's own, and when that is Keras' default of one and no callback of the "
                                 "cell acts per batch, runs the epochs after the first in calls of about 50 ms, "
                                 "sized from the first epoch's step time (a small model's steps cost more in "
                                 "Python than in TensorFlow); N runs N steps a call in every epoch", type=int,
                                 metavar="N", env="TFOS_STEPS_PER_CALL", minimum=0)
    sample_weight: str | None = option(None, "a numeric column of per-row weights for the loss and metrics "
                                       "(Keras' sample_weight); streamed with the features", metavar="COL")
    class_weight: dict[int, float] | None = option(None, "weights of the label's classes in the loss, as Keras' "
                                                   "class_weight (also from fit_options() in the cell)",
                                                   type=_class_weights, metavar="0:1,1:20")
    restart: bool = option(False, "delete earlier checkpoints and metrics, start at step 0", type=bool)
    fillna: float | str | None = option(None, "replace nulls in scalar feature columns: a number fills the "
                                        "numeric ones, other text the text and binary ones", type=_fill_value,
                                        metavar="VALUE")
    strategy: str = option("allreduce", "`MultiWorkerMirroredStrategy`, or variables on parameter servers",
                           choices=("allreduce", "ps"), env="TFOS_STRATEGY")
    framework: str = option("tensorflow", "what trains the cell: TensorFlow (`%%tf_train`), or PyTorch "
                            "DistributedDataParallel (`%%torch_train`, which sets it)", choices=("tensorflow", "torch"))
    ps: int = option(0, "parameter-server tasks, a Spark job of their own", type=int, metavar="N",
                     shown_default="1 (ps)", minimum=0)
    gpus_per_worker: int = option(0, "GPUs each worker task asks for (stage-level scheduling; ignored in "
                                  "local mode)", type=int, metavar="N", env="TFOS_GPUS_PER_WORKER", minimum=0)
    zookeeper: str | None = option(None, "ps mode: register tasks in ZooKeeper instead of the notebook",
                                   metavar="HOST:PORT[/CHROOT]", env="TFOS_ZOOKEEPER")
    zk_auth: str | None = option(None, "digest auth and ACL for the job's znodes", metavar="USER:PASSWORD",
                                 env="TFOS_ZK_AUTH")
    max_restarts: int = option(2, "restarts from the latest checkpoint after a task dies", type=int,
                               metavar="N", env="TFOS_MAX_RESTARTS", minimum=0)
    start_timeout: float = option(180.0, "all TF processes must start within S seconds of the TF stage's first "
                                  "task; the ETL before it takes as long as it needs, but a job none of whose "
                                  "tasks runs for S seconds fails", type=float, metavar="S", env="TFOS_START_TIMEOUT",
                                  minimum=1)
    env: str | None = option(None, "the Python environment the TF processes run on the executors: a packed "
                             "archive (`tfos pack-env`; a path or URI, shipped with the job) or a directory "
                             "present on every node; without it, the executors' own Python",
                             metavar="PATH_OR_URI", env="TFOS_EXECUTOR_ENV")
    mlflow: str = option("auto", "log params, metrics and the model to MLflow from the kernel: auto logs when "
                         "mlflow is installed and a tracking URI is set or a run is active", choices=("off", "auto", "on"),
                         env="TFOS_MLFLOW")
    stall_timeout: float = option(600.0, "fail the job when no worker makes progress for S seconds, showing "
                                  "each worker's last event", type=float, metavar="S", env="TFOS_STALL_TIMEOUT",
                                  minimum=1)

    def to_dict(self, secrets: bool = True) -> dict[str, Any]:
        """As plain data; without `secrets`, the ZooKeeper password is masked (for spec.json)."""
        out = dataclasses.asdict(self)
        if not secrets and out["zk_auth"]:
            user, sep, _ = out["zk_auth"].partition(":")
            out["zk_auth"] = f"{user}:***" if sep else "***"  # a value without a user is all secret
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainOptions":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if values.get("class_weight"):  # JSON keys are strings
            values["class_weight"] = {int(k): float(v) for k, v in values["class_weight"].items()}
        return cls(**values)

    def check(self) -> "TrainOptions":
        """Refuse values no run can use, naming the flag; returns self."""
        for f in dataclasses.fields(self):
            low, value = f.metadata.get("minimum"), getattr(self, f.name)
            if low is not None and value is not None and value < low:
                raise TfosError(f"{flag(f.name)} must be at least {low:g}, not {value}.")
        if self.framework == "torch" and self.strategy == "ps":
            raise TfosError("--strategy ps is TensorFlow's parameter-server mode; a %%torch_train job trains with "
                            "DistributedDataParallel (all-reduce): leave --strategy out.")
        if self.strategy == "ps" and self.ps < 1:
            raise TfosError("--strategy ps needs at least one parameter server: --ps 1 or more.")
        return self


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Add every option to `parser`. Values not given on the line parse as None, so that
    `options_from` can tell them from defaults (an environment variable, or a stored run)."""
    for f in dataclasses.fields(TrainOptions):
        meta = f.metadata
        if meta["type"] is bool:
            parser.add_argument(flag(f.name), action="store_true", default=None, help=meta["help"])
            continue
        default = shown_default(f)
        parser.add_argument(flag(f.name), type=meta["type"] or str, default=None, metavar=meta["metavar"],
                            choices=meta["choices"], help=meta["help"] + (f" (default: {default})" if default else ""))


def shown_default(f: dataclasses.Field, quote: str = "$") -> str:
    """The default as a user reads it: its environment variable first, when it has one."""
    meta = f.metadata
    if meta["shown_default"]:
        return meta["shown_default"]
    if f.default is None or f.default is False:
        plain = ""
    else:
        plain = f"{f.default:g}" if isinstance(f.default, float) else str(f.default)
    if meta["env"]:
        name = f"{quote}{meta['env']}" + ("`" if quote == "`" else "")
        return f"{name}, else {plain}" if plain else name
    return plain


def options_from(args: argparse.Namespace | dict[str, Any], base: TrainOptions | None = None,
                 env: dict[str, str] | None = None) -> TrainOptions:
    """The options a run uses: what the line gave, else `base` (a stored run being
    resumed), else the option's environment variable, else its default."""
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f in dataclasses.fields(TrainOptions):
        meta, value = f.metadata, given.get(f.name)
        if value is None and base is not None:
            value = getattr(base, f.name)
        elif value is None and meta["env"] and env.get(meta["env"]):
            raw = env[meta["env"]]
            try:
                value = (meta["type"] or str)(raw)
            except ValueError:
                raise TfosError(f"${meta['env']}={raw!r} is not a valid {flag(f.name)} value.") from None
        values[f.name] = f.default if value is None else value
    if values["strategy"] == "ps" and given.get("ps") is None and not (base and base.ps):
        values["ps"] = 1  # the default in ps mode; an explicit --ps 0 is refused by check()
    if values["strategy"] != "ps":
        values["ps"] = 0
    return TrainOptions(**values).check()


def markdown_table() -> str:
    """The README's option table, generated from the declarations (a test keeps them equal)."""
    rows = ["| option | default | meaning |", "| --- | --- | --- |"]
    for f in dataclasses.fields(TrainOptions):
        meta = f.metadata
        shown = flag(f.name) + (f" {meta['metavar']}" if meta["metavar"] else "")
        if meta["choices"]:
            shown += " " + "/".join(meta["choices"])
        rows.append(f"| `{shown}` | {shown_default(f, quote='`')} | {meta['help']} |")
    return "\n".join(rows)
