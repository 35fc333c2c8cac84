"""A JetStream cluster on loopback: `fleetlog up --cluster 3`, the cluster fault tests, the bench.

Each node is an `EmbeddedBroker` (nats-server from the wheel, dying with its parent) with
its own server name, store dir, client port, route port and monitoring port; every node
solicits routes to the others. JetStream in a cluster needs server names and, for R3
streams, at least three nodes. A node answering on its client port is not enough: until
the nodes elect a JetStream meta leader, stream API calls fail. `start()` therefore waits
for a plain `/healthz` of every node to say ok — the plain check includes the meta leader
(and, on a restarted node, that its streams caught up), unlike `?js-enabled-only`, which
answers as soon as JetStream is switched on.

`secure` (`up --secure --cluster N`): every node serves the same identities (one registry,
`registry_dir`), each from its own config, and the routes between nodes authenticate too
(a random route password, kept 0600 beside the registry), so nothing joins the cluster
that fleetlog did not start. `identities add|revoke` reload every node. A secure node has no
monitoring port: nats-server serves it without authentication, and `/connz?subs=1&auth=1`
lists every user's nkey and inbox subjects to anyone on the machine. Its health is asked
over NATS instead, as the admin identity (`$JS.API.INFO` answers once a meta leader exists).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

import nats
from fleetlog.services.backbone.nkeyauth import Identity
from fleetlog.services.node.broker import (
    GLOBAL_ACCOUNT,
    BrokerError,
    EmbeddedBroker,
    account_stores,
    ensure_builtin_identities,
    free_port,
    refuse_split_store,
)
from fleetlog.services.node.identities import FLEET_ACCOUNT

__all__ = ["CLUSTER_NAME", "LocalCluster", "cluster_args", "healthz", "js_ready"]

log = logging.getLogger("fleetlog.cluster")

CLUSTER_NAME = "fleetlog"


def cluster_args(cluster_url: str, routes: list[str], http_port: int, cluster_name: str = CLUSTER_NAME) -> list[str]:
    """The nats-server flags that make a node of the cluster (compose.yaml uses the same ones;
    tests/test_cluster_compose.py checks that)."""
    return ["--cluster_name", cluster_name, "--cluster", cluster_url, "--routes", ",".join(routes),
            "--http_port", str(http_port)]


async def healthz(host: str, http_port: int, timeout_s: float = 2.0) -> tuple[int, str]:
    """(HTTP status, body) of the node's plain `/healthz`; (0, reason) if it does not answer."""
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, http_port)
            writer.write(f"GET /healthz HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            raw = await reader.read()
            writer.close()
    except (OSError, TimeoutError) as exc:
        return 0, str(exc) or type(exc).__name__
    head, _, body = raw.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    return status, body.decode("utf-8", "replace").strip()


async def js_ready(url: str, seed: Path, timeout_s: float = 2.0) -> tuple[int, str]:
    """A secure node's health without its monitoring port: (200, "ok") once the node, asked as
    `seed`'s identity, answers `$JS.API.INFO` without an error (a JetStream meta leader exists
    and the node reaches it); else (0 or 503, the reason)."""
    try:
        nc = await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=timeout_s,
                                **Identity.load(seed).nats_options())
    except Exception as exc:
        return 0, str(exc) or type(exc).__name__
    try:
        reply = json.loads((await nc.request("$JS.API.INFO", b"", timeout=timeout_s)).data)
    except Exception as exc:
        return 0, str(exc) or type(exc).__name__
    finally:
        await nc.close()
    error = reply.get("error") if isinstance(reply, dict) else {"description": "not JSON"}
    return (503, str(error.get("description"))) if error else (200, "ok")


