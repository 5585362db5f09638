"""The REST API over a store full of bad files, in a real Jupyter server (as test_server.py).

A job's files are data that whoever can write its directory controls, and the server reads
them for every user with its token. Whatever they hold (a 64 MB metrics.jsonl, a 40 MB line
with no newline, a FIFO, JSON that is no object, bytes that are no UTF-8, NaN, random
mutations of good lines), the list answers 200 with every good job as it is, each bad job
answers as a row of its own, answers stay strict JSON, the server's memory stays bounded
and its event loop free: `/api/status` answers within a second while a big file is read.
"""

import asyncio
import json
import os
import random
import threading
import time

import psutil
import pytest

# The jp_* fixtures, for this module only (as in test_server.py).
from pytest_jupyter.jupyter_server import *  # noqa: F403, I001

from test_store import release_fifo
from tfos_magic.job import JobSpec, JobStore, TrainOptions
from tfos_magic.job.digest import JobDigest

BIG_MB = 64  # metrics.jsonl of valid step lines
LONG_LINE_MB = 40  # one line with no newline
RSS_GROWTH_MB = 100  # what the server may grow by, reading all of it (the old reader took > 1 GB)
STATUS_S = 1.0


@pytest.fixture
def jp_server_config(tfos_home):
    return {"ServerApp": {"jpserver_extensions": {"tfos_magic": True, "jupyter_server_terminals": False},
                          "allow_unauthenticated_access": False}}


def _strict(body: bytes):
    """The body as a browser's JSON.parse reads it: NaN and Infinity are no JSON."""
    def refuse(constant: str):
        raise ValueError(f"{constant} in an answer")
    return json.loads(body, parse_constant=refuse)


@pytest.fixture
def get(jp_fetch, jp_asyncio_loop):
    """GET a path of the server: (status, strict JSON body)."""

    def call(*parts: str, **params: str) -> tuple[int, object]:
        response = jp_asyncio_loop.run_until_complete(
            jp_fetch(*parts, params=params, raise_error=False, request_timeout=60))
        return response.code, _strict(response.body)

    return call


def _line(event: dict) -> bytes:
    return json.dumps(event).encode() + b"\n"


def _step(step: int, loss: float = 0.5) -> dict:
    return {"v": 1, "kind": "step", "worker": 0, "run": 1, "attempt": 1, "time": 1000.0 + step, "step": step,
            "metrics": {"loss": loss, "rows_per_s": 100.0}, "rows": 64 * step}


CHECKPOINT = {"v": 1, "kind": "checkpoint", "worker": 0, "step": 7, "epoch": 1, "path": "/c/ckpt-7",
              "reason": "epoch", "time": 2000.0}


def _job(store: JobStore, name: str, lines: bytes = b"", started: float = 1000.0) -> None:
    store.save_spec(JobSpec(name, etl_source="spark.range(10)", train_source="def build_model(): ...",
                            options=TrainOptions(workers=2, epochs=3, label="y")))
    store.write_state(name, state="succeeded", run=1, attempt=1, started=started, workers=2)
    if lines:
        store.metrics_path(name).write_bytes(lines)


