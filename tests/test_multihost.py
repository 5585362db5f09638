"""On a cluster of two namespaced hosts (tests/multihost.py), driven from a real kernel.

The smoke test checks the harness itself, with real Spark jobs: two executors on the hosts'
own addresses with 3 task slots, each host's own name resolving to 127.0.1.1, the kernel's
disk out of the tasks' sight while `shared` is in it, and a shuffle between the hosts.
"""

import json
import os
import time

import pytest
from conftest import kernel_run, regression_cell, torch_cell
from jupyter_client.manager import start_new_kernel
from test_faults import _final_step, check_recovery

from tfos_magic import get_job

pytestmark = pytest.mark.e2e

SESSION = """
import json, os, socket, sys, time
from pyspark.sql import SparkSession
spark = (SparkSession.builder.master(os.environ["TFOS_SPARK_MASTER"]).appName("multihost-smoke")
         .config("spark.executor.memory", "1g").config("spark.pyspark.python", sys.executable)
         .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false").getOrCreate())
sc = spark.sparkContext
deadline = time.time() + 60
while True:  # both executors registered (the driver is listed too)
    hosts = sorted(e.host() for e in sc._jsc.sc().statusTracker().getExecutorInfos())
    if len(hosts) == 3 or time.time() > deadline:
        break
    time.sleep(0.5)
print("RESULT " + json.dumps({"driver": sc.getConf().get("spark.driver.host"), "hosts": hosts,
                  "slots": sc.defaultParallelism}))
"""

PROBE = """
from pyspark import BarrierTaskContext
from pathlib import Path
kernel_file = Path(os.environ["TFOS_HOME"]) / "written-by-kernel.txt"
kernel_file.write_text("kernel")
shared_file = Path({shared!r}) / "written-by-kernel.txt"
shared_file.write_text("shared")

def probe(_):
    import os, socket, tempfile
    ctx = BarrierTaskContext.get()
    name = socket.gethostname()
    info = {{"address": ctx.getTaskInfos()[ctx.partitionId()].address, "hostname": name,
            "resolved": socket.gethostbyname(name), "kernel_file": kernel_file.exists(),
            "shared": shared_file.read_text() if shared_file.exists() else None,
            "tmp": tempfile.gettempdir(), "spark_local_ip": os.environ.get("SPARK_LOCAL_IP")}}
    ctx.barrier()
    yield info

print("RESULT " + json.dumps(sc.parallelize(range(3), 3).barrier().mapPartitions(probe).collect()))
"""

SHUFFLE = """
def tag(it):
    import socket
    return [(x % 7, socket.gethostname()) for x in it]

def gather(it):
    import socket
    return [(k, len(v), sorted(set(v)), socket.gethostname()) for k, v in ((k, list(v)) for k, v in it)]

rows = sc.parallelize(range(6000), 6).mapPartitions(tag).groupByKey(4).mapPartitions(gather).collect()
print("RESULT " + json.dumps(sorted(rows)))
"""


def _result(out: str):
    """What a cell printed after RESULT (kernel_run's text also holds other messages' traces)."""
    return json.loads(out.split("RESULT ", 1)[1].splitlines()[0])


