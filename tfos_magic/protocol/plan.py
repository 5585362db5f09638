"""The plan the notebook sends to every task of an attempt, and one TF process's config.

Both are typed here, built in one place (`driver/launcher.py` makes the plan, the Spark
task adds which task it is) and read everywhere else as attributes. They cross process
and host boundaries as JSON. Secrets (the attempt's channel token, the ZooKeeper
password) are left out of the JSON file a TF process reads its config from, and
reach it through its environment instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from .feed_spec import FeedSpec
from .options import TrainOptions

TOKEN_ENV = "TFOS_CHANNEL_TOKEN"
SPARE_TOKEN_ENV = "TFOS_SPARE_TOKEN"  # a spare's, to listen as one (task/spares.py)
SPARE_TAKEN = b"tfos: spare taken\n"  # a spare's answer to a task's hand-over, on its stdout
ZK_AUTH_ENV = "TFOS_REGISTRY_AUTH"
# Which framework a training process imports while it waits for its config (training/child.py).
FRAMEWORK_ENV = "TFOS_FRAMEWORK"


@dataclass(frozen=True)
class RegistryPlan:
    """Where PS and worker tasks register: "embedded" (the notebook's channel) or "zookeeper"."""

    kind: str = "embedded"
    hosts: str | None = None
    auth: str | None = None  # USER:PASSWORD for a digest ACL


@dataclass(frozen=True)
class EnvPlan:
    """Which Python runs the job's TF processes (docs/deploy.md). "executor": the Spark
    worker's own; "archive": a packed environment Spark ships with the job and unpacks on
    each executor under the name `where` (SparkFiles); "path": a prefix present on every
    node (relative to the SparkFiles directory, else to the task's working directory).
    `kernel` holds the kernel's versions, which the environment must match."""

    kind: str = "executor"
    where: str = ""
    given: str = ""  # what the user passed, for messages
    kernel: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskPlan:
    """One attempt of one job, as every Spark task of it sees it."""

    job: str
    run: int
    channel_address: str  # host:port of the notebook's channel
    host: str | None  # where TF binds; None: the executor's own address
    train_source: str
    feed: FeedSpec
    options: TrainOptions
    checkpoint_dir: str
    registry: RegistryPlan = field(default_factory=RegistryPlan)
    log_dir: str = ""  # TensorBoard event files (chief only); "" for none
    attempt: int = 0
    token: str = ""
    spare_token: str = ""  # what the spares this job leaves listen with (task/spares.py); "": none
    # --restart's clearing of earlier checkpoints is still to do: true until an attempt's
    # chief got past its set-up (which clears them), so that an attempt killed before that
    # does not leave the next one to resume from an earlier run's checkpoint.
    start_over: bool = False
    # Fault injection for recovery tests (training/failpoints.py): from the kernel's
    # TFOS_FAILPOINT, so that it reaches the TF processes on any cluster. None in use.
    failpoint: str | None = None
    env: EnvPlan = field(default_factory=EnvPlan)
    # On a cluster: a file the kernel wrote into the checkpoint dir, which every worker
    # must see before it trains (driver/checkpoint_dir.py); None in local mode.
    checkpoint_marker: str | None = None
    # Rows for build_model(sample), the same on every worker: an Arrow IPC stream in base64
    # (driver/sample.py); "" when build_model takes no sample.
    sample: str = ""

    @property
    def strategy(self) -> str:
        return self.options.strategy

    @property
    def process_name(self) -> str:
        """What messages call a training process: "TF" or "PyTorch"."""
        return "PyTorch" if self.options.framework == "torch" else "TF"

    def for_attempt(self, attempt: int, token: str, spare_token: str = "", start_over: bool = False) -> "TaskPlan":
        return dataclasses.replace(self, attempt=attempt, token=token, spare_token=spare_token, start_over=start_over)

    def with_array_lengths(self, lengths: dict[str, int]) -> "TaskPlan":
        """The fixed-length arrays' lengths, as the tasks found them, beside the --pad lengths."""
        return dataclasses.replace(self, feed=dataclasses.replace(self.feed, array_lengths={**lengths,
                                                                                           **self.feed.array_lengths}))

    def to_dict(self, secrets: bool = True) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["feed"] = self.feed.to_dict()
        out["options"] = self.options.to_dict(secrets=secrets)
        out["registry"] = dataclasses.asdict(self.registry)
        out["env"] = dataclasses.asdict(self.env)
        if not secrets:
            out["token"] = None
            out["spare_token"] = ""
            out["registry"]["auth"] = None
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TaskPlan":
        return cls(**dict(d, feed=FeedSpec.from_dict(d["feed"]), options=TrainOptions.from_dict(d["options"]),
                          registry=RegistryPlan(**d["registry"]), env=EnvPlan(**d.get("env", {}))))


@dataclass(frozen=True)
class TaskConfig:
    """One TF process: the attempt's plan, which task it is, and where its files go."""

    plan: TaskPlan
    role: str  # "worker" or "ps"
    index: int
    num_workers: int
    bind_host: str
    workdir: str  # the task's private dir: config, spill files, log and result
    # Environment the TF process sets once it reads this config (it is started before the
    # cluster is agreed: TF_CONFIG comes here, not through its initial environment).
    env: dict[str, str] = field(default_factory=dict)

    @property
    def result_path(self) -> str:
        return os.path.join(self.workdir, "result.json")

    @property
    def log_path(self) -> str:
        return os.path.join(self.workdir, "tf.log")

    @property
    def config_path(self) -> str:
        return os.path.join(self.workdir, "config.json")

    def secret_env(self) -> dict[str, str]:
        """The secrets, for the TF process's environment rather than a file."""
        env = {TOKEN_ENV: self.plan.token}
        if self.plan.registry.auth:
            env[ZK_AUTH_ENV] = self.plan.registry.auth
        return env

    def write(self) -> str:
        """Written whole, then renamed into place: the TF process may be polling for it."""
        data = {"role": self.role, "index": self.index, "num_workers": self.num_workers,
                "bind_host": self.bind_host, "workdir": self.workdir, "env": self.env,
                "plan": self.plan.to_dict(secrets=False)}
        # Owner-only, although the secrets travel in the environment (secret_env), not here.
        tmp = self.config_path + ".tmp"
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(data, f)
        os.replace(tmp, self.config_path)
        return self.config_path

    @classmethod
    def wait(cls, path: str, timeout: float, env: dict[str, str] | None = None) -> "TaskConfig":
        """The config, once the Spark task has written it. The task starts this process
        first and writes the config after its first batch and the cluster agreement; a
        task that fails meanwhile kills this process, so the timeout only bounds a
        task that hangs."""
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no task config at {path} after {timeout:.0f} s")
            time.sleep(0.02)
        return cls.read(path, env)

    @classmethod
    def read(cls, path: str, env: dict[str, str] | None = None) -> "TaskConfig":
        env = os.environ if env is None else env
        with open(path) as f:
            data = json.load(f)
        plan = data.pop("plan")
        plan["token"] = env.get(TOKEN_ENV, "")
        plan["registry"]["auth"] = env.get(ZK_AUTH_ENV)
        options = dict(plan["options"], zk_auth=plan["registry"]["auth"])
        return cls(plan=TaskPlan.from_dict(dict(plan, options=options)), **data)