class LocalCluster:
    """`size` nats-server nodes on loopback under `data_dir/node-N`; the first on `port`."""

    def __init__(self, data_dir: Path, size: int = 3, port: int = 4222, host: str = "127.0.0.1", *,
                 sync_always: bool = False, secure: bool = False, registry_dir: Path | None = None) -> None:
        """`sync_always`: fsync every write (`jetstream { sync_interval: always }`) instead of the
        file store's default interval (docs/operations.md: what that protects, what it costs).
        `secure`: users and permissions from `registry_dir` (default `<data_dir>/../broker`, where
        `fleetlog identities` looks), routes authenticated."""
        if size < 1:
            raise ValueError(f"cluster size must be at least 1, got {size}")
        self.host = host
        self.secure = secure
        self.registry_dir = Path(registry_dir) if registry_dir is not None else Path(data_dir).parent / "broker"
        taken = {port}

        def fresh() -> int:
            while True:
                p = free_port(host)
                if p not in taken:
                    taken.add(p)
                    return p

        client_ports = [port] + [fresh() for _ in range(size - 1)]
        route_ports = [fresh() for _ in range(size)]
        # Plain nodes only: a secure node serves no monitoring port (module docstring).
        self.http_ports = [] if secure else [fresh() for _ in range(size)]
        self.nodes: list[EmbeddedBroker] = []
        secret = _route_secret(self.registry_dir) if secure else ""
        for i in range(size):
            node_dir = Path(data_dir) / f"node-{i + 1}"
            if secure:
                conf = _secure_cluster_conf(host, route_ports, i, secret, sync_always)
                self.nodes.append(EmbeddedBroker(node_dir, client_ports[i], host, name=f"fleetlog-{i + 1}", secure=True,
                                                 registry_dir=self.registry_dir, conf=conf))
                continue
            routes = [f"nats://{host}:{p}" for j, p in enumerate(route_ports) if j != i]
            args = cluster_args(f"nats://{host}:{route_ports[i]}", routes, self.http_ports[i])
            if sync_always:
                node_dir.mkdir(parents=True, exist_ok=True)
                (node_dir / "nats.conf").write_text("jetstream {\n  sync_interval: always\n}\n")
                args += ["-c", str(node_dir / "nats.conf")]
            self.nodes.append(EmbeddedBroker(node_dir, client_ports[i], host,
                                             name=f"fleetlog-{i + 1}", cluster_args=args))

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def nats_url(self) -> str:
        """All nodes, comma separated (`FLEETLOG_NATS_URL`, `--nats`)."""
        return ",".join(self.urls)

    async def start(self, timeout_s: float = 60.0) -> None:
        """Start every node, then wait until all of them report healthy (meta leader elected)."""
        self.check_stores()
        if self.secure:  # once, before any node reads the registry
            ensure_builtin_identities(self.registry_dir)
        try:
            await asyncio.gather(*(n.start(timeout_s) for n in self.nodes))
            await self.wait_healthy(timeout_s)
        except BaseException:
            await self.stop()
            raise

    def check_stores(self) -> None:
        """Refuse a store whose streams are in the other mode's account: a secure cluster from a
        fleetlog before accounts (streams in the global account `$G`), or a plain cluster over a
        secure one's store (in FLEET). A single node moves them by a rename
        (`broker.adopt_store`); a cluster cannot: its JetStream meta group records each stream
        with its account, and after a rename every node would still look for them in the old one."""
        want, other = (FLEET_ACCOUNT, GLOBAL_ACCOUNT) if self.secure else (GLOBAL_ACCOUNT, FLEET_ACCOUNT)
        for node in self.nodes:
            root = account_stores(node.data_dir / "jetstream")
            refuse_split_store(root)
            if (root / other).is_dir() and not (root / want).exists():
                parent = node.data_dir.parent
                raise BrokerError(
                    f"{root / other}: this {'secure' if self.secure else 'plain'} cluster's store keeps its streams "
                    f"in the account {other!r} (" + ("a secure cluster of a fleetlog before accounts"
                                                     if self.secure else "it ran as `up --secure`")
                    + f"), which a cluster cannot move to {want!r}. Start it as it was "
                    + ("with the fleetlog that made it" if self.secure else "(`up --secure --cluster N`)")
                    + f", or move {parent} away and start a new cluster (docs/security.md, \"Upgrading\")")

    async def wait_healthy(self, timeout_s: float = 60.0, nodes: list[int] | None = None) -> None:
        """Until the plain `/healthz` of the given nodes (default: every running one) says ok; a
        secure node's `$JS.API.INFO` as the admin (`js_ready`)."""
        which = nodes if nodes is not None else [i for i, n in enumerate(self.nodes) if self.running(i)]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        last: dict[int, str] = {}
        while True:
            for i in which:
                if i in last and last[i] == "ok":
                    continue
                if self.secure:
                    status, body = await js_ready(self.nodes[i].url, self.nodes[i].credentials_path("admin-fleetlog"))
                else:
                    status, body = await healthz(self.host, self.http_ports[i])
                last[i] = "ok" if status == 200 else f"{status} {body[:200]}"
            if all(last.get(i) == "ok" for i in which):
                return
            if loop.time() > deadline:
                said = "; ".join(f"{self.nodes[i].name}: {last[i]}" for i in which if last[i] != "ok")
                raise BrokerError(f"the cluster is not healthy after {timeout_s}s (no JetStream meta leader?): {said}")
            await asyncio.sleep(0.2)

    def running(self, i: int) -> bool:
        proc = self.nodes[i].process
        return proc is not None and proc.poll() is None

    def kill(self, i: int) -> None:
        """SIGKILL node i (fault tests)."""
        self.nodes[i].kill()

    async def terminate(self, i: int) -> None:
        """SIGTERM node i and wait for it to end."""
        await self.nodes[i].stop()

    async def restart(self, i: int, timeout_s: float = 60.0) -> None:
        """Start node i again (same name, ports and store) and wait until it is healthy."""
        await self.nodes[i].start(timeout_s)
        await self.wait_healthy(timeout_s, [i])

    async def stop(self) -> None:
        await asyncio.gather(*(n.stop() for n in self.nodes), return_exceptions=True)


def _route_secret(registry_dir: Path) -> str:
    """The routes' password of a secure cluster (made once, 0600 beside the registry)."""
    path = registry_dir / "route.secret"
    if not path.exists():
        registry_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(24))
    return path.read_text().strip()


def _secure_cluster_conf(host: str, route_ports: list[int], i: int, secret: str,
                         sync_always: bool) -> dict[str, Any]:
    """What `cluster_args` says on a plain node's command line, as config (the routes carry
    the password) plus the routes' own authorization; no monitoring port."""
    conf: dict[str, Any] = {
        "cluster": {
            "name": CLUSTER_NAME,
            "listen": f"{host}:{route_ports[i]}",
            "routes": [f"nats://route:{secret}@{host}:{p}" for j, p in enumerate(route_ports) if j != i],
            "authorization": {"user": "route", "password": secret},
        },
    }
    if sync_always:
        conf["jetstream"] = {"sync_interval": "always"}
    return conf
