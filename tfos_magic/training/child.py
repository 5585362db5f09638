"""The training process: one per Spark task, fresh each time, TensorFlow or PyTorch.

TF's collective runtime (and PyTorch's process group) is set up once per process and
Spark reuses its Python workers, so training never runs in the Spark worker itself.
This process reads its Arrow stream on stdin, runs the user's cell through its
framework's runner (runners.py), and leaves a result file for the feeding task.
Usage: python -m tfos_magic.training.child CONFIG.json [WAIT_S] (secrets in the
environment: protocol/plan.py). It imports its framework first, then waits up to WAIT_S
seconds for CONFIG.json, which the Spark task writes once the cluster is agreed.
Or `--spare IDLE_S CHANNEL`: a spare for a warm start (task/spares.py), which gets the
same from the first line of its stdin when a task takes it, and answers on its stdout.
"""

from __future__ import annotations

import faulthandler
import io
import json
import os
import select
import socket
import sys
import threading
import time
from typing import Any

from ..protocol.channel import REACH_HINT, SPARES_JOB, ChannelClient, hold_listener
from ..protocol.events import make_event
from ..protocol.logs import log_tail
from ..protocol.plan import FRAMEWORK_ENV, SPARE_TAKEN, SPARE_TOKEN_ENV, TaskConfig
from .failpoints import Failpoint
from .failures import failure
from .peers import me
from .stopping import StopRequested, StopSignal


# What the cell prints reaches the notebook at most this many lines a second per process.
# Each line is an event the kernel handles and writes to metrics.jsonl: a cell printing in
# a tight loop would send more than the kernel reads, and a send that waits its timeout out
# costs the process its channel for a moment. The log file always gets every line.
LOG_LINES_PER_S = 20
LOG_LINE_CHARS = 4000  # longer lines reach the notebook cut, whole in the log file


class _PrintsToNotebook(io.TextIOBase):
    """What the cell prints goes to the log file, and to the notebook as `log` events line
    by line, within `lines_per_s` lines a second. Lines over that are counted, and once
    the second is over one line says how many the notebook did not get."""

    def __init__(self, original: Any, channel: Any, index: int, role: str,
                 lines_per_s: int = LOG_LINES_PER_S) -> None:
        self._original, self._channel, self._index, self._role = original, channel, index, role
        self._lines_per_s = lines_per_s
        self._partial = ""
        self._lock = threading.Lock()  # print() may come from any thread
        self._window = time.monotonic()  # when this second's budget began
        self._shown = 0  # lines sent in this second
        self._hidden = 0  # lines not sent since the last summary
        self._timer: threading.Timer | None = None

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._original.write(text)
        with self._lock:
            lines = (self._partial + text).split("\n")
            self._partial = lines.pop()[:LOG_LINE_CHARS + 1]  # an unended line holds no more than is shown
            for line in lines:
                self._line(line)
        return len(text)

    def _line(self, line: str) -> None:
        """Under the lock: send one line, or count it when this second's budget is spent."""
        now = time.monotonic()
        if now - self._window >= 1.0:
            self._summarise(now)
        if self._shown < self._lines_per_s:
            self._shown += 1
            if len(line) > LOG_LINE_CHARS:
                line = f"{line[:LOG_LINE_CHARS]} [... line cut; the full line is in the TF process's log]"
            self._send(line)
            return
        self._hidden += 1
        if self._timer is None:  # the summary comes even if the cell prints nothing more
            self._schedule(now)

    def _schedule(self, now: float) -> None:
        """Under the lock: wake at the end of this second."""
        self._timer = threading.Timer(max(0.0, self._window + 1.0 - now), self._on_timer)
        self._timer.daemon = True
        self._timer.start()

    def _on_timer(self) -> None:
        with self._lock:
            self._timer = None
            now = time.monotonic()
            if now - self._window >= 1.0:
                self._summarise(now)
            elif self._hidden:  # a later line began a new second, and hid lines again
                self._schedule(now)

    def _summarise(self, now: float) -> None:
        """Under the lock: start a new second, saying first how many lines the last ones hid."""
        if self._hidden:
            self._send(f"[... {self._hidden} lines not shown; the full log is in the TF process's log]")
            self._hidden = 0
        self._window, self._shown = now, 0

    def _send(self, text: str) -> None:
        self._channel.send(make_event("log", self._index, role=self._role, text=text))

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


def abort(config: TaskConfig, channel: Any, message: str) -> None:
    """Fail this process now, from any thread: a peer that stays unreachable while a
    collective's set-up or step waits for it, which no exception would interrupt."""
    print(f"tfos: {message}", file=sys.stderr, flush=True)
    try:
        sent = channel.send(make_event("error", config.index, role=config.role, message=message,
                                       details=log_tail(config.log_path)))
        with open(config.result_path, "w") as f:
            json.dump({"status": "error", "error": message, "sent": bool(sent)}, f)
    finally:
        os._exit(1)


