"""Shared fixtures: one local[2] Spark session for the whole run, a fresh job store per test."""

from __future__ import annotations

import json
import os
import re
import sys
import time

# Before TF can be imported anywhere in this process (legacy tf.keras, as in the workers).
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["PYSPARK_PYTHON"] = sys.executable

import pytest

# --- test tiers ---------------------------------------------------------------------------
# Every test is in the fast tier unless marked `e2e` (it starts TF processes); the files
# below are whole tiers of their own, and end to end too. `pytest -m "not e2e"` (or
# `scripts/test.sh --fast`) is the fast tier: there, TensorFlow cannot be imported in any
# process this run starts (kernels, Spark's Python workers, TF processes), so a test that
# starts TF without the mark fails naming the mark instead of quietly slowing the tier.
FILE_TIERS = {
    "test_cluster.py": "cluster", "test_multihost.py": "cluster", "test_deploy.py": "cluster", "test_spark35.py": "cluster",
    "test_connect.py": "cluster",
    "test_browser.py": "browser", "test_sidebar.py": "browser",
    "test_wheel.py": "wheel", "test_packaging.py": "wheel",
    "test_examples.py": "examples", "test_readme.py": "examples",
}
TIERS = sorted(set(FILE_TIERS.values()))
NO_TENSORFLOW = os.path.join(os.path.dirname(os.path.abspath(__file__)), "no_tensorflow")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: starts TF processes (real Spark jobs, kernels that train)")
    for tier in TIERS:
        config.addinivalue_line("markers", f"{tier}: the {tier} tier (end to end)")
    config.addinivalue_line("markers", "spark35: runs again on Spark 3.5, in .venv-spark35 (scripts/test.sh)")
    if (config.getoption("markexpr") or "").replace(" ", "") == "note2e":
        os.environ["TFOS_TEST_TIER"] = "fast"
    if os.environ.get("TFOS_TEST_TIER") == "fast":
        # For the processes this run starts: this process already has its sys.path, and
        # the fast tier's unit tests of the feed may use tf.data in it.
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (NO_TENSORFLOW, os.environ.get("PYTHONPATH")) if p)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tier = FILE_TIERS.get(item.path.name)
        if tier:
            item.add_marker(tier)
        if tier or item.get_closest_marker("e2e"):
            item.add_marker("e2e")


@pytest.fixture(scope="session")
def spark():
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[2]")
        .appName("tfos-magic-tests")
        .config("spark.pyspark.python", sys.executable)
        .config("spark.ui.enabled", "false")
        .config("spark.driver.memory", "3g")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture
def tfos_home(tmp_path, monkeypatch):
    home = tmp_path / "tfos-home"
    monkeypatch.setenv("TFOS_HOME", str(home))
    return home


@pytest.fixture
def shell(spark, tfos_home):
    """A real IPython shell with the extension loaded, bound to the shared Spark session."""
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.user_ns["spark"] = spark
    result = ip.run_cell("%load_ext tfos_magic")
    assert result.success, result.error_in_exec
    # Each test gets a store under its own TFOS_HOME and no DataFrames from earlier tests.
    from tfos_magic.job import JobStore
    from tfos_magic.magics import TfosMagics

    magics = ip.magics_manager.registry["TfosMagics"]
    assert isinstance(magics, TfosMagics)
    magics.store = JobStore(tfos_home)
    from tfos_magic import api

    api._FRAMES.clear()
    yield ip


def run(ip, source: str):
    """Run a cell; return (result, error) where error is the exception raised, if any."""
    result = ip.run_cell(source)
    return result, (result.error_in_exec or result.error_before_exec)


def error_of(ip, source: str):
    """The exception a cell raised, or None."""
    return run(ip, source)[1]


@pytest.fixture(scope="session")
def tfos_kernel(tmp_path_factory):
    """The project's own kernel spec (kernels/tfos), found first on JUPYTER_PATH.

    Its "python" runs this interpreter, so a kernelspec named python3 elsewhere on the
    machine cannot swap in a Python without TF.
    """
    import shutil
    from pathlib import Path

    root = tmp_path_factory.mktemp("jupyter-path")
    shutil.copytree(Path(__file__).parents[1] / "kernels" / "tfos", root / "kernels" / "tfos")
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(root) + (os.pathsep + old if old else "")
    yield "tfos"
    if old is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = old


