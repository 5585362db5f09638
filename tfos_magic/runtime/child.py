"""The TF worker process: one per Spark task, fresh each time.

TF's collective runtime is set up once per process and Spark reuses its Python
workers, so TF never runs in the Spark worker itself. This process reads its Arrow
stream on stdin, runs the user's cell, and leaves a result file for the feeding task.
Usage: python -m tfos_magic.runtime.child CONFIG.json
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import traceback
from typing import Any


_ROOT_ERROR = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception|Failed)): (.+)$", re.M)


def _fail_result(exc: BaseException) -> dict[str, Any]:
    """One readable line for the user; the full traceback stays in the result and the log."""
    from ..errors import TfosError
    from ..feed.arrow_feed import FeedError

    if isinstance(exc, (TfosError, FeedError)):
        message = str(exc)
    else:
        text = str(exc)
        # A Python error raised inside tf.data comes back wrapped in a TF OpError; dig it out.
        inner = [m for m in _ROOT_ERROR.finditer(text) if m.group(1) not in ("Error", "InvalidArgumentError")]
        if inner and "Graph execution error" in text:
            name, detail = inner[-1].group(1), inner[-1].group(2)
            message = detail if name in ("FeedError", "TfosError") else f"{name}: {detail}"
        else:
            message = f"{type(exc).__name__}: {text.strip().splitlines()[0] if text.strip() else ''}"
        frames = traceback.extract_tb(exc.__traceback__)
        where = next((f for f in reversed(frames) if f.filename.startswith("<%%")), None)
        if where:
            message += f" (cell line {where.lineno}: {where.line})"
    return {"status": "error", "error": message, "traceback": traceback.format_exc()}


class _PrintsToNotebook(io.TextIOBase):
    """What the cell prints goes to the notebook as `log` events, line by line, and to the log file."""

    def __init__(self, original: Any, channel: Any, index: int, role: str) -> None:
        self._original, self._channel, self._index, self._role = original, channel, index, role
        self._partial = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        from ..monitor import make_event

        self._original.write(text)
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._channel.send(make_event("log", self._index, role=self._role, text=line))
        return len(text)

    def flush(self) -> None:
        self._original.flush()

    # Libraries that look below the text layer get the real stream's answers.
    def fileno(self) -> int:
        return self._original.fileno()

    def isatty(self) -> bool:
        return self._original.isatty()

    @property
    def encoding(self) -> str:
        return self._original.encoding


def _fenced(result_path: str) -> None:
    """The notebook closed this attempt (a restart, a cancel, or the kernel is gone): stop now,
    before this process writes another checkpoint over the next attempt's.

    The result says so, so that the Spark task does not try to report an error to a
    notebook that is no longer listening for this attempt."""
    print("tfos: the notebook ended this attempt; exiting", file=sys.stderr, flush=True)
    try:
        with open(result_path, "w") as f:
            json.dump({"status": "fenced", "error": "the notebook ended this attempt"}, f)
    finally:
        os._exit(75)


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    from ..monitor import ChannelClient, make_event

    role, index = cfg["role"], cfg["index"]
    channel = ChannelClient(cfg["channel_address"], cfg["job"], cfg["token"], on_close=lambda: _fenced(cfg["result_path"]))
    if not channel.connected:
        return {"status": "error", "error": f"TF {role} {index} {channel.error}. The executors must reach the "
                "notebook's host: set TFOS_DRIVER_HOST (or spark.driver.host) to an address they can reach."}
    channel.send(make_event("started", index, role=role, pid=os.getpid()))
    sys.stdout = _PrintsToNotebook(sys.stdout, channel, index, role)
    namespace: dict[str, Any] = {"__name__": "__tfos_train__"}
    result: dict[str, Any] = {"status": "ok"}
    cleanup: list[Any] = []
    try:
        _train(cfg, channel, namespace, cleanup, result)
    except BaseException as exc:  # noqa: BLE001 - everything must reach the driver
        result = _fail_result(exc)
        traceback.print_exc()
        channel.send(make_event("error", index, role=role, message=result["error"]))
    finally:
        shutdown = namespace.get("shutdown")
        if callable(shutdown):
            try:
                shutdown()
            except Exception as exc:  # noqa: BLE001
                print(f"tfos: shutdown() failed: {exc!r}", file=sys.stderr)
        for item in reversed(cleanup):
            item.close()
        channel.send(make_event("finished", index, role=role, status=result["status"]))
        channel.close()
    return result


def _join_cluster(cfg: dict[str, Any], cleanup: list[Any]) -> dict[str, list[str]]:
    """ps mode: register this task's address and wait for every PS and worker task."""
    import socket

    from ..cluster.registry import client_from_plan

    registry = client_from_plan(cfg, int(cfg["attempt"]))
    cleanup.append(registry)  # closing it ends this task's ephemeral ZooKeeper nodes
    with socket.socket() as s:
        s.bind((cfg["bind_host"], 0))
        port = s.getsockname()[1]
    registry.register(cfg["role"], cfg["index"], f"{cfg['bind_host']}:{port}")
    opts = cfg["options"]
    return registry.wait_cluster({"ps": opts["ps"], "worker": opts["workers"]}, timeout=opts["start_timeout"])


def _train(cfg: dict[str, Any], channel: Any, namespace: dict[str, Any], cleanup: list[Any],
           result: dict[str, Any]) -> None:
    from ..feed.arrow_feed import ArrowFeed
    from ..feed.columns import FeedSpec
    from . import user_code

    opts = cfg["options"]
    ps_mode = opts["strategy"] == "ps"
    cluster = _join_cluster(cfg, cleanup) if ps_mode else None
    import tensorflow as tf

    from . import checkpoints, keras_fit, ps_train
    from .context import TrainContext

    if ps_mode:
        ps_train.graph_mode()
        if cfg["role"] == "ps":
            ps_train.serve(cluster, cfg["index"])
            return
        strategy: Any = ps_train.PSStrategy(cluster, cfg["index"])
    user_code.run_cell(cfg["train_source"], cfg["job"], namespace)
    if not ps_mode:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    feed = ArrowFeed(sys.stdin.buffer, FeedSpec.from_dict(cfg["feed"]), cfg["spill_dir"])
    ctx = (ps_train.PSContext if ps_mode else TrainContext)(
        job=cfg["job"], strategy=strategy, feed=feed, worker_index=cfg["index"], num_workers=cfg["num_workers"],
        checkpoint_dir=cfg["checkpoint_dir"], options=opts, channel=channel)
    cleanup.append(ctx)
    if ctx.is_chief:
        checkpoints.ensure_writable(ctx.checkpoint_dir)
        if opts.get("restart") and int(cfg.get("attempt", 1)) == 1:
            checkpoints.clear(ctx.checkpoint_dir)
    runner = ps_train if ps_mode else keras_fit
    if "build_model" in namespace:
        model = runner.fit(namespace["build_model"], ctx, restart=bool(opts.get("restart")))
    else:
        model = namespace["train"](ctx)
        feed.drain()
    if isinstance(model, tf.keras.Model):
        runner.save_model(model, ctx)
    result["rows"] = feed.rows


def main(argv: list[str]) -> int:
    with open(argv[1]) as f:
        cfg = json.load(f)
    result = run(cfg)
    tmp = cfg["result_path"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, cfg["result_path"])
    sys.stdout.flush()
    sys.stderr.flush()
    # TF's runtime threads can keep a finished process alive; the result is written, so go.
    os._exit(0 if result["status"] == "ok" else 1)


if __name__ == "__main__":
    main(sys.argv)
