"""TensorFlow's runners: all-reduce (MultiWorkerMirroredStrategy, Keras' fit or our step
loop: keras_fit.py) and parameter servers (between-graph replication: ps_train.py)."""

from __future__ import annotations

import json
from typing import Any

import tensorflow as tf

from ..protocol.keras_kinds import kind_of
from ..protocol.net import ReservedPort
from ..protocol.plan import TaskConfig
from . import checkpoints, keras_fit, ps_train
from .context import TrainContext
from .peers import me, wait_reachable, watch_reachable

PACK_BYTES = 32 << 20


def allreduce_strategy(num_workers: int) -> Any:
    """MultiWorkerMirroredStrategy, its gradients all-reduced in a few packed collectives
    rather than one per tensor. One worker has no peer to reduce with: it gets TF's
    default strategy (MirroredStrategy with several local GPUs), which skips the
    collective runtime's start-up and its per-step cost."""
    if num_workers > 1:
        return tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(bytes_per_pack=PACK_BYTES))
    if len(tf.config.list_logical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


class _TensorFlow:
    """What both TF runners share: tf.io.gfile checkpoint dirs, and Keras models saved."""

    module: Any = keras_fit

    def check_checkpoint_dir(self, directory: str, marker: str | None, who: str) -> None:
        checkpoints.check_shared(directory, marker, who)

    def prepare_checkpoints(self, directory: str, restart: bool) -> None:
        checkpoints.ensure_writable(directory)
        if restart:
            checkpoints.clear(directory)

    def context(self, connection: Any, **common: Any) -> Any:
        return TrainContext(strategy=connection, **common)

    def train(self, namespace: dict[str, Any], ctx: Any, restart: bool) -> Any:
        if "build_model" in namespace:
            return keras_fit.fit(namespace["build_model"], ctx, restart=restart,
                                 make_callbacks=namespace.get("callbacks"))
        model = namespace["train"](ctx)
        ctx.feed.drain()
        return model

    def save(self, model: Any, ctx: Any, source: str) -> None:
        if kind_of(model) is not None and hasattr(model, "save"):  # a Keras model of either Keras
            self.module.save_model(model, ctx, source)


class TfAllReduce(_TensorFlow):
    """MultiWorkerMirroredStrategy over the workers' TF_CONFIG (task/feeder.py agreed it)."""

    def join(self, config: TaskConfig, channel: Any, cleanup: list[Any]) -> bool:
        return False

    def connect(self, config: TaskConfig, channel: Any) -> Any:
        _watch_peers(config, channel)
        return allreduce_strategy(config.num_workers)


class TfParameterServer(_TensorFlow):
    """Between-graph replication: each task registers its address, PS tasks serve the
    variables until the job ends, and workers train in TF1 graphs."""

    module: Any = ps_train

    def __init__(self) -> None:
        self._cluster: dict[str, list[str]] | None = None

    def join(self, config: TaskConfig, channel: Any, cleanup: list[Any]) -> bool:
        self._cluster = cluster = _join_cluster(config, cleanup)
        timeout = config.plan.options.start_timeout
        ps_train.graph_mode()
        if config.role == "ps":
            server = ps_train.start_server(cluster, config.index)
            # A PS receives each worker's updates from that worker's own server.
            wait_reachable({f"worker {i}": a for i, a in enumerate(cluster["worker"])}, timeout, me(config))
            server.join()
            return True
        self._strategy = ps_train.PSStrategy(cluster, config.index)
        wait_reachable({f"ps {i}": a for i, a in enumerate(cluster["ps"])}, timeout, me(config))
        return False

    def connect(self, config: TaskConfig, channel: Any) -> Any:
        return self._strategy

    def context(self, connection: Any, **common: Any) -> Any:
        return ps_train.PSContext(strategy=connection, **common)

    def train(self, namespace: dict[str, Any], ctx: Any, restart: bool) -> Any:
        if "build_model" in namespace:
            return ps_train.fit(namespace["build_model"], ctx, restart=restart)
        return super().train(namespace, ctx, restart)


def _join_cluster(config: TaskConfig, cleanup: list[Any]) -> dict[str, list[str]]:
    """ps mode: register this task's address and wait for every PS and worker task."""
    from .registry import client_for

    registry = client_for(config.plan)
    cleanup.append(registry)  # closing it ends this task's ephemeral ZooKeeper nodes
    port = ReservedPort()  # held until the process ends: see ReservedPort
    cleanup.append(port)
    address = f"{config.bind_host}:{port.port}"
    registry.register(config.role, config.index, address)
    opts = config.plan.options
    return registry.wait_cluster({"ps": opts.ps, "worker": opts.workers}, timeout=opts.start_timeout)


def _watch_peers(config: TaskConfig, channel: Any) -> None:
    """All-reduce: the collective's set-up blocks until every peer answers, so the peers
    are watched from a thread; one that stays unreachable fails this process."""
    if config.num_workers < 2:
        return
    from .child import abort

    addresses = json.loads(config.env.get("TF_CONFIG", "{}")).get("cluster", {}).get("worker", [])
    peers = {f"worker {i}": a for i, a in enumerate(addresses) if i != config.index}
    watch_reachable(peers, config.plan.options.start_timeout, me(config),
                    on_failure=lambda message: abort(config, channel, message))