from tfos_magic.protocol.net import free_port  # noqa: E402 - one helper for tests and tasks


@pytest.fixture(scope="session")
def wheel(tmp_path_factory):
    """This checkout built as a wheel, once a session. Its build hook bundles both front
    ends with npm (skipped when both bundles are already built); the lab extension's
    bundler, jupyter-builder, comes from this environment's bin, as it would from the
    build environment's in an isolated build."""
    import subprocess
    from pathlib import Path

    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(Path(__file__).parents[1])],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = out.glob("tfos_magic-*.whl")
    return path


def venv_with_wheel(wheel, root):
    """A new virtualenv at `root` with `wheel` installed alone (`--no-deps`); its python.

    It borrows this environment's libraries (jupyter_client, jupyterlab) through a path
    entry, whose own .pth files are not read: this checkout's editable install stays out
    of sight, so the only tfos_magic there is the one from the wheel."""
    import subprocess
    import sysconfig
    import venv
    from pathlib import Path

    venv.create(root, with_pip=True)
    python = Path(root) / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return python


ZK_SERVER = "/usr/share/zookeeper/bin/zkServer.sh"


@pytest.fixture(scope="session")
def zookeeper(tmp_path_factory):
    """A real ZooKeeper server (Debian's package) on a free loopback port, with its own data dir."""
    import signal
    import subprocess

    from kazoo.client import KazooClient

    assert os.path.exists(ZK_SERVER), "ZooKeeper is missing: run scripts/setup.sh (apt-get install zookeeper)"
    root = tmp_path_factory.mktemp("zookeeper")
    port = free_port()
    (root / "data").mkdir()
    cfg = root / "zoo.cfg"
    cfg.write_text(f"tickTime=2000\ndataDir={root / 'data'}\nclientPort={port}\n"
                   "clientPortAddress=127.0.0.1\nadmin.enableServer=false\nmaxSessionTimeout=20000\n")
    env = dict(os.environ, ZOO_LOG_DIR=str(root), ZOO_LOG4J_PROP="WARN,CONSOLE")
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen([ZK_SERVER, "start-foreground", str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    hosts = f"127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        client = KazooClient(hosts=hosts)
        try:
            client.start(timeout=2)
            client.stop()
            client.close()
            break
        except Exception:
            client.close()
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ZooKeeper did not start: {(root / 'server.log').read_text()[-2000:]}")
    yield hosts
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


@pytest.fixture(scope="session")
def spark_standalone(tmp_path_factory):
    """A real Spark standalone cluster on 127.0.0.1: a master and 2 workers with 2 cores and
    2 (fake) GPUs each, started through pyspark's own spark-class. Yields the master URL."""
    import signal
    import subprocess
    import urllib.request

    import pyspark

    home = os.path.dirname(pyspark.__file__)
    root = tmp_path_factory.mktemp("standalone")
    env = dict(os.environ, SPARK_HOME=home, SPARK_LOCAL_IP="127.0.0.1", SPARK_LOG_DIR=str(root),
               SPARK_WORKER_DIR=str(root / "work"), PYSPARK_PYTHON=sys.executable)
    cls = os.path.join(home, "bin", "spark-class")
    procs = []

    def start(args, name):
        log = open(root / f"{name}.log", "wb")
        procs.append(subprocess.Popen([cls, *args], stdout=log, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True))

    def logs() -> str:
        return "\n".join((root / f).read_text()[-1500:] for f in ("master.log", "worker0.log", "worker1.log")
                         if (root / f).exists())

    # The master first, on ports it picks itself, read back from its log: ports found free
    # beforehand were taken by a worker's RPC port in the moment before the master bound them.
    start(["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", "0", "--webui-port", "0"],
          "master")
    deadline = time.time() + 120
    while True:
        text = (root / "master.log").read_text() if (root / "master.log").exists() else ""
        rpc = re.search(r"Starting Spark master at spark://127\.0\.0\.1:(\d+)", text)
        web = re.search(r"Bound MasterWebUI to 127\.0\.0\.1, and started at http://[^:]+:(\d+)", text)
        if rpc and web:
            url, ui = f"spark://127.0.0.1:{rpc.group(1)}", web.group(1)
            break
        if time.time() > deadline or procs[0].poll() is not None:
            raise RuntimeError(f"Spark standalone master did not start:\n{logs()}")
        time.sleep(0.3)
    for i in range(2):
        # Fake GPUs, as Spark's own GPU tests do: a discovery script that names addresses
        # 2i and 2i+1, so every address in the cluster is distinct.
        script = root / f"gpus{i}.sh"
        script.write_text(f'#!/bin/sh\necho \'{{"name": "gpu", "addresses": ["{2 * i}", "{2 * i + 1}"]}}\'\n')
        script.chmod(0o755)
        # A stopped application's folders (a packed environment unpacked per executor: GBs)
        # go within a minute, not when the run ends.
        env["SPARK_WORKER_OPTS"] = (f"-Dspark.worker.resource.gpu.amount=2 "
                                    f"-Dspark.worker.resource.gpu.discoveryScript={script} "
                                    "-Dspark.worker.cleanup.enabled=true -Dspark.worker.cleanup.interval=20 "
                                    "-Dspark.worker.cleanup.appDataTtl=20")
        start(["org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1", "--cores", "2", "--memory", "4g",
               "--webui-port", "0", url], f"worker{i}")
    deadline = time.time() + 120
    while True:
        try:
            state = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{ui}/json/", timeout=2).read())
            if sum(w.get("state") == "ALIVE" for w in state.get("workers", [])) == 2:
                break
        except OSError:
            pass
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            raise RuntimeError(f"Spark standalone cluster did not start:\n{logs()}")
        time.sleep(1)
    yield url
    for p in procs:
        os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def tf_processes(pattern: str = "tfos_magic.training.child") -> list:
    """Live processes whose command line or open files contain `pattern` (TF task processes
    by default, spares included; their work dir names hold the job, role and index:
    tfos-JOB-worker1-..., in the command line of a fresh one and in the path of the log
    every one writes, a spare's once a task took it)."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmdline = " ".join(p.info["cmdline"] or [])
            if pattern in cmdline or ("tfos_magic.training.child" in cmdline
                                      and any(pattern in f.path for f in p.open_files())):
                found.append(p)
        except psutil.Error:
            pass
    return found


# A model over every kind of feature column: an integer id (embedded), a float array and
# an ML vector, fed as a dict (test_training.py, test_predict.py).
DICT_FEATURES_MODEL = """
import tensorflow as tf

def build_model():
    cat = tf.keras.Input((), name="cat", dtype="int64")
    arr = tf.keras.Input((2,), name="arr")
    vec = tf.keras.Input((2,), name="vec")
    emb = tf.keras.layers.Flatten()(tf.keras.layers.Embedding(10, 2)(cat))
    out = tf.keras.layers.Dense(1)(tf.keras.layers.Concatenate()([emb, arr, vec]))
    model = tf.keras.Model({"cat": cat, "arr": arr, "vec": vec}, out)
    model.compile(optimizer=tf.keras.optimizers.Adam(0.05), loss="mse")
    return model
"""


def keras3_cell(inputs: int, hidden: int, learning_rate: float | str, metrics: str = "[]") -> str:
    """regression_cell written as keras.io's guides write it today: `import keras` (Keras 3)."""
    return f"""
import keras
def build_model():
    m = keras.Sequential([keras.Input(({inputs},)), keras.layers.Dense({hidden}, activation="relu"),
                          keras.layers.Dense(1)])
    m.compile(optimizer=keras.optimizers.Adam({learning_rate}), loss="mse", metrics={metrics})
    return m
"""


def regression_cell(inputs: int, hidden: int, learning_rate: float | str) -> str:
    """The train-cell body the end-to-end tests share: a small MLP regressor for `build_model()`.
    `learning_rate` is a number or the source of a schedule."""
    return f"""
import tensorflow as tf
def build_model():
    m = tf.keras.Sequential([tf.keras.Input(({inputs},)), tf.keras.layers.Dense({hidden}, activation="relu"),
                             tf.keras.layers.Dense(1)])
    m.compile(optimizer=tf.keras.optimizers.Adam({learning_rate}), loss="mse")
    return m
"""


def torch_cell(inputs: int, hidden: int, learning_rate: float) -> str:
    """The same small MLP regressor for a %%torch_train cell: a module `Net` (its output
    shaped as the label) with Adam and the mean squared error."""
    return f"""
import torch

class Net(torch.nn.Module):
    def __init__(self, inputs={inputs}, hidden={hidden}):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(inputs, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))

    def forward(self, x):
        return self.body(x).squeeze(-1)

def build_model():
    torch.manual_seed(0)
    model = Net()
    return model, torch.optim.Adam(model.parameters(), lr={learning_rate}), torch.nn.MSELoss()
"""


def tf_processes_gone(pattern: str, timeout: float = 30.0) -> bool:
    """Whether every matching TF process has exited within `timeout`: a cancelled Spark task's
    process dies a moment after the cell returns, never instantly."""
    deadline = time.time() + timeout
    while tf_processes(pattern):
        if time.time() > deadline:
            return False
        time.sleep(0.2)
    return True


def assert_stop_checkpoint(job) -> dict:
    """The checkpoint the workers saved when the job was asked to stop: its event says so,
    its files exist, and it is the latest one (what a resume restores)."""
    saved = [e for e in job.events if e["kind"] == "checkpoint" and e.get("reason") == "stop"]
    assert saved, f"no checkpoint from the stop; events: {[e['kind'] for e in job.events][-20:]}"
    path = saved[-1]["path"]
    assert os.path.exists(path + ".index"), f"the stop's checkpoint {path} has no files"
    with open(os.path.join(os.path.dirname(path), "checkpoint")) as f:
        assert os.path.basename(path) in f.readline(), "the stop's checkpoint is not the latest"
    steps = [e["step"] for e in job.events if e["kind"] == "step"]
    assert saved[-1]["step"] >= max(steps), "the stop's checkpoint is older than the last step reported"
    return saved[-1]


@pytest.fixture
def local_kernel(tmp_path, monkeypatch, tfos_kernel):
    """A real `tfos` kernel (jupyter_client) on its own local[2] Spark session and job store.
    Yields (kernel manager, client, TFOS_HOME); shut down after the test."""
    from jupyter_client.manager import start_new_kernel

    home = tmp_path / "home"
    monkeypatch.setenv("TFOS_HOME", str(home))
    monkeypatch.setenv("TFOS_SPARK_MASTER", "local[2]")
    km, kc = start_new_kernel(kernel_name=tfos_kernel)
    try:
        yield km, kc, home
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def kernel_run(kc, code: str, timeout: float = 120) -> tuple[dict, str]:
    """Run `code` in a kernel: (the reply's content, its outputs as text; display data by mime type)."""
    outputs = []

    def hook(msg):
        content = msg["content"]
        outputs.append(content.get("text") or content.get("evalue") or str(content.get("data", {}).keys()))

    reply = kc.execute_interactive(code, timeout=timeout, output_hook=hook)
    return reply["content"], "".join(outputs)


def make_venv(path) -> str:
    """A new venv without pip, on this Python's base interpreter: nothing installed. Its site-packages."""
    import glob
    import subprocess

    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(path)], check=True)
    return glob.glob(os.path.join(str(path), "lib", "python*", "site-packages"))[0]


@pytest.fixture(scope="session")
def multihost(tmp_path_factory):
    """A Spark standalone cluster of two namespaced hosts (tests/multihost.py): tfos-h1 with 2
    cores and tfos-h2 with 1, a master on 198.18.0.1, a `shared` folder and a `kernel_home`
    the hosts cannot see. Drive it from a separate process (a kernel with
    `multihost.kernel_env(os.environ)`): this one already holds a local Spark session.
    Skipped without root or the tools; as root, a failure to build it is an error."""
    from multihost import NamespacedCluster, unavailable

    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with NamespacedCluster(tmp_path_factory.mktemp("multihost")) as cluster:
        yield cluster