def test_two_namespaced_hosts_run_spark_tasks_with_their_own_names_disks_and_addresses(multihost, tfos_kernel):
    km, kc = start_new_kernel(kernel_name=tfos_kernel, env=multihost.kernel_env(os.environ))
    try:
        reply, out = kernel_run(kc, SESSION, timeout=120)
        assert reply["status"] == "ok", out + multihost.logs()
        session = _result(out)
        ips = sorted(h.ip for h in multihost.hosts)
        assert session["driver"] == multihost.driver_host
        assert session["hosts"] == sorted([multihost.driver_host, *ips]), multihost.logs()
        assert session["slots"] == 3 == sum(h.cores for h in multihost.hosts)
        for host in multihost.hosts:  # one executor per host, seen from this side through the namespaces
            assert len(multihost.processes(host, "CoarseGrainedExecutorBackend")) == 1, host

        reply, out = kernel_run(kc, PROBE.format(shared=str(multihost.shared)), timeout=120)
        assert reply["status"] == "ok", out + multihost.logs()
        tasks = _result(out)
        by_host = {}
        for t in tasks:
            by_host.setdefault(t["hostname"], []).append(t)
        assert {name: len(ts) for name, ts in by_host.items()} == {h.name: h.cores for h in multihost.hosts}
        for host in multihost.hosts:
            for t in by_host[host.name]:
                assert t["address"].split(":")[0] == host.ip, t
                assert t["resolved"] == "127.0.1.1", t  # the host's own name, as Debian writes /etc/hosts
                assert t["kernel_file"] is False, t  # the kernel's disk is not the executors'
                assert t["shared"] == "shared", t
                assert t["tmp"].startswith(str(host.dir)), t  # each host has its own temp dir
                assert t["spark_local_ip"] is None, t  # the worker picked its own address
        assert (multihost.kernel_home / "tfos" / "written-by-kernel.txt").exists()

        reply, out = kernel_run(kc, SHUFFLE, timeout=120)
        assert reply["status"] == "ok", out + multihost.logs()
        rows = _result(out)
        names = sorted(h.name for h in multihost.hosts)
        assert [k for k, *_ in rows] == list(range(7))
        assert sum(n for _, n, *_ in rows) == 6000
        # Every key's values came from both hosts: each reducer fetched blocks from the other host.
        assert all(sources == names for _, _, sources, _ in rows), rows
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


# --- tfos jobs on the two hosts -------------------------------------------------------------
# One kernel for the module, on the cluster the way a notebook user's would be: its session
# is made by `%%spark_etl` (TFOS_SPARK_MASTER), its driver on the bridge, its job store on
# its own disk (which the hosts do not see).
ETL = """%%spark_etl {name}
from pyspark.sql import functions as F
# A fixed partition count, so that every attempt gives each worker the same rows.
df = spark.range(16000, numPartitions=2).select(*[F.rand(seed=i).alias(f"x{{i}}") for i in range(4)])
df = df.withColumn("y", 2 * F.col("x0") - 3 * F.col("x1") + 0.5 * F.col("x2") + F.col("x3") + 1.0
                   + 0.2 * F.randn(seed=9))
val = df.limit(1500)
df
"""
MODEL = regression_cell(inputs=4, hidden=16, learning_rate=0.01)
TRAIN = ("%%tf_train {name} --workers 2 --epochs 3 --batch-size 64 --label y --validation-df val --restart "
         "--checkpoint-every-steps {every} {extra}\n" + MODEL)
EVERY = 40
# An ETL of a groupBy and a join, whose first stage takes about 2 s per 100 rows on each
# task (a Python UDF that sleeps): far longer than the start timeout the job gets.
SLOW_ETL = """%%spark_etl {name}
import time
from pyspark.sql import functions as F

@F.udf("double")
def slow(x):
    time.sleep({sleep})
    return x

rows = spark.range(1500, numPartitions=3).select("id", *[F.rand(seed=i).alias(f"x{{i}}") for i in range(3)])
rows = rows.withColumn("x0", slow("x0"))
groups = rows.groupBy((F.col("id") % 50).alias("g")).agg(F.avg("x1").alias("g_x1"))
df = rows.join(groups, (rows.id % 50) == groups.g).select("x0", "x1", "x2", "g_x1")
df.withColumn("y", 2 * F.col("x0") - 3 * F.col("x1") + 0.5 * F.col("x2") + F.col("g_x1"))
"""


class ClusterKernel:
    """A real kernel acting as the notebook on the namespaced cluster."""

    def __init__(self, cluster, kernel_name: str) -> None:
        self.cluster = cluster
        self.home = str(cluster.kernel_home / "tfos")
        env = cluster.kernel_env(os.environ)
        # The session `%%spark_etl` makes takes this: without reduce-side locality a barrier
        # stage after a shuffle spreads over both hosts (one task per free executor per
        # round) instead of following the map output onto the host with more cores.
        env["PYSPARK_SUBMIT_ARGS"] = "--conf spark.shuffle.reduceLocality.enabled=false pyspark-shell"
        self.km, self.kc = start_new_kernel(kernel_name=kernel_name, env=env)

    def run(self, code: str, timeout: float = 600) -> str:
        reply, out = kernel_run(self.kc, code, timeout=timeout)
        assert reply["status"] == "ok", out[-3000:] + self.cluster.logs()
        return out

    def fails(self, code: str, timeout: float = 600) -> str:
        reply, out = kernel_run(self.kc, code, timeout=timeout)
        assert reply["status"] == "error", out[-3000:]
        return out

    def result(self, code: str):
        return _result(self.run(code + "\nprint('RESULT ' + json.dumps(_r))"))

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