def run(config: TaskConfig) -> dict[str, Any]:
    plan, role, index = config.plan, config.role, config.index
    stop = StopSignal(is_chief=role == "worker" and index == 0, lockstep=plan.options.strategy != "ps",
                      announce=lambda step: channel.send(make_event("stopping", index, role=role, step=step)))
    def on_control(message: dict[str, Any]) -> None:
        if message.get("control") == "halt":  # a peer failed: this attempt is over
            _fenced(config.result_path)
        stop.on_control(message)

    channel = ChannelClient(plan.channel_address, plan.job, plan.token, on_close=lambda: _fenced(config.result_path),
                            on_control=on_control, connect_within=plan.options.start_timeout)
    if not channel.connected:
        return {"status": "error", "error": f"{plan.process_name} {role} {index} {channel.error}. {REACH_HINT}", "sent": False}
    # The GPUs Spark gave this task (task/feeder.py), for the dashboard; None: not assigned.
    # And the Python it runs: the executors' own, or the job's --env (docs/deploy.md).
    # `warm`: this process was a spare, TensorFlow loaded before the job began (task/spares.py).
    channel.send(make_event("started", index, role=role, pid=os.getpid(),
                            gpus=os.environ.get("CUDA_VISIBLE_DEVICES"), python=sys.executable,
                            warm=_WARM["spare"], rss_mib=_WARM["rss_mib"], framework=plan.options.framework))
    failpoint = Failpoint(plan.failpoint, index, plan.attempt, role)
    failpoint.hit("startup")
    sys.stdout = _PrintsToNotebook(sys.stdout, channel, index, role)
    namespace: dict[str, Any] = {"__name__": "__tfos_train__"}
    result: dict[str, Any] = {"status": "ok"}
    cleanup: list[Any] = []
    try:
        _train(config, channel, namespace, cleanup, result, stop, failpoint)
    except StopRequested as exc:
        result = {"status": "stopped", "error": str(exc)}
    except BaseException as exc:  # noqa: BLE001 - everything must reach the driver
        import traceback

        sys.stderr.flush()
        result = failure(exc, log_tail(config.log_path))  # the traceback itself is in the details
        traceback.print_exc()
    finally:
        # The cell's shutdown() runs before the error goes out: the notebook halts the
        # attempt on the first error, and a halted process exits at once.
        shutdown = namespace.get("shutdown")
        if callable(shutdown):
            try:
                shutdown()
            except Exception as exc:  # noqa: BLE001
                print(f"tfos: shutdown() failed: {exc!r}", file=sys.stderr)
        for item in reversed(cleanup):
            item.close()
        if result["status"] == "error":
            # Whether the notebook got it: if not, the Spark task reports it (task/feeder.py).
            result["sent"] = bool(channel.send(make_event("error", index, role=role, message=result["error"],
                                                          details=result["details"])))
        channel.send(make_event("finished", index, role=role, status=result["status"],
                                **({"frameworks": result["frameworks"]} if "frameworks" in result else {})))
        channel.close()
    return result


def _train(config: TaskConfig, channel: Any, namespace: dict[str, Any], cleanup: list[Any],
           result: dict[str, Any], stop: StopSignal, failpoint: Failpoint) -> None:
    """One training process's life, whatever the framework: its runner (runners.py) joins
    the peers, trains and saves; the feed, the reports and the checkpoint dir's rules
    are the same for all."""
    from ..protocol import cells
    from .arrow_feed import ArrowFeed
    from .runners import runner_for

    plan = config.plan
    opts = plan.options
    runner = runner_for(config)
    if runner.join(config, channel, cleanup):  # a parameter server, served until the job ended
        return
    runner.check_checkpoint_dir(plan.checkpoint_dir, plan.checkpoint_marker, me(config))
    cells.run_cell(plan.train_source, plan.job, namespace)
    connection = runner.connect(config, channel)
    feed = ArrowFeed(sys.stdin.buffer, plan.feed, config.workdir, shuffle_rows=opts.shuffle,
                     seed=(plan.job, plan.run, config.index), class_weight=_class_weight(namespace, opts),
                     memory_cache_bytes=opts.memory_cache * 2**20, preprocess=namespace.get("preprocess"))
    ctx = runner.context(connection, job=plan.job, feed=feed, worker_index=config.index,
                         num_workers=config.num_workers, checkpoint_dir=plan.checkpoint_dir, options=opts,
                         channel=channel, log_dir=plan.log_dir, stop=stop, failpoint=failpoint, sample=plan.sample)
    cleanup.append(ctx)
    from .gpu_sampler import GpuSampler, default_source

    # `rows` (handed to training so far) lets the notebook see a custom loop progress.
    cleanup.append(GpuSampler(lambda reading: channel.send(
        make_event("gpu", config.index, rows=feed.rows_delivered, **reading)), default_source()).start())
    # --restart starts the run over once: a later attempt of the same run resumes from the
    # checkpoints this run wrote, as any restart does, unless the attempt before died
    # before its chief cleared the earlier ones (the driver decides: plan.start_over).
    if ctx.is_chief:
        runner.prepare_checkpoints(ctx.checkpoint_dir, plan.start_over)
    model = runner.train(namespace, ctx, plan.start_over)
    if model is not None:
        runner.save(model, ctx, plan.train_source)
    result["rows"] = feed.rows
    # Which frameworks this process loaded: each runner loads its own only.
    result["frameworks"] = [m for m in ("tensorflow", "torch") if m in sys.modules]


