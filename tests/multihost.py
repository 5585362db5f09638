"""A real multi-host Spark standalone cluster on one machine, made of Linux namespaces.

A "host" is a network namespace with its own address on a bridge (198.18.0.0/24, with no
route out), entered together with its own UTS and mount namespaces by every process started
on it: so it has its own hostname, its own /etc/hosts as Debian writes it (the name on
127.0.1.1), its own disk (TMPDIR, Spark's local and work dirs, HOME), and an empty tmpfs over
each folder it must not see (the kernel's home, the other hosts' disks), while a `shared`
folder stands for NFS or HDFS. One host hides what a real cluster exposes: a path on the
kernel's disk that executors cannot read, a name that resolves to a loopback address, an
address that works only where it was found, a worker that picks its own address because
nothing sets SPARK_LOCAL_IP.

The master runs in the root namespace on the bridge's address (198.18.0.1); one Spark Worker
runs on each host, started through pyspark's own `bin/spark-class`. The kernel (the notebook)
runs in the root namespace too, with its driver bound to 198.18.0.1 (see `kernel_env`).
Everything needs root; `unavailable()` says why it cannot run, for a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import psutil

from tfos_magic.protocol.net import free_port

BRIDGE = "tfos-br0"
BRIDGE_IP = "198.18.0.1"
PREFIX = 24
MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"
# Variables a node of a real cluster would not get from the notebook's environment: a worker
# picks its own address when SPARK_LOCAL_IP is unset, as on YARN and most clusters.
_NOT_ON_HOSTS = {"SPARK_LOCAL_IP", "SPARK_LOCAL_HOSTNAME", "SPARK_PUBLIC_DNS", "SPARK_MASTER_HOST",
                 "SPARK_WORKER_OPTS", "SPARK_DAEMON_JAVA_OPTS", "SPARK_LOCAL_DIRS", "SPARK_WORKER_DIR",
                 "PYSPARK_DRIVER_PYTHON"}
# Debian's /etc/hosts for a host named {name} (netcfg writes the name on 127.0.1.1).
_ETC_HOSTS = """127.0.0.1\tlocalhost
127.0.1.1\t{name}

# The following lines are desirable for IPv6 capable hosts
::1     localhost ip6-localhost ip6-loopback
ff02::1 ip6-allnodes
ff02::2 ip6-allrouters
"""
# Run by every process that enters a host (inside `ip netns exec NS unshare --mount --uts`):
# the host's name, /etc/hosts and /etc/hostname, tmpfs over the hidden folders, then the command.
# The name is written through /proc (the UTS namespace's own) since hostname(1) may be absent.
_ENTER = """set -e
name=$1 hosts=$2 hostname_file=$3; shift 3
printf '%s' "$name" > /proc/sys/kernel/hostname
mount --bind "$hosts" /etc/hosts
if [ -e /etc/hostname ]; then mount --bind "$hostname_file" /etc/hostname; fi
while [ "$1" != "--" ]; do mount -t tmpfs -o mode=0755,size=64m tfos-hidden "$1"; shift; done
shift
exec "$@"
"""
# Host-to-host check: one end listens on its host's address, the other connects through the bridge.
_LISTEN = ("import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
           "s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(); s.settimeout(15); c, a = s.accept(); "
           "c.sendall(b'ok ' + a[0].encode()); c.close()")
_CONNECT = ("import socket,sys,time\nend = time.time() + 10\nwhile True:\n"
            "    try:\n        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5); break\n"
            "    except ConnectionRefusedError:\n        if time.time() > end: raise\n        time.sleep(0.05)\n"
            "print(s.recv(64).decode())")


@dataclass(frozen=True)
class Host:
    """One machine of the cluster: its name (hostname and network namespace), its address on
    the bridge, the cores its Spark worker offers, and its own disk (`dir`, hidden from the
    other hosts) holding its TMPDIR (`tmp`), Spark local dirs and worker dir."""

    name: str
    ip: str
    cores: int
    dir: Path

    @property
    def netns(self) -> str:
        return self.name

    @property
    def veth(self) -> str:
        """The root namespace's end of the host's veth pair (on the bridge); the host's end is eth0."""
        return f"{self.name}-v"

    @property
    def tmp(self) -> Path:
        return self.dir / "tmp"

    @property
    def work(self) -> Path:
        """SPARK_WORKER_DIR: each executor's stdout and stderr are under app-*/<executor id>/."""
        return self.dir / "work"


# (name, address, cores): 3 task slots, so 1 parameter server + 2 workers fit.
DEFAULT_HOSTS: tuple[tuple[str, str, int], ...] = (("tfos-h1", "198.18.0.11", 2), ("tfos-h2", "198.18.0.12", 1))


