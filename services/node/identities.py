"""Identities of a secure broker: roles, the NATS permissions fleetlog generates for them,
and the registry the embedded broker's config is rendered from.

Each identity (`<role>-<name>`) is an nkey user: the broker knows only its public key
(`U...`), whose permissions say which subjects it may publish (and so which facts it may
state, which requests it may make) and subscribe to (its own reply inboxes,
`_INBOX.<public key>.>`). NATS enforces them; fleetlog adds no layer in front. The seed
is written once, to the file `identities add --out` names, and kept nowhere else. The
registry (`<data_dir>/identities.json`) holds the public keys; `broker_config` renders the
nats-server config from it, and the broker reloads it on SIGHUP without a restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from fleetlog.schemas.runs import RUNTIME_QUERIES
from fleetlog.services.backbone.logins import LOGIN_ROLES, hash_password, new_password, write_password
from fleetlog.services.backbone.nkeyauth import inbox_prefix, new_seed, write_seed
from fleetlog.services.client.nodes import PING_ANSWER_WINDOW_S

__all__ = [
    "ADMIN_ONLY",
    "CLIENTS_ACCOUNT",
    "FLEET_ACCOUNT",
    "ROLES",
    "SERVICES",
    "IdentityError",
    "Registry",
    "accounts",
    "broker_config",
    "password_path",
    "permissions",
    "registry_lock",
    "write_private",
]

ROLES: Final = ("agent", "runtime", "processor", "service", "reader", "admin")
NAMED: Final = frozenset({"agent", "runtime", "processor"})
# Requests that change or expose more than a view's rows: only `admin` (and `service`) may make them.
# `fleetlog.rejects` answers previews of any identity's refused payloads (a run's authorization,
# a state value): reading them, and so re-driving them, is admin's.
ADMIN_ONLY: Final = ("fleetlog.sql", "fleetlog.attempts.purge", "fleetlog.rebuild", "fleetlog.processors.run",
                     "fleetlog.retention", "fleetlog.rejects", "$JS.API.STREAM.CREATE.>", "$JS.API.STREAM.UPDATE.>",
                     "$JS.API.STREAM.DELETE.>", "$JS.API.STREAM.PURGE.>", "$JS.API.STREAM.MSG.DELETE.>",
                     "$JS.API.STREAM.SNAPSHOT.>", "$JS.API.STREAM.RESTORE.>", "$JS.API.CONSUMER.>")
# Every answer nats-server gives (a JetStream ack, a JetStream API reply) goes to whatever
# reply subject the requester named, and subject permissions cannot stop that inside one
# account (docs/security.md, "Replies as a deputy"): each read-only API subject a role may
# ask is a way to have the server write a JSON on a subject of its choosing. So each role
# gets only the calls its SDK makes.
# Stream metadata every role reads: the publisher keys its spool by the attempts stream's
# identity at connect (refused, every connect waited out a timeout first and a one-shot `emit`
# spooled instead of publishing), `Fleet.connect(ensure=True)` and `fleetlog status` read each
# stream's info.
STREAM_META: Final = ("$JS.API.STREAM.INFO.>",)


def _reads(*streams: str) -> list[str]:
    """The message gets a guarded writer makes on its own streams: direct gets, and the
    leader's message get on a replicated stream (services/backbone/guarded.py)."""
    return [s for st in streams for s in (f"$JS.API.DIRECT.GET.{st}", f"$JS.API.DIRECT.GET.{st}.>",
                                          f"$JS.API.STREAM.MSG.GET.{st}")]


# The query service's endpoints, and the one nats.micro verb a client uses: `fleetlog status
# --nodes` pings every instance (services/client/nodes.py). `$SRV.INFO`/`$SRV.STATS` are the
# trusted roles' (the dashboard's /metrics reads STATS as the service).
QUERIES: Final = ("fleetlog.>", "$SRV.PING.fleetlog")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class IdentityError(ValueError):
    """A bad role, name or registry; the message names which and the rule."""


def _check(role: str, name: str, host: str | None) -> None:
    if role not in ROLES:
        raise IdentityError(f"role: {role!r} is not one of {', '.join(ROLES)}")
    if not _NAME.match(name):
        raise IdentityError(f"name: {name!r} must be 1-64 of A-Z a-z 0-9 _ - (it becomes a subject token)")
    if host is not None and (role != "agent" or not _NAME.match(host)):
        raise IdentityError(f"host: {host!r} is for agents only, 1-64 of A-Z a-z 0-9 _ -")


