"""The kernel's channel under a large job: hundreds of workers connecting at once, then
sending their step events, with the real server, sink and dashboard model.

This process stands for the notebook's kernel. It runs the real server
(`driver/channel.py`, on 127.0.0.1) with the sink a job uses,
`RunMonitor(store, job, run).sink_for(attempt)`, which appends every event to
metrics.jsonl through a `JobStore` in a temp dir, and the embedded registry's request
handler. Its main thread does what the supervisor's watch loop does: every 0.2 s
`RunMonitor.drain()` into the dashboard's model (`ui/model.DashboardModel`), and once a
second the status and new points that the widget would send (the widget's own ZMQ cost
is bench/dashboard.py's).

The simulated workers run in --hosts separate processes (spawned), so that this
process's CPU is the kernel's alone. Each worker opens two connections, as a TF process
does in ps mode: a listening `ChannelClient` with `on_control` (the TF process's own) and
a request connection (the embedded registry client's), on which it registers itself.
All workers connect at the same instant. A worker with a failed connection is one whose
TF process would refuse to start. Then each connected worker sends `step` events (as
`ctx.report` does, its send time in `time`) at --rate events/s for --seconds seconds.

Per case: connections that failed (of 2 a worker), the time until the last connection
was settled, events/s reaching the sink, the delay from send to the sink's return
(p50/p99, the sink's own work included), the mean time spent in the sink per event, this
process's CPU over the sending interval (its own getrusage: all its threads, no
children) as a fraction of one core, and its RSS growth (peak over the whole case, from
just before the workers connect).

Side by side in the same run, for each worker count:
  backlog 2048 + retry   the server as shipped (listen backlog 2048), clients with
                         connect_within (--connect-within, the TF process passes its
                         --start-timeout)
  backlog 5, one try     socketserver's default backlog, clients as before (one try,
                         10 s timeout)

Usage: .venv/bin/python bench/channel_load.py [--workers 256,1024] [--rate 2,1]
                                              [--seconds 10] [--hosts 8] [--connect-within 30]
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Callable

# Only the client side here: the host processes are spawned and import this module again.
# The kernel's side (server, supervisor with pyspark, dashboard) is imported where it is used.
from tfos_magic.protocol.channel import ChannelClient
from tfos_magic.protocol.events import make_event

JOB = "bench"
HOST_WAIT_S = 120.0  # the longest a host process waits for its next command
SETTLE_S = 2.0  # after the sending interval: events still on their way may arrive
MIB = 2**20


@dataclass(frozen=True)
class Case:
    workers: int
    rate: float  # events/s per worker
    backlog: int
    connect_within: float | None  # None: one try, as before
    label: str


# --- the simulated workers (host processes) ------------------------------------------
class SimWorker:
    """One TF process's two connections: the listening one its events go through, and
    the registry's request connection."""

    def __init__(self, index: int, address: str, token: str, timeout: float, connect_within: float | None) -> None:
        self.index, self.address, self.token = index, address, token
        self.timeout, self.connect_within = timeout, connect_within
        self.listen: ChannelClient | None = None
        self.requests: ChannelClient | None = None
        self.errors: list[str] = []
        self.seconds = 0.0
        self.step = 0

    def connect(self, at: float) -> None:
        time.sleep(max(0.0, at - time.time()))
        started = time.monotonic()
        self.listen = self._open(on_control=lambda message: None)
        if self.listen.connected:  # else the TF process has already given up (training/child.py)
            self.requests = self._open()
        if self.requests is not None and self.requests.connected:
            try:
                self.requests.request({"op": "register", "role": "worker", "index": self.index,
                                       "address": f"127.0.0.1:{20000 + self.index}", "attempt": 1})
            except (OSError, ValueError) as exc:
                self.errors.append(f"registry request: {type(exc).__name__}: {exc}")
        self.seconds = time.monotonic() - started
        if self.listen.connected:
            self.listen.send(make_event("started", self.index, role="worker", pid=os.getpid()))

    def _open(self, **kwargs: Any) -> ChannelClient:
        client = ChannelClient(self.address, JOB, self.token, timeout=self.timeout,
                               connect_within=self.connect_within, **kwargs)
        if not client.connected:
            self.errors.append(_error_kind(client.error or "", self.address))
        return client

    @property
    def up(self) -> bool:
        return bool(self.listen and self.listen.connected)

    def send_step(self) -> None:
        """What `ctx.report` sends once a second; `time` is the send time."""
        self.step += 1
        assert self.listen is not None
        self.listen.send(make_event("step", self.index, role="worker", step=self.step,
                                    metrics={"loss": 1.0 / self.step, "rows_per_s": 20000.0},
                                    rows=self.step * 512))

    def close(self) -> None:
        for client in (self.listen, self.requests):
            if client is not None:
                client.close()