FIT_OPTIONS = ("class_weight",)


def _class_weight(namespace: dict[str, Any], opts: Any) -> dict[int, float] | None:
    """The cell's `fit_options()["class_weight"]`, else --class-weight."""
    from ..errors import TfosError

    made = namespace["fit_options"]() if callable(namespace.get("fit_options")) else {}
    if not isinstance(made, dict) or set(made) - set(FIT_OPTIONS):
        raise TfosError(f"fit_options() must return a dict with the keys {', '.join(FIT_OPTIONS)}; it returned "
                        f"{made!r}. Sample weights come from a column: --sample-weight COL.")
    weights = made.get("class_weight") or opts.class_weight
    return {int(k): float(v) for k, v in weights.items()} if weights else None


_WARM: dict[str, Any] = {"spare": False, "rss_mib": None}


def _import_framework() -> None:
    """The job's framework, imported while the process waits for its config (seconds of
    CPU for TensorFlow): TensorFlow, or PyTorch for a %%torch_train job (FRAMEWORK_ENV)."""
    try:
        if os.environ.get(FRAMEWORK_ENV) == "torch":
            import torch  # noqa: F401
        else:
            import tensorflow  # noqa: F401
    except BaseException:  # noqa: BLE001 - raised again where run() imports it, and reported from there
        pass


def _rss_mib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def _wait_as_spare(idle_s: float, channel_address: str) -> tuple[str, float]:
    """A spare (task/spares.py): TensorFlow imported, then wait for a task's hand-over on
    stdin. Ends, without a word, after `idle_s` seconds, when the notebook closes its
    spare connection (retired, or gone) and when its Spark worker closes the pipe."""
    token = os.environ.pop(SPARE_TOKEN_ENV, "")
    try:
        notebook = hold_listener(channel_address, SPARES_JOB, token, timeout=10.0)
    except OSError:
        os._exit(0)  # refused (retired meanwhile) or unreachable: nobody could retire it
    _import_framework()
    ready, _, _ = select.select([sys.stdin.buffer, notebook], [], [], idle_s)
    # A task's hand-over wins over a retirement that came with it: the task waits for the
    # answer below, and the process is the task's from then on (it ends with the task).
    if sys.stdin.buffer not in ready:
        os._exit(0)
    line = sys.stdin.buffer.readline()
    if not line:
        os._exit(0)  # the Spark worker went away
    notebook.close()
    os.write(1, SPARE_TAKEN)  # the task's answer (task/spares.py hand_over); then fd 1 is the log
    handover = json.loads(line)
    log = os.open(handover["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.environ.update(handover["env"])
    _WARM.update(spare=True, rss_mib=_rss_mib())
    return handover["config"], float(handover["wait"])


def main(argv: list[str]) -> int:
    # A crash in native code (TF, Arrow) leaves the Python stack in the log, which the
    # Spark task sends to the notebook's errors/ dir.
    faulthandler.enable()
    if argv[1] == "--spare":
        config_path, wait_s = _wait_as_spare(float(argv[2]), argv[3])
    else:
        # Imported before the config exists: the Spark task writes it after its first batch
        # and the cluster agreement, which this import (seconds of CPU) now overlaps.
        _import_framework()
        config_path, wait_s = argv[1], float(argv[2]) if len(argv) > 2 else 600.0

    config = TaskConfig.wait(config_path, timeout=wait_s)
    os.environ.update(config.env)
    result = run(config)
    tmp = config.result_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, config.result_path)
    sys.stdout.flush()
    sys.stderr.flush()
    # TF's runtime threads can keep a finished process alive; the result is written, so go.
    os._exit(0 if result["status"] == "ok" else 1)


if __name__ == "__main__":
    main(sys.argv)