def permissions(role: str, name: str, host: str | None = None, *, public_key: str) -> dict[str, Any]:
    """The nats-server permissions block of one identity (its public key roots its reply inboxes)."""
    _check(role, name, host)
    if role in ("service", "admin"):
        return {"publish": {"allow": [">"]}, "subscribe": {"allow": [">"]}}
    h = host or "*"
    own: list[str] = {
        # its own facts only: the subject carries the identity and the fold checks the payload against it
        "agent": [f"fleet.attempt.{name}.>", f"fleet.snapshot.{h}.{name}", f"fleet.diff.{h}.{name}"],
        # the guarded run records and the direct gets a claim needs, its own heartbeats, scoped state
        "runtime": [f"fleet.runtime.{name}.>", "fleet.run.>", "fleet.state.>",
                    *_reads("FLEET_RUNS", "FLEET_RUNTIMES", "FLEET_STATE")],
        "processor": [f"fleet.proc.{name}.>", *_reads("FLEET_PROCESSORS")],
        "reader": [],
    }[role]
    return {
        # Runs' whole states (`authorization` too: candidates, expired, a claimer's fallback
        # `fleetlog.runs.state`) are for the identities that write runs.
        "publish": {"allow": list(dict.fromkeys([*own, *STREAM_META, *QUERIES])),
                    "deny": [*ADMIN_ONLY, *([] if role == "runtime" else RUNTIME_QUERIES)]},
        # Its own replies only: every connection of this identity roots its inboxes there.
        "subscribe": {"allow": [f"{inbox_prefix(public_key)}.>"]},
    }