def unavailable() -> str | None:
    """Why this machine cannot build the cluster (a reason to skip), or None. Only the absence
    of root or of the tools is a reason: as root, a failure to build is an error."""
    if os.geteuid() != 0:
        return "multi-host tests need root (network, UTS and mount namespaces)"
    missing = [f"{tool} ({package})" for tool, package in (("ip", "iproute2"), ("unshare", "util-linux"),
                                                          ("mount", "mount")) if shutil.which(tool) is None]
    if missing:
        return f"multi-host tests need {', '.join(missing)}: scripts/setup.sh installs them"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def _netns_exists(name: str) -> bool:
    return os.path.exists(f"/run/netns/{name}")


def _link_exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


def _netns_pids(netns: str) -> list[int]:
    if not _netns_exists(netns):
        return []
    proc = _ip("netns", "pids", netns, check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit() and int(p) != os.getpid()]


def _kill_all(pids_of: Callable[[], list[int]], timeout: float) -> None:
    """SIGTERM every process `pids_of()` lists, SIGKILL those left after `timeout` seconds,
    and wait (bounded) until none is left."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        pids = pids_of()
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while pids and time.time() < deadline:
            time.sleep(0.2)
            pids = pids_of()
        if not pids:
            return
    raise RuntimeError(f"processes {pids_of()} survived SIGKILL")


def _stale_masters() -> list[int]:
    """Masters an earlier, crashed run left on the bridge's address (found by their command line)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if MASTER_CLASS in cmd and BRIDGE_IP in cmd and p.pid != os.getpid():
            found.append(p.pid)
    return found


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"({exc})"
    return "\n".join(text[-lines:])