def _error_kind(error: str, address: str) -> str:
    """A client's error without the address and the port: errors of one kind count together."""
    return error.replace(f"cannot open the metrics channel to the notebook at {address}: ", "")


def _command(pipe: Connection, name: str) -> Any:
    """The kernel's next command, or exit when it never comes (the kernel died)."""
    if not pipe.poll(HOST_WAIT_S):
        sys.exit(f"host {os.getpid()}: no {name!r} from the kernel within {HOST_WAIT_S:.0f}s")
    got, value = pipe.recv()
    if got != name:
        sys.exit(f"host {os.getpid()}: expected {name!r}, got {got!r}")
    return value


def host_main(pipe: Connection, address: str, token: str, indices: list[int], timeout: float,
              connect_within: float | None) -> None:
    """A process simulating some of the workers: all connect at the kernel's instant,
    report, send steps in the kernel's interval, report, and close on its word."""
    sys.stderr = open(os.devnull, "w")  # the clients print each failure; they are counted instead
    workers = [SimWorker(i, address, token, timeout, connect_within) for i in indices]
    pipe.send(("ready", None))
    at = _command(pipe, "connect")
    threads = [threading.Thread(target=w.connect, args=(at,), daemon=True) for w in workers]
    for t in threads:
        t.start()
    budget = time.monotonic() + (connect_within or 0) + 3 * timeout + 10
    for t in threads:
        t.join(timeout=max(0.0, budget - time.monotonic()))
    pipe.send(("connected", [(w.index, w.seconds, w.errors, w.up) for w in workers]))
    t0, seconds, rate = _command(pipe, "send")
    pipe.send(("sent", _send_steps([w for w in workers if w.up], t0, seconds, rate)))
    _command(pipe, "stop")
    for w in workers:
        w.close()


def _send_steps(workers: list[SimWorker], t0: float, seconds: float, rate: float) -> int:
    """Each worker's steps at `rate` a second from `t0`, each worker at a random phase (as
    independent TF processes are); late sends go at once, none is skipped."""
    plan = sorted((t0 + (random.random() + k) / rate, i) for i in range(len(workers))
                  for k in range(int(seconds * rate)))
    for when, i in plan:
        time.sleep(max(0.0, when - time.time()))
        workers[i].send_step()
    return len(plan)