@pytest.fixture(scope="module")
def cluster_kernel(multihost, tfos_kernel):
    kernel = ClusterKernel(multihost, tfos_kernel)
    kernel.run("import json, os, time\nos.environ.pop('TFOS_CHECKPOINT_ROOT', None)")
    kernel.run("%%spark_etl warmup\nspark.range(1)")  # the session, made by tfos for the cluster
    yield kernel
    kernel.close()


def _wait(condition, timeout: float, what: str, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(every)


def _tasks(job, attempt: int = 1) -> dict:
    """(role, index) -> the host its Spark task ran on, from the tasks' own `task` events."""
    return {(e.get("role", "worker"), e["worker"]): e["hostname"] for e in job.events
            if e["kind"] == "task" and e["attempt"] == attempt}


def _story(job) -> list:
    """The events that tell what happened to a run, for failure messages."""
    return [(e["attempt"], e.get("role", "worker"), e["worker"], e["kind"], e.get("step"), e.get("hostname"),
             e.get("initial_step"), (e.get("message") or "")[:300]) for e in job.events
            if e["kind"] in ("task", "started", "training", "checkpoint", "epoch", "error", "finished")]


_UNFAULTED: dict = {}


def _shared_job(kernel) -> "Job":
    """2 workers, one on each host, checkpointing to the shared folder: trains 3 epochs."""
    if not _UNFAULTED:
        kernel.run(ETL.format(name="mh_shared"))
        shared = kernel.cluster.shared / "checkpoints" / "mh_shared"
        kernel.run(TRAIN.format(name="mh_shared", every=EVERY, extra=f"--checkpoint-dir {shared}"))
        job = get_job("mh_shared", kernel.home)
        _UNFAULTED.update(job=job, steps=_final_step(job), loss=job.history[-1]["val_loss"])
    return _UNFAULTED["job"]


def test_a_job_on_two_hosts_with_a_shared_checkpoint_dir_trains_and_its_model_loads_in_the_kernel(cluster_kernel):
    job = _shared_job(cluster_kernel)
    assert job.state == "succeeded", job.error
    assert sorted(_tasks(job).values()) == ["tfos-h1", "tfos-h2"], _tasks(job)  # really on both hosts
    history = job.history
    assert len(history) == 3 and history[-1]["loss"] < 0.3 * history[0]["loss"], history
    assert job.model_path.startswith(str(cluster_kernel.cluster.shared)), job.model_path
    got = cluster_kernel.result("""
import tfos_magic
job = tfos_magic.get_job("mh_shared")
model = job.load_model()
scored = job.predict(val).toPandas()
mine = model.predict(scored[["x0", "x1", "x2", "x3"]].to_numpy(), verbose=0)[:, 0]
_r = {"rows": len(scored), "gap": float(abs(scored["prediction"] - mine).max()),
      "rmse": float(((scored["prediction"] - scored["y"]) ** 2).mean() ** 0.5)}""")
    assert got["rows"] == 1500 and got["gap"] < 1e-4, got  # the executors served the model the kernel loads
    assert got["rmse"] < 0.4, got  # it learnt the function (the label's noise is 0.2)


def test_the_default_checkpoint_dir_on_the_kernels_disk_is_refused_within_a_minute(cluster_kernel):
    kernel = cluster_kernel
    kernel.run(ETL.format(name="mh_local"))
    started = time.monotonic()
    out = kernel.fails(TRAIN.format(name="mh_local", every=EVERY, extra=""))
    took = time.monotonic() - started
    job = get_job("mh_local", kernel.home)
    assert took < 60 and job.state == "failed", (took, job.state)
    default = os.path.join(kernel.home, "jobs", "mh_local", "checkpoints")
    assert f"The checkpoint dir {default!r} is not visible to the executors on" in job.error, job.error
    assert "--checkpoint-dir" in job.error and "TFOS_CHECKPOINT_ROOT" in job.error, job.error
    assert not [e for e in job.events if e["kind"] in ("task", "started")], "no TF task may start"


def test_a_worker_killed_on_the_second_host_resumes_every_worker_from_the_shared_checkpoint(cluster_kernel):
    """With the site's default (TFOS_CHECKPOINT_ROOT on the shared folder) instead of
    --checkpoint-dir: the TF worker on tfos-h2 is SIGKILLed after the first checkpoint."""
    kernel, cluster = cluster_kernel, cluster_kernel.cluster
    unfaulted = _shared_job(kernel)
    root = cluster.shared / "site-root"
    kernel.run(f"os.environ['TFOS_CHECKPOINT_ROOT'] = {str(root)!r}")
    try:
        kernel.run(ETL.format(name="mh_kill"))
        kernel.run(TRAIN.format(name="mh_kill", every=EVERY, extra="--background"))
        job = get_job("mh_kill", kernel.home)
        saved = _wait(lambda: [e for e in job.events if e["kind"] == "checkpoint"], 300, "the first checkpoint")
        h2 = cluster.host("tfos-h2")
        victims = cluster.processes(h2, "tfos_magic.training.child")
        assert len(victims) == 1, (victims, _story(job))
        victims[0].kill()
        _wait(lambda: job.state != "running", 600, "the job to end", every=1.0)
    finally:
        kernel.run("os.environ.pop('TFOS_CHECKPOINT_ROOT', None)")
    assert job.state == "succeeded", (job.error, _story(job))
    assert job.checkpoint_dir == f"{root}/mh_kill", job.checkpoint_dir
    check_recovery(job, "tfos-h2 SIGKILL", int(_UNFAULTED["steps"]), _UNFAULTED["loss"], interval=EVERY,
                   loss_band=0.15)
    resumed = [e for e in job.events if e["kind"] == "training" and e["attempt"] == 2]
    assert sorted(e["worker"] for e in resumed) == [0, 1], resumed
    assert len({e["initial_step"] for e in resumed}) == 1 and resumed[0]["initial_step"] >= saved[0]["step"], resumed
    assert len({e["restored_from"] for e in resumed}) == 1 and resumed[0]["restored_from"].startswith(str(root))
    assert unfaulted.state == "succeeded"


def test_a_torch_job_on_two_hosts_joins_over_the_executors_addresses(cluster_kernel):
    """%%torch_train with a worker on each host: rank 0's rendezvous is its executor's
    address, and Gloo connects over the interface that holds it, although each host's own
    name resolves to 127.0.1.1; the kernel builds the module again from the shared dir."""
    kernel = cluster_kernel
    kernel.run(ETL.format(name="mh_torch"))
    shared = kernel.cluster.shared / "checkpoints" / "mh_torch"
    kernel.run(f"%%torch_train mh_torch --workers 2 --epochs 3 --batch-size 64 --label y --validation-df val "
               f"--restart --checkpoint-dir {shared}\n" + torch_cell(inputs=4, hidden=16, learning_rate=0.01))
    job = get_job("mh_torch", kernel.home)
    assert job.state == "succeeded", (job.error, _story(job))
    assert sorted(_tasks(job).values()) == ["tfos-h1", "tfos-h2"], _tasks(job)
    history = job.history
    assert len(history) == 3 and history[-1]["loss"] < 0.3 * history[0]["loss"], history
    got = kernel.result("""
import torch
import tfos_magic
job = tfos_magic.get_job("mh_torch")
module = job.load_model()
scored = job.predict(val).toPandas()
with torch.no_grad():
    mine = module(torch.from_numpy(scored[["x0", "x1", "x2", "x3"]].to_numpy("float32"))).numpy()
_r = {"rows": len(scored), "gap": float(abs(scored["prediction"] - mine).max()),
      "rmse": float(((scored["prediction"] - scored["y"]) ** 2).mean() ** 0.5)}""")
    assert got["rows"] == 1500 and got["gap"] < 1e-4 and got["rmse"] < 0.4, got


def test_a_ps_job_trains_with_its_parameter_server_and_a_worker_on_different_hosts(cluster_kernel):
    """The workers have no SPARK_LOCAL_IP, and each host's own name resolves to 127.0.1.1:
    every TF task must advertise the address Spark reaches its executor at."""
    kernel = cluster_kernel
    kernel.run(ETL.format(name="mh_ps"))
    shared = kernel.cluster.shared / "checkpoints" / "mh_ps"
    kernel.run(f"%%tf_train mh_ps --strategy ps --ps 1 --workers 2 --epochs 2 --batch-size 64 --label y "
               f"--restart --start-timeout 120 --checkpoint-dir {shared}\n" + MODEL)
    job = get_job("mh_ps", kernel.home)
    assert job.state == "succeeded", job.error
    hosts = _tasks(job)
    assert hosts[("ps", 0)] in ("tfos-h1", "tfos-h2") and len(set(hosts.values())) == 2, hosts
    assert any(h != hosts[("ps", 0)] for (role, _), h in hosts.items() if role == "worker"), hosts
    history = job.history
    assert history[-1]["loss"] < 0.5 * history[0]["loss"], history


def _dashboard(kernel, name: str) -> dict:
    """The live dashboard model of `name`'s background run in the kernel."""
    return kernel.result(f"""
from tfos_magic import api
def _views(o):
    for v in getattr(o, "observers", []):
        yield from _views(v) if hasattr(v, "observers") else [v]
_m = next((v.model for v in _views(api.live_observers({name!r})) if hasattr(v, "model")), None)
_r = None if _m is None else {{"phase": _m.phase, "spark": _m.spark_tasks, "state": _m.state}}""")


def test_a_shuffle_etl_longer_than_the_start_timeout_trains_showing_its_stages_as_progress(cluster_kernel):
    kernel = cluster_kernel
    started = time.monotonic()
    kernel.run(SLOW_ETL.format(name="mh_etl", sleep=0.03))  # about 15 s of the first stage on each task
    assert time.monotonic() - started < 15, "%%spark_etl ran the ETL: it must only plan it"
    shared = kernel.cluster.shared / "checkpoints" / "mh_etl"
    started = time.monotonic()
    kernel.run(f"%%tf_train mh_etl --workers 2 --epochs 2 --batch-size 64 --label y --restart --start-timeout 12 "
               f"--checkpoint-dir {shared} --background\n" + regression_cell(inputs=4, hidden=16, learning_rate=0.01))
    assert time.monotonic() - started < 20, "the cell must return at once; the ETL runs inside the job"
    seen = []
    job = get_job("mh_etl", kernel.home)
    while job.state in ("running", "registered") and time.monotonic() - started < 400:
        model = _dashboard(kernel, "mh_etl")
        if model:
            seen.append((round(time.monotonic() - started, 1), model["phase"], model["spark"]))
        time.sleep(1.0)
    assert job.state == "succeeded", (job.error, seen)
    etl = [(t, spark) for t, phase, spark in seen if phase.startswith("Spark is computing the DataFrame")]
    assert etl and etl[-1][0] > 12, seen  # shown as progress for longer than the start timeout
    # progress moves: the first stage's three tasks end together, so two states may be all a
    # one-second poll sees of it
    assert any(done < total for _, (done, total) in etl) and len({tuple(s) for _, s in etl}) >= 2, seen
    first_task = min(e["time"] for e in job.events if e["kind"] == "task")
    assert first_task - min(e["time"] for e in job.events) < 60  # the task events open the run
    history = job.history
    assert history[-1]["loss"] < history[0]["loss"], history


def test_a_stop_during_the_etl_stages_ends_the_job_within_15_seconds(cluster_kernel):
    kernel = cluster_kernel
    kernel.run(SLOW_ETL.format(name="mh_stop", sleep=0.3))  # minutes of ETL
    shared = kernel.cluster.shared / "checkpoints" / "mh_stop"
    kernel.run(f"%%tf_train mh_stop --workers 2 --label y --restart --start-timeout 12 --checkpoint-dir {shared} "
               "--background\n" + regression_cell(inputs=4, hidden=16, learning_rate=0.01))
    model = _wait(lambda: (m := _dashboard(kernel, "mh_stop")) and m["spark"] and m, 120, "the ETL's first tasks",
                  every=0.5)
    assert model["phase"].startswith("Spark is computing the DataFrame"), model
    time.sleep(3)
    started = time.monotonic()
    kernel.run("%tfos_stop mh_stop")
    job = get_job("mh_stop", kernel.home)
    _wait(lambda: job.state == "stopped", 15, "the job to stop")
    assert time.monotonic() - started <= 15
    assert not [e for e in job.events if e["kind"] in ("task", "started")], "the TF stage never began"
    _wait(lambda: kernel.result("_r = spark.sparkContext.statusTracker().getActiveJobsIds()") == [], 15,
          "the ETL's Spark jobs to end", every=1.0)