def _repeated(path, block: bytes, megabytes: int, head: bytes = b"") -> None:
    """A file of `head`, then `block` repeated to `megabytes` MB, written fast."""
    chunk = block * max(1, (4 << 20) // len(block))
    with open(path, "wb") as f:
        f.write(head)
        for _ in range(-(-(megabytes << 20) // len(chunk))):
            f.write(chunk)


def _mutations(seed: int, n: int) -> bytes:
    """`n` lines made from good events by random byte flips, cuts, inserts and splices."""
    rng = random.Random(seed)
    good = [_line(_step(5)), _line(CHECKPOINT), _line({"kind": "epoch", "worker": 0, "epoch": 1, "metrics": {"a": 1}}),
            _line({"kind": "gpu", "worker": 0, "devices": [{"gpu": 0, "utilization": 50.0}]})]
    out = []
    for _ in range(n):
        line = bytearray(rng.choice(good)[:-1])
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(line))
            op = rng.randrange(4)
            if op == 0:
                line[at] = rng.randrange(256)
            elif op == 1:
                del line[at:at + rng.randint(1, 8)]
            elif op == 2:
                line[at:at] = rng.choice([b"NaN", b"-Infinity", b"1e999", b"[", b"{", b"\xc3", b"null", b'"x"', b"[]"])
            else:
                line[at:] = rng.choice(good)[rng.randrange(20):-1]
        out.append(bytes(line).replace(b"\n", b" ") + b"\n")
    return b"".join(out)


GOOD = ("good_a", "good_b")
BAD = ("big", "long_line", "fifo", "array", "bad_utf8", "non_object", "non_finite", "fuzzed", "bad_state")


@pytest.fixture
def bad_store(tfos_home) -> JobStore:
    """Two good jobs, and a job for each kind of bad file."""
    store = JobStore(tfos_home)
    _job(store, "good_a", _line(_step(1, 1.0)) + _line(_step(2, 0.25)) + _line(CHECKPOINT), started=5000.0)
    _job(store, "good_b", started=4000.0)
    _job(store, "big")
    _repeated(store.metrics_path("big"), b"".join(_line(_step(s)) for s in range(1, 1001)), BIG_MB)
    _job(store, "long_line")  # a step, then a log line still being written, with no newline
    _repeated(store.metrics_path("long_line"), b"x" * 4096, LONG_LINE_MB, head=_line(_step(3)) + b'{"text": "')
    _job(store, "fifo")
    os.mkfifo(store.metrics_path("fifo"))
    _job(store, "array", _line(CHECKPOINT) + b"[1, 2, 3]\n" + _line(_step(8)))
    _job(store, "bad_utf8", _line(CHECKPOINT) + b'\xff\xfe{"kind": "step"}\n' + _line(_step(8)))
    _job(store, "non_object", _line(CHECKPOINT) + b'{"kind": "step", "worker": 0, "step": 8, "metrics": [1]}\n'
         + b'{"kind": "epoch", "worker": 0, "epoch": 1, "metrics": "x"}\n')
    _job(store, "non_finite", _line(CHECKPOINT)
         + b'{"kind": "step", "worker": 0, "step": 8, "metrics": {"loss": NaN, "rows_per_s": Infinity}}\n'
         + b'{"kind": "epoch", "worker": 0, "epoch": 1, "metrics": {"loss": -Infinity, "acc": 1e999}}\n')
    _job(store, "fuzzed", _line(CHECKPOINT) + _mutations(19, 2000) + _line(_step(9)))
    _job(store, "bad_state")
    store.job_dir("bad_state").joinpath("state.json").write_text("[1, 2]")  # JSON, but no object
    return store


class _PeakRss:
    """The process's largest RSS while it runs, sampled every few milliseconds (the server runs
    in this process)."""

    def __init__(self) -> None:
        self._process, self.base = psutil.Process(), psutil.Process().memory_info().rss
        self.peak, self._done = self.base, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self) -> "_PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.base) / 2**20


@pytest.fixture
def fifo_released(bad_store):
    yield
    release_fifo(bad_store.metrics_path("fifo"))


def test_bad_files_cannot_break_the_list_nor_the_details_and_memory_stays_bounded(bad_store, get, fifo_released):
    with _PeakRss() as rss:
        for _ in range(4):  # the big file is folded over a few polls; nothing is folded twice
            status, body = get("tfos", "api", "jobs")
            assert status == 200, body
        details = {name: get("tfos", "api", "jobs", name) for name in GOOD + BAD}
    assert rss.growth_mb < RSS_GROWTH_MB, f"the server grew by {rss.growth_mb:.0f} MB"

    rows = {row["name"]: row for row in body["jobs"]}
    assert set(rows) == set(GOOD + BAD), "every job is listed"
    assert [n for n in rows if n in GOOD] == ["good_a", "good_b"], "newest first"
    good = rows["good_a"]
    assert (good["state"], good["step"], good["loss"], good["latest_checkpoint"]) == \
        ("succeeded", 2, 0.25, "/c/ckpt-7")
    assert rows["good_b"]["state"] == "succeeded" and rows["good_b"]["step"] is None

    for name in ("fifo", "bad_state"):
        assert rows[name]["state"] == "unknown" and rows[name]["error"].startswith(f"tfos cannot read job '{name}'")
        assert details[name][0] == 200 and details[name][1]["state"] == "unknown"
    assert "not a regular file" in rows["fifo"]["error"]
    assert rows["big"]["step"] == 1000 and rows["long_line"]["step"] == 3
    assert (rows["array"]["step"], rows["bad_utf8"]["step"], rows["non_object"]["step"]) == (8, 8, 8)
    assert (rows["non_finite"]["loss"], rows["non_finite"]["rows_per_s"]) == (None, None)
    assert rows["fuzzed"]["step"] == 9

    for name, (status, job) in details.items():
        assert status == 200, (name, job)
    for name in ("good_a", "array", "bad_utf8", "non_object", "non_finite", "fuzzed"):
        once = JobDigest.of(bad_store.events(name)).checkpoints  # every checkpoint line, folded once
        assert details[name][1]["checkpoints"] == list(once) and once[0]["path"] == "/c/ckpt-7", \
            f"{name}: checkpoints folded more than once"
    assert details["non_finite"][1]["history"] == [{"epoch": 1, "loss": None, "acc": None}]
    assert details["non_object"][1]["history"] == [{"epoch": 1}]
    assert len(details["big"][1]["loss_history"]) <= 500


def test_events_of_bad_files_answer_and_never_fail(bad_store, get, fifo_released):
    text = json.dumps({"kind": "log", "text": "héllo"}, ensure_ascii=False).encode() + b"\n"
    bad_store.metrics_path("good_b").write_bytes(text + _line(_step(4)))
    status, body = get("tfos", "api", "jobs", "good_b", "events", offset=str(text.index("é".encode()) + 1))
    assert status == 200 and [e["step"] for e in body["events"]] == [4], "an offset inside a character"

    for name in ("array", "bad_utf8", "non_object", "non_finite", "fuzzed"):
        offset, events = "0", []
        while True:
            status, body = get("tfos", "api", "jobs", name, "events", offset=offset)
            assert status == 200, (name, body)
            if not body["events"]:
                break
            events += body["events"]
            offset = str(body["offset"])
        assert all(isinstance(e, dict) for e in events) and events[0]["path"] == "/c/ckpt-7", name

    status, body = get("tfos", "api", "jobs", "long_line", "events", offset="0")
    assert status == 200 and [e["step"] for e in body["events"]] == [3]
    seen = [body["offset"]]
    for _ in range(3):
        body = get("tfos", "api", "jobs", "long_line", "events", offset=str(seen[-1]))[1]
        assert body["events"] == []
        seen.append(body["offset"])
    assert seen == sorted(seen) and seen[-1] > seen[0], "each call moves on through the skipped line"
    status, body = get("tfos", "api", "jobs", "fifo", "events", offset="0")
    assert status == 500 and "not a regular file" in body["message"]


def test_the_server_answers_within_a_second_while_a_big_file_is_read(bad_store, jp_fetch, jp_asyncio_loop,
                                                                      fifo_released):
    async def scenario() -> tuple[list[tuple[float, bool]], int]:
        big = asyncio.ensure_future(jp_fetch("tfos", "api", "jobs", "big", raise_error=False, request_timeout=120))
        await asyncio.sleep(0.05)  # the big read has begun
        waits = []
        while not big.done():
            t0 = time.monotonic()
            await jp_fetch("api", "status", request_timeout=30)
            waits.append((time.monotonic() - t0, big.done()))
            await asyncio.sleep(0.02)
        return waits, (await big).code

    waits, code = jp_asyncio_loop.run_until_complete(scenario())
    assert code == 200
    assert any(not done for _, done in waits), "no status request was answered while the big file was read"
    slowest = max(w for w, _ in waits)
    assert slowest < STATUS_S, f"/api/status took {slowest:.1f} s while a big metrics.jsonl was read"