@contextlib.contextmanager
def registry_lock(data_dir: Path) -> Iterator[None]:
    """The registry's writers in turn: an exclusive flock on `<data_dir>/identities.lock`
    around load-modify-save (and a reload's render of the config). Two `identities add`
    at once each read the old list and the last save won: an identity was lost, a revoked
    one could come back. A flock dies with its process: a killed writer leaves no stale lock."""
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(data_dir) / "identities.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def write_private(path: Path, text: str) -> None:
    """Replace `path` atomically with `text`, mode 0600, through a temp file of its own (a shared
    temp name let two writers interleave into one file)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class Registry:
    """The identities of one secure broker, kept in `<data_dir>/identities.json`; `add` and
    `revoke` hold `registry_lock` while they read, change and save it."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = Path(data_dir)
        self.path = self.dir / "identities.json"

    def load(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        try:
            users: list[dict[str, Any]] = json.loads(self.path.read_text())["users"]
        except (ValueError, KeyError, TypeError):
            raise IdentityError(f"registry: {self.path} is not a fleetlog identities file") from None
        if not all(isinstance(u, dict) and isinstance(u.get("nkey"), str) for u in users):
            raise IdentityError(f"registry: {self.path} has users without an nkey (an older fleetlog's passwords): "
                                "move it away and add the identities again")
        return users

    def _save(self, users: list[dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Public keys only, but who may connect is the broker's business: owner only.
        write_private(self.path, json.dumps({"users": users}, indent=1))

    def add(self, role: str, name: str, host: str | None = None, *, out: Path) -> dict[str, Any]:
        """A new identity: its seed goes to `out` (mode 0600, never overwritten), its public key
        to the registry; a reader or admin also gets a dashboard password, written beside the
        seed (`password_path(out)`) and kept in the registry only as a salted hash. Refused if
        the user exists."""
        _check(role, name, host)
        with registry_lock(self.dir):
            return self._add(role, name, host, out)

    def _add(self, role: str, name: str, host: str | None, out: Path) -> dict[str, Any]:
        users = self.load()
        user = f"{role}-{name}"
        if any(u["user"] == user for u in users):
            raise IdentityError(f"name: {user!r} exists; revoke it first to issue new credentials")
        login = role in LOGIN_ROLES
        if login and password_path(out).exists():
            raise IdentityError(f"out: {password_path(out)} exists; a password file is never overwritten")
        seed, public_key = new_seed()
        try:
            write_seed(seed, out)
        except ValueError as exc:
            raise IdentityError(str(exc)) from None
        entry: dict[str, Any] = {"user": user, "nkey": public_key, "role": role, "name": name, "host": host}
        if login:
            password = new_password()
            write_password(password, password_path(out))
            entry["http"] = hash_password(password)
        self._save([*users, entry])
        return entry

    def get(self, user: str) -> dict[str, Any] | None:
        return next((u for u in self.load() if u["user"] == user), None)

    def revoke(self, user: str) -> bool:
        with registry_lock(self.dir):
            users = self.load()
            kept = [u for u in users if u["user"] != user]
            if len(kept) == len(users):
                return False
            self._save(kept)
            return True


def password_path(seed_file: Path) -> Path:
    """Where a reader's or admin's dashboard password is written: beside its seed."""
    return Path(seed_file).with_suffix(".password")


# Two accounts on a secure node (docs/security.md, "Replies as a deputy"). nats-server's own
# answers (a JetStream ack, a stream info, a direct get) go to whatever reply subject the asker
# named, and no subject permission stops that inside one account: an agent naming a state key
# as its reply had the server store its PubAck there. So the streams and the trusted roles live
# in FLEET, every other identity in CLIENTS, which reaches FLEET only through service imports:
# the server rewrites a request's reply to a `_R_.` subject of FLEET and carries the answer back
# to the reply in CLIENTS, where no stream captures anything.
FLEET_ACCOUNT: Final = "FLEET"
CLIENTS_ACCOUNT: Final = "CLIENTS"
TRUSTED: Final = frozenset({"service", "admin"})
# What a client role publishes or asks, as FLEET exports it (subject, response type). Per-user
# publish permissions still decide who may send what; an import only carries it across.
# `singleton`: one answer per request (a JetStream ack, a query, a stream info, a direct or
# leader message get: fleetlog makes no batch gets). `stream`: `$SRV.PING.fleetlog` is answered
# by every query service instance (`fleetlog status --nodes` on a cluster collects them all);
# a singleton import would let only the first answer back.
SERVICES: Final = (
    ("fleet.attempt.>", "singleton"), ("fleet.snapshot.>", "singleton"), ("fleet.diff.>", "singleton"),
    ("fleet.runtime.>", "singleton"), ("fleet.run.>", "singleton"), ("fleet.state.>", "singleton"),
    ("fleet.proc.>", "singleton"), ("fleetlog.>", "singleton"), ("$SRV.PING.fleetlog", "stream"),
    ("$JS.API.STREAM.INFO.>", "singleton"), ("$JS.API.DIRECT.GET.>", "singleton"),
    ("$JS.API.STREAM.MSG.GET.>", "singleton"),
    # No client role may ask it (its permissions deny it), but without an import covering it
    # nats-server gives CLIENTS a JetStream API responder of its own (`serviceImportShadowed`
    # in its jetstream.go), which answers every `$JS.API.>` request "JetStream not enabled for
    # account" before FLEET's answer can come back.
    ("$JS.API.INFO", "singleton"),
)


# How long nats-server carries the answers of one `stream` request back (`$SRV.PING.fleetlog`).
# It keeps each such request's reply mapping that long even once answered (default 2 min):
# a reader pinging in a loop grew the broker by ~0.9 KB per ping, 100k pings in 3 s to
# +87 MB, without bound (review finding); with 1 s the same bursts stayed under ~115 MB.
# `Fleet.nodes(wait_s)` waits at most this long for answers (PING_ANSWER_WINDOW_S).


def _export(subject: str, kind: str) -> dict[str, Any]:
    export: dict[str, Any] = {"service": subject, "response_type": kind}
    if kind == "stream":
        export["response_threshold"] = f"{PING_ANSWER_WINDOW_S:g}s"
    return export


def _user(u: dict[str, Any]) -> dict[str, Any]:
    return {"nkey": u["nkey"], "permissions": permissions(u["role"], u["name"], u["host"], public_key=u["nkey"])}


def accounts(users: list[dict[str, Any]]) -> dict[str, Any]:
    """The `accounts` block of a secure node's config: FLEET (JetStream, `service` and `admin`,
    the exports) and CLIENTS (every other identity by public key, one import per export, no
    prefix: a client asks the same subjects as on one account). nats-server adds `$SYS`."""
    return {
        FLEET_ACCOUNT: {
            "jetstream": "enabled",
            "users": [_user(u) for u in users if u["role"] in TRUSTED],
            "exports": [_export(subject, kind) for subject, kind in SERVICES],
        },
        CLIENTS_ACCOUNT: {
            "users": [_user(u) for u in users if u["role"] not in TRUSTED],
            "imports": [{"service": {"account": FLEET_ACCOUNT, "subject": subject}} for subject, _ in SERVICES],
        },
    }


def broker_config(host: str, port: int, name: str, store_dir: Path, pid_file: Path,
                  users: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> str:
    """The nats-server config (JSON is valid nats-server config syntax); `extra`: a cluster
    node's `cluster` block (services/node/cluster.py). No monitoring port: nats-server serves it
    without authentication (every user's nkey and inbox subjects in /connz)."""
    conf: dict[str, Any] = {
        "listen": f"{host}:{port}",
        "server_name": name,
        "pid_file": str(pid_file),
        "jetstream": {"store_dir": str(store_dir)},
        "accounts": accounts(users),
    }
    for key, value in (extra or {}).items():
        conf[key] = {**conf[key], **value} if isinstance(conf.get(key), dict) else value
    return json.dumps(conf, indent=1)