class NamespacedCluster:
    """A Spark standalone master on the bridge and one worker per namespaced host (see the
    module's docstring). `start()` builds it, `stop()` removes all of it; it is also a context
    manager. One at a time per machine: the names and addresses are fixed, and `start()` first
    removes what an earlier run with the same names left behind."""

    driver_host = BRIDGE_IP
    """Where the kernel's Spark driver must bind (SPARK_LOCAL_IP): the only address of the root
    namespace that the hosts can reach."""

    def __init__(self, root: Path, hidden: Sequence[Path] = (),
                 hosts: Sequence[tuple[str, str, int]] = DEFAULT_HOSTS,
                 worker_memory: str = "2g", timeout: float = 120.0) -> None:
        """`root`: an empty folder that will hold everything (logs, the hosts' disks, `shared`,
        `kernel_home`). `hidden`: existing folders the hosts must not see (an empty tmpfs over
        each on every host), besides `kernel_home`, which is always hidden. `timeout`: how long
        the workers have to register."""
        self.root = Path(root).resolve()
        self.hosts = [Host(name, ip, cores, self.root / "hosts" / name) for name, ip, cores in hosts]
        self.shared = self.root / "shared"
        """Seen by every host and by the kernel: stands for NFS or HDFS."""
        self.kernel_home = self.root / "kernel"
        """The kernel's own disk, hidden from every host: kernel_env puts TFOS_HOME and TMPDIR here."""
        self.logs_dir = self.root / "logs"
        self.worker_memory = worker_memory
        self.timeout = timeout
        self.hidden = [Path(p).resolve() for p in hidden]
        for path in self.hidden:
            if not path.is_dir():
                raise ValueError(f"cannot hide {path} from the hosts: it is not an existing folder")
            for seen in [self.shared, *(h.dir for h in self.hosts)]:
                if seen == path or path in seen.parents:
                    raise ValueError(f"cannot hide {path} from the hosts: it holds {seen}, which they need")
        self.master_url = ""
        self.webui_url = ""
        self._master: subprocess.Popen | None = None
        self._workers: list[subprocess.Popen] = []
        self._logs: list = []

    # -- what a test uses ---------------------------------------------------------------

    def host(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    def pids(self, host: Host | str) -> list[int]:
        """The PIDs in the host's network namespace: its worker, executors and their Python workers."""
        return _netns_pids(host if isinstance(host, str) else host.netns)

    def processes(self, host: Host | str, pattern: str) -> list[psutil.Process]:
        """The host's processes whose command line contains `pattern` (e.g. 'CoarseGrainedExecutorBackend')."""
        found = []
        for pid in self.pids(host):
            try:
                proc = psutil.Process(pid)
                if pattern in " ".join(proc.cmdline()):
                    found.append(proc)
            except psutil.Error:
                pass
        return found

    def kernel_env(self, base_env: Mapping[str, str]) -> dict[str, str]:
        """The environment a Jupyter kernel needs to act as the notebook on this cluster: its
        driver on the bridge's address (the hosts reach nothing else of the root namespace),
        this cluster's master, and TFOS_HOME, TMPDIR and Spark's local dirs on the kernel's own
        disk, which no executor can read."""
        return dict(base_env, SPARK_LOCAL_IP=self.driver_host, TFOS_SPARK_MASTER=self.master_url,
                    TFOS_HOME=str(self.kernel_home / "tfos"), TMPDIR=str(self.kernel_home / "tmp"),
                    SPARK_LOCAL_DIRS=str(self.kernel_home / "spark"), PYSPARK_PYTHON=sys.executable)

    def master_state(self) -> dict:
        """The master's JSON (its web UI's /json/): workers, applications, cores."""
        # No proxy: the request must go to the bridge, never to a proxy from the environment.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        return json.loads(opener.open(f"{self.webui_url}/json/", timeout=3).read())

    def logs(self, lines: int = 30) -> str:
        """The last lines of the master's, each worker's and each executor's log, for a failure message."""
        paths = sorted(self.logs_dir.glob("*.log"))
        for host in self.hosts:
            paths += sorted(host.work.glob("app-*/*/stderr"))
        return "\n".join(f"==> {p} <==\n{_tail(p, lines)}" for p in paths)

    # -- building and removing it ---------------------------------------------------------

    def __enter__(self) -> NamespacedCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        try:
            self._clear_leftovers()
            self._make_folders()
            self._make_network()
            self._check_host_to_host()
            self._start_spark()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Kill every process on the hosts (TERM, then KILL), then the master; delete the veth
        pairs, the namespaces and the bridge. Safe after a partial start, and to call twice."""
        errors = []
        for host in self.hosts:
            try:
                _kill_all(lambda h=host: self.pids(h), timeout=20)
            except RuntimeError as exc:
                errors.append(f"{host.name}: {exc}")
        if self._master is not None and self._master.poll() is None:
            os.killpg(self._master.pid, signal.SIGTERM)
            try:
                self._master.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self._master.pid, signal.SIGKILL)
        for proc in [*self._workers, *([self._master] if self._master else [])]:
            try:
                proc.wait(10)  # reap them
            except subprocess.TimeoutExpired:
                errors.append(f"pid {proc.pid} did not exit")
        self._master, self._workers = None, []
        for log in self._logs:
            log.close()
        self._logs = []
        self._remove_network()
        if errors:
            raise RuntimeError("multi-host cluster teardown: " + "; ".join(errors))

    def _clear_leftovers(self) -> None:
        for host in self.hosts:
            _kill_all(lambda h=host: _netns_pids(h.netns), timeout=10)
        _kill_all(_stale_masters, timeout=10)
        self._remove_network()

    def _remove_network(self) -> None:
        # The veth first: deleting it from the root namespace removes both ends at once, while a
        # deleted namespace frees its devices later, asynchronously.
        for host in self.hosts:
            if _link_exists(host.veth):
                _ip("link", "del", host.veth, check=False)
            if _netns_exists(host.netns):
                _ip("netns", "del", host.netns)
        if _link_exists(BRIDGE):
            _ip("link", "del", BRIDGE)
        deadline = time.time() + 10
        names = [BRIDGE, *(h.veth for h in self.hosts)]
        while any(map(_link_exists, names)) or any(_netns_exists(h.netns) for h in self.hosts):
            if time.time() > deadline:
                raise RuntimeError(f"left behind after deletion: {[n for n in names if _link_exists(n)]}")
            time.sleep(0.1)

    def _make_folders(self) -> None:
        for path in [self.logs_dir, self.shared, self.kernel_home / "tfos", self.kernel_home / "tmp",
                     self.kernel_home / "spark"]:
            path.mkdir(parents=True, exist_ok=True)
        for host in self.hosts:
            for sub in ("tmp", "local", "work", "home"):
                (host.dir / sub).mkdir(parents=True, exist_ok=True)
            (host.dir / "etc").mkdir(exist_ok=True)
            (host.dir / "etc" / "hosts").write_text(_ETC_HOSTS.format(name=host.name))
            (host.dir / "etc" / "hostname").write_text(host.name + "\n")

    def _make_network(self) -> None:
        # Nothing else on this machine may use the subnet: traffic must stay between our namespaces.
        used = _ip("-o", "-4", "addr", "show", "to", f"{BRIDGE_IP}/{PREFIX}").stdout.strip()
        if used:
            raise RuntimeError(f"{BRIDGE_IP}/{PREFIX} is already in use on this machine; the multi-host "
                               f"harness needs it to itself:\n{used}")
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{BRIDGE_IP}/{PREFIX}", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
        for host in self.hosts:
            _ip("netns", "add", host.netns)
            # The host's end is created inside its namespace, named as on a real machine.
            _ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
            _ip("link", "set", host.veth, "master", BRIDGE)
            _ip("link", "set", host.veth, "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
            _ip("-n", host.netns, "addr", "add", f"{host.ip}/{PREFIX}", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")
            # No default route: nothing from a host can leave the subnet.

    def _check_host_to_host(self) -> None:
        """TCP from every host to every other, through the bridge (not only to the root namespace)."""
        port = "7077"
        for a in self.hosts:
            for b in self.hosts:
                if a is b:
                    continue
                server = subprocess.Popen(["ip", "netns", "exec", b.netns, sys.executable, "-I", "-c", _LISTEN,
                                           b.ip, port], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                client = subprocess.run(["ip", "netns", "exec", a.netns, sys.executable, "-I", "-c", _CONNECT,
                                         b.ip, port], capture_output=True, text=True, timeout=30)
                try:
                    server.communicate(timeout=20)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.communicate()
                if client.returncode != 0 or client.stdout.strip() != f"ok {a.ip}":
                    raise RuntimeError(
                        f"{a.name} ({a.ip}) cannot reach {b.name} ({b.ip}) over TCP through bridge {BRIDGE}: "
                        f"{client.stdout.strip()} {client.stderr.strip()[-800:]} (a firewall on bridged "
                        "traffic, e.g. br_netfilter with a FORWARD policy of DROP, would do this)")

    def _host_env(self, host: Host, spark_home: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _NOT_ON_HOSTS and not k.startswith("TFOS_")}
        env.update(SPARK_HOME=spark_home, PYSPARK_PYTHON=sys.executable, HOME=str(host.dir / "home"),
                   TMPDIR=str(host.tmp), SPARK_LOCAL_DIRS=str(host.dir / "local"), SPARK_WORKER_DIR=str(host.work),
                   SPARK_DAEMON_JAVA_OPTS=f"-Djava.io.tmpdir={host.tmp}")
        return env

    def _enter(self, host: Host) -> list[str]:
        """The command prefix that runs a command on `host`: its network, UTS and mount namespaces."""
        hidden = [self.kernel_home, *self.hidden, *(h.dir for h in self.hosts if h is not host)]
        return ["ip", "netns", "exec", host.netns, "unshare", "--mount", "--uts", "--propagation", "private",
                "--", "sh", "-c", _ENTER, "tfos-enter", host.name, str(host.dir / "etc" / "hosts"),
                str(host.dir / "etc" / "hostname"), *map(str, hidden), "--"]

    def _spawn(self, cmd: list[str], env: dict[str, str], log_name: str) -> subprocess.Popen:
        log = open(self.logs_dir / log_name, "wb")
        self._logs.append(log)
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)

    def _start_spark(self) -> None:
        import pyspark

        spark_home = os.path.dirname(pyspark.__file__)
        spark_class = os.path.join(spark_home, "bin", "spark-class")
        port, ui = free_port(BRIDGE_IP), free_port(BRIDGE_IP)
        self.master_url, self.webui_url = f"spark://{BRIDGE_IP}:{port}", f"http://{BRIDGE_IP}:{ui}"
        master_env = {k: v for k, v in os.environ.items() if k not in _NOT_ON_HOSTS}
        master_env.update(SPARK_HOME=spark_home, SPARK_LOCAL_IP=BRIDGE_IP)
        self._master = self._spawn([spark_class, MASTER_CLASS, "--host", BRIDGE_IP, "--port", str(port),
                                    "--webui-port", str(ui)], master_env, "master.log")
        for host in self.hosts:
            cmd = [*self._enter(host), spark_class, WORKER_CLASS, "--cores", str(host.cores),
                   "--memory", self.worker_memory, "--work-dir", str(host.work), self.master_url]
            self._workers.append(self._spawn(cmd, self._host_env(host, spark_home), f"worker-{host.name}.log"))
        self._wait_for_workers()

    def _wait_for_workers(self) -> None:
        want = {h.ip: h.cores for h in self.hosts}
        deadline = time.time() + self.timeout
        seen: dict = {}
        while True:
            try:
                workers = [w for w in self.master_state().get("workers", []) if w.get("state") == "ALIVE"]
                seen = {w.get("host"): w.get("cores") for w in workers}
                if seen == want:
                    return
                if len(workers) >= len(want):  # all registered, but not on the addresses or cores meant
                    raise RuntimeError(f"the workers registered as {seen}, not {want}\n{self.logs()}")
            except OSError:
                pass
            procs = {"master": self._master, **{h.name: w for h, w in zip(self.hosts, self._workers)}}
            dead = [name for name, proc in procs.items() if proc is not None and proc.poll() is not None]
            if dead or time.time() > deadline:
                why = f"exited: {dead}" if dead else f"not within {self.timeout:.0f} s"
                raise RuntimeError(f"the multi-host Spark cluster did not start: {why}; alive workers {seen}, "
                                   f"wanted {want}\n{self.logs()}")
            time.sleep(0.5)
