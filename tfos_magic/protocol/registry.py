"""The service registry's protocol: how PS and worker tasks find each other.

Two implementations share it:

- embedded (default): the notebook's own channel keeps `role/index -> host:port`
  (requests `register` and `members`, each carrying the attempt number; every
  connection is authenticated with the attempt's token);
- ZooKeeper (kazoo): ephemeral znodes `/tfos/<job>/<attempt>/<role>/<index>` holding
  host:port, optionally under a digest ACL. An ephemeral node lives as long as the TF
  process that made it, so a dead task leaves the registry by itself.

The TF processes hold the clients (`training/registry.py`); the notebook holds the
embedded server and its view of ZooKeeper (`driver/registry.py`).
"""

from __future__ import annotations

from typing import Any

from ..errors import TfosError

Members = dict[str, dict[int, str]]  # role -> index -> host:port
ZK_CONNECT_TIMEOUT_S = 10.0
ROOT = "/tfos"


class RegistryError(TfosError):
    pass


def missing(members: Members, counts: dict[str, int]) -> list[str]:
    """`role/index` entries that have not registered, in order."""
    return [f"{role}/{i}" for role, n in counts.items() for i in range(n) if i not in members.get(role, {})]


def cluster_spec(members: Members, counts: dict[str, int]) -> dict[str, list[str]]:
    return {role: [members[role][i] for i in range(n)] for role, n in counts.items() if n}


def zk_connect(hosts: str, auth: str | None):
    from kazoo.client import KazooClient
    from kazoo.handlers.threading import KazooTimeoutError
    from kazoo.security import OPEN_ACL_UNSAFE, make_digest_acl

    kwargs: dict[str, Any] = {}
    if auth:
        user, _, password = auth.partition(":")
        kwargs["auth_data"] = [("digest", auth)]
        kwargs["default_acl"] = [make_digest_acl(user, password, all=True)]
    client = KazooClient(hosts=hosts, timeout=ZK_CONNECT_TIMEOUT_S, **kwargs)
    try:
        client.start(timeout=ZK_CONNECT_TIMEOUT_S)
    except KazooTimeoutError:
        client.close()
        raise RegistryError(
            f"Cannot reach ZooKeeper at {hosts} within {ZK_CONNECT_TIMEOUT_S:.0f}s. Check --zookeeper "
            "(host:port[/chroot]) or TFOS_ZOOKEEPER, or leave both unset to use the embedded registry."
        ) from None
    # /tfos is shared by every job and user: open; a job's own nodes get the job's ACL.
    client.ensure_path(ROOT, acl=OPEN_ACL_UNSAFE)
    return client


def job_path(job: str) -> str:
    return f"{ROOT}/{job}"


def zk_members(zk, path: str, watch=None) -> Members:
    from kazoo.exceptions import NoNodeError

    out: Members = {}
    try:
        roles = zk.get_children(path, watch=watch)
    except NoNodeError:
        zk.ensure_path(path)  # so the watch has a node to sit on
        roles = zk.get_children(path, watch=watch)
    for role in roles:
        try:
            for index in zk.get_children(f"{path}/{role}", watch=watch):
                data, _ = zk.get(f"{path}/{role}/{index}")
                out.setdefault(role, {})[int(index)] = data.decode()
        except NoNodeError:
            continue
    return out