# --- the kernel's side (this process) ------------------------------------------------
class DashboardFeed:
    """The dashboard's model, fed as the live dashboard feeds it (ui/widget.py), minus the
    widget's messages: every event, then once a tick the status and the new points."""

    def __init__(self, workers: int) -> None:
        from tfos_magic.ui.model import DashboardModel
        from tfos_magic.ui.widget import TICK_S

        self.model = DashboardModel(JOB, workers=workers, epochs=1)
        self.tick_s = TICK_S
        self._last = 0.0

    # the JobObserver hooks RunMonitor.drain calls
    def on_event(self, event: dict[str, Any]) -> None:
        self.model.feed(event)

    def on_log(self, line: str) -> None:
        self.model.add_log(line)

    def on_poll(self) -> None:
        now = time.monotonic()
        if now - self._last >= self.tick_s:
            self._last = now
            self.model.status()
            self.model.take_delta()


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@dataclass
class Kernel:
    """The channel, the job's real sink and its main-thread loop, with the arrivals timed."""

    case: Case
    home: str
    arrivals: list[tuple[float, float]] = field(default_factory=list)  # (arrived, sent) per step event
    sink_cpu_s: float = 0.0
    rss_peak: int = 0

    def __post_init__(self) -> None:
        import psutil

        from tfos_magic.driver.channel import DriverChannel
        from tfos_magic.driver.registry import EmbeddedRegistry
        from tfos_magic.driver.supervisor import POLL_S, RunMonitor
        from tfos_magic.job import JobStore

        self._proc = psutil.Process()
        self.poll_s = POLL_S  # the supervisor's drain interval
        self.monitor = RunMonitor(JobStore(self.home), JOB, run=1)
        self.view = DashboardFeed(self.case.workers)
        self.channel = DriverChannel("127.0.0.1", backlog=self.case.backlog)
        self.token = self.channel.register(JOB, self._timed(self.monitor.sink_for(1)), EmbeddedRegistry().handle)
        self.address = f"127.0.0.1:{self.channel.port}"

    def _timed(self, sink: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
        """The sink, noting each step event's arrival and the CPU the sink itself used for
        it (its thread's CPU time: waits for the GIL and the monitor's lock not counted)."""
        def timed(event: dict[str, Any]) -> None:
            sent, start = event.get("time"), time.thread_time()
            sink(event)
            if event.get("kind") == "step":
                self.sink_cpu_s += time.thread_time() - start  # a lost update now and then: a mean
                self.arrivals.append((time.time(), float(sent)))
        return timed

    def rss(self) -> int:
        return self._proc.memory_info().rss

    def tick(self) -> None:
        """The supervisor's loop body: drain into the observers on the main thread."""
        self.monitor.drain(self.view)
        self.view.on_poll()
        self.rss_peak = max(self.rss_peak, self.rss())

    def run_until(self, done: Callable[[], bool], deadline: float) -> bool:
        """Tick every `poll_s` until `done()` or the wall-clock `deadline`; whether done."""
        while not done():
            left = deadline - time.time()
            if left <= 0:
                return False
            time.sleep(min(self.poll_s, left))
            self.tick()
        return True

    def close(self) -> None:
        self.channel.unregister(JOB)
        self.channel.close()


class Hosts:
    """The host processes and their pipes; every wait is bounded by the kernel's ticks."""

    def __init__(self, kernel: Kernel, count: int, timeout: float) -> None:
        ctx = mp.get_context("spawn")  # fresh processes: nothing of the kernel's server inherited
        shares = [list(range(i, kernel.case.workers, count)) for i in range(count)]
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        for indices in shares:
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=host_main, daemon=True,
                               args=(theirs, kernel.address, kernel.token, indices, timeout, kernel.case.connect_within))
            proc.start()
            theirs.close()
            self.pipes.append(ours)
            self.procs.append(proc)
        self.kernel = kernel
        self._got: dict[int, Any] = {}

    def tell(self, name: str, value: Any) -> None:
        for pipe in self.pipes:
            pipe.send((name, value))

    def gather(self, name: str, timeout: float) -> list[Any]:
        """Every host's `name` report, ticking the kernel meanwhile."""
        self._got = {}

        def all_in() -> bool:
            for i, pipe in enumerate(self.pipes):
                if i not in self._got and pipe.poll():
                    got, value = pipe.recv()
                    assert got == name, f"expected {name!r} from host {i}, got {got!r}"
                    self._got[i] = value
            return len(self._got) == len(self.pipes)

        if not self.kernel.run_until(all_in, time.time() + timeout):
            raise TimeoutError(f"{len(self.pipes) - len(self._got)} host processes sent no {name!r} within {timeout:.0f}s")
        return [self._got[i] for i in range(len(self.pipes))]

    def close(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(("stop", None))
            except OSError:
                pass
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for pipe in self.pipes:
            pipe.close()


def run_case(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    """One worker count against one server: connect, send, measure, clean up."""
    home = tempfile.mkdtemp(prefix="tfos-channel-load-")
    kernel = Kernel(case, home)
    hosts = None
    try:
        hosts = Hosts(kernel, min(args.hosts, case.workers), args.timeout)
        hosts.gather("ready", timeout=60)
        rss0 = kernel.rss_peak = kernel.rss()
        hosts.tell("connect", time.time() + 0.5)
        connect_budget = (case.connect_within or 0) + 3 * args.timeout + 20
        outcomes = [o for share in hosts.gather("connected", connect_budget) for o in share]
        t0 = time.time() + 1.0
        hosts.tell("send", (t0, args.seconds, case.rate))
        kernel.run_until(lambda: time.time() >= t0, t0 + 5)
        cpu0, wall0 = _cpu_s(), time.time()
        kernel.run_until(lambda: time.time() >= t0 + args.seconds, t0 + args.seconds + 5)
        cpu1, wall1 = _cpu_s(), time.time()
        sent = sum(hosts.gather("sent", args.seconds + 60))
        kernel.run_until(lambda: False, time.time() + SETTLE_S)
        return summarise(case, kernel, outcomes, sent, (t0, t0 + args.seconds), (cpu1 - cpu0) / (wall1 - wall0), rss0)
    finally:
        if hosts is not None:
            hosts.close()
        kernel.close()
        shutil.rmtree(home, ignore_errors=True)


def summarise(case: Case, kernel: Kernel, outcomes: list[tuple[int, float, list[str], bool]], sent: int,
              window: tuple[float, float], cpu: float, rss0: int) -> dict[str, Any]:
    t0, t1 = window
    arrivals = list(kernel.arrivals)
    delays = sorted(arrived - sent_at for arrived, sent_at in arrivals if t0 <= sent_at <= t1)
    errors = collections.Counter(e for _, _, errs, _ in outcomes for e in errs)
    return {
        "case": case,
        "failed_conns": sum(errors.values()) - sum(n for e, n in errors.items() if e.startswith("registry request")),
        "failed_workers": sum(1 for _, _, errs, _ in outcomes if errs),
        "errors": errors,
        "settled_s": max((s for _, s, _, _ in outcomes), default=0.0),
        "expected_per_s": sum(1 for _, _, _, up in outcomes if up) * case.rate,
        "sent": sent,
        "per_s": sum(1 for arrived, _ in arrivals if t0 <= arrived <= t1) / (t1 - t0),
        "p50_ms": 1000 * statistics.median(delays) if delays else float("nan"),
        "p99_ms": 1000 * delays[min(len(delays) - 1, int(0.99 * len(delays)))] if delays else float("nan"),
        "lost": sent - len(arrivals),  # sent on a connection that was up, never reached the sink
        "sink_us": 1e6 * kernel.sink_cpu_s / max(1, len(arrivals)),
        "sink_core": kernel.sink_cpu_s / (t1 - t0),
        "cpu": cpu,
        "rss_mib": (kernel.rss_peak - rss0) / MIB,
    }


def print_table(results: list[dict[str, Any]]) -> None:
    print(f"{'workers':>7}  {'server and clients':<22} {'failed conns':>12} {'workers down':>12} {'settled':>8} "
          f"{'events/s':>8} {'(of)':>6} {'p50 ms':>7} {'p99 ms':>7} {'sink us':>7} {'kernel CPU':>10} {'RSS growth':>10}")
    for r in results:
        c = r["case"]
        print(f"{c.workers:>7}  {c.label:<22} {r['failed_conns']:>12} {r['failed_workers']:>12} "
              f"{r['settled_s']:>7.1f}s {r['per_s']:>8,.0f} {r['expected_per_s']:>6,.0f} {r['p50_ms']:>7.1f} "
              f"{r['p99_ms']:>7.1f} {r['sink_us']:>7.0f} {100 * r['cpu']:>9.1f}% {r['rss_mib']:>6.1f} MiB")
    print("failed conns: connections that never opened (a worker opens its registry connection only once its "
          "first is up); workers down: TF processes that would not start; settled: when the last worker's "
          "connections had opened or failed; (of): the events/s the connected workers sent; "
          "sink us: CPU time in RunMonitor.sink per step event (its append to metrics.jsonl included)")


def print_comparison(results: list[dict[str, Any]]) -> None:
    by_workers: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
    for r in results:
        by_workers[r["case"].workers].append(r)
    for workers, (new, old) in sorted(by_workers.items()):
        print(f"{workers} workers, {old['case'].label} vs {new['case'].label}: "
              f"{old['failed_conns'] - new['failed_conns']:+d} failed connections, "
              f"{old['failed_workers'] - new['failed_workers']:+d} workers that could not start, "
              f"settled {old['settled_s'] / max(new['settled_s'], 1e-9):.1f}x as late, "
              f"events/s {old['per_s'] / max(new['per_s'], 1e-9):.2f}x, "
              f"kernel CPU {old['cpu'] / max(new['cpu'], 1e-9):.2f}x")
        print(f"  {new['case'].label}: the sink used {100 * new['sink_core']:.1f}% of a core, of the kernel's "
              f"{100 * new['cpu']:.1f}%")
        for r in (new, old):
            if r["lost"]:
                print(f"  {r['case'].label}: {r['lost']} of {r['sent']} step events sent never reached the sink")
        for r in (new, old):
            if r["errors"]:
                kinds = "; ".join(f"{n} x {e}" for e, n in r["errors"].most_common(4))
                print(f"  {r['case'].label} errors: {kinds}")


def cases(args: argparse.Namespace) -> list[Case]:
    workers = [int(w) for w in args.workers.split(",")]
    rates = [float(r) for r in args.rate.split(",")] if args.rate else [2.0 if n <= 256 else 1.0 for n in workers]
    if len(rates) == 1:
        rates *= len(workers)
    if len(rates) != len(workers):
        sys.exit("--rate: one value, or one per --workers entry")
    out = []
    for n, rate in zip(workers, rates):
        out.append(Case(n, rate, 2048, args.connect_within, "backlog 2048 + retry"))
        out.append(Case(n, rate, 5, None, "backlog 5, one try"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", default="256,1024", help="simulated worker counts, comma-separated")
    ap.add_argument("--rate", default=None, help="step events a second per worker: one value, or one per "
                    "--workers entry (default 2 up to 256 workers, else 1: 512 events/s for 256, 1,024 for 1024)")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of the measured sending interval")
    ap.add_argument("--hosts", type=int, default=8, help="processes that simulate the workers")
    ap.add_argument("--connect-within", type=float, default=30.0,
                    help="the retrying clients' connect_within (a job passes --start-timeout, 180 s by default)")
    ap.add_argument("--timeout", type=float, default=10.0, help="each client's socket timeout (the TF process's)")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    results = []
    for case in cases(args):
        print(f"  {case.workers} workers, {case.label} ...", file=sys.stderr, flush=True)
        results.append(run_case(case, args))
    print(f"{os.cpu_count()} cores, load average {load:.2f} before and {os.getloadavg()[0]:.2f} after; "
          f"{args.hosts} host processes simulate the workers, 2 connections each; "
          f"{args.seconds:g} s of step events measured; kernel CPU is this process's, as a fraction of one core")
    print_table(results)
    print_comparison(results)


if __name__ == "__main__":
    main()
