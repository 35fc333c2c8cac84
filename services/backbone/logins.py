"""Dashboard logins of a secure node: a password per `reader` / `admin` identity, kept as a
salted scrypt hash in the identities registry (services/node/identities.py writes them, the
dashboard checks HTTP Basic credentials against them).

NATS authenticates the node's connections; a browser cannot sign an nkey nonce, so the page
and /metrics ask for a password instead, issued with the identity and never stored in clear.

A check costs a hash only when it is not a login already verified: those are answered on the
event loop. The hashes run in a small pool of their own (not the default thread pool, which a
flood of wrong passwords filled: a cached login then waited behind 120 guesses for 2 s), at
most `max_queued` at a time; beyond that a check fails at once with `LoginsBusy` (a 503). An
unknown user is hashed like a known one, against a record no password matches: how long a
wrong login takes says nothing about whether the user exists.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

__all__ = ["LOGIN_ROLES", "Logins", "LoginsBusy", "hash_password", "new_password", "verify_password",
           "write_password"]

LOGIN_ROLES: Final = ("reader", "admin")
# scrypt's interactive-login cost (RFC 7914: N=2^14, r=8, p=1): ~50 ms and 16 MB per check,
# so a guessed password costs an attacker the same; a verified login is then cached.
_N, _R, _P = 1 << 14, 8, 1


def new_password() -> str:
    return secrets.token_urlsafe(18)


def hash_password(password: str) -> dict[str, Any]:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    return {"scrypt": [_N, _R, _P], "salt": salt.hex(), "hash": digest.hex()}


def verify_password(password: str, record: dict[str, Any]) -> bool:
    try:
        n, r, p = (int(x) for x in record["scrypt"])
        salt, want = bytes.fromhex(record["salt"]), bytes.fromhex(record["hash"])
    except (KeyError, TypeError, ValueError):
        return False
    got = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=len(want), maxmem=64 << 20)
    return hmac.compare_digest(got, want)


def write_password(password: str, out: Path) -> Path:
    """The password file beside an identity's seed (mode 0600, never overwritten)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    return out


class LoginsBusy(Exception):
    """Too many password checks are waiting for a hash: refused at once (HTTP 503), not queued."""


# What an unknown user's password is checked against: the same cost as a real record, and no
# password matches it (a digest of zeros).
_NOBODY: Final = {"scrypt": [_N, _R, _P], "salt": secrets.token_bytes(16).hex(), "hash": "00" * 32}


class Logins:
    """Checks an HTTP `Authorization: Basic` header against the registry's reader and admin
    identities (user `ROLE-NAME`). Fails closed: no registry, no login.

    `check` is both: awaited as `check.on_loop(header)` on the event loop (the dashboard's
    server), or called `check(header)` from a thread (blocking until its hash is done)."""

    def __init__(self, registry: Path, *, workers: int = 2, max_queued: int = 16) -> None:
        self.registry = Path(registry)
        self.max_queued = max_queued
        self._seen: tuple[float, int] | None = None
        self._users: dict[str, dict[str, Any]] = {}
        # Headers already verified against the current registry: scrypt once per login, not per request.
        self._ok: set[bytes] = set()
        self._lock = threading.Lock()  # `_load` from the loop and from threads
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fleetlog-login")
        self.queued = 0  # checks on the loop waiting for their hash
        self.hashes = 0  # hashes computed (known and unknown users alike)
        self.check = _Check(self)

    def _load(self) -> None:
        with self._lock:
            try:
                st = self.registry.stat()
            except OSError:
                self._seen, self._users, self._ok = None, {}, set()
                return
            if self._seen == (st.st_mtime, st.st_size):
                return
            try:
                users = json.loads(self.registry.read_text())["users"]
            except (OSError, ValueError, KeyError, TypeError):
                users = []
            # A revoked identity, or one issued anew, loses every cached login at once.
            self._seen, self._ok = (st.st_mtime, st.st_size), set()
            self._users = {u["user"]: u["http"] for u in users
                           if isinstance(u, dict) and u.get("role") in LOGIN_ROLES and isinstance(u.get("http"), dict)}

    def _prepare(self, header: str | None) -> bool | tuple[bytes, str, dict[str, Any], bool, Any]:
        """True: a login verified before; False: not Basic credentials; else what to hash:
        (cache key, password, record, whether the user exists, the registry it was read from)."""
        if not header or not header[:6].lower() == "basic ":
            return False
        self._load()
        key = hashlib.sha256(header.encode("latin-1", "replace")).digest()
        if key in self._ok:
            return True
        try:
            user, _, password = base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        record = self._users.get(user)
        return key, password, record if record is not None else _NOBODY, record is not None, self._seen

    def _hash(self, password: str, record: dict[str, Any]) -> bool:
        with self._lock:
            self.hashes += 1
        return verify_password(password, record)

    def _verified(self, key: bytes, ok: bool, known: bool, seen: Any) -> bool:
        if not (ok and known):
            return False
        with self._lock:
            if self._seen == seen:  # not if the registry changed meanwhile (a revoke)
                self._ok.add(key)
        return True

    async def on_loop(self, header: str | None) -> bool:
        got = self._prepare(header)
        if isinstance(got, bool):
            return got
        if self.queued >= self.max_queued:
            raise LoginsBusy(f"{self.queued} logins are being checked; try again")
        key, password, record, known, seen = got
        self.queued += 1
        try:
            ok = await asyncio.wrap_future(self._pool.submit(self._hash, password, record))
        finally:
            self.queued -= 1
        return self._verified(key, ok, known, seen)

    def blocking(self, header: str | None) -> bool:
        got = self._prepare(header)
        if isinstance(got, bool):
            return got
        key, password, record, known, seen = got
        return self._verified(key, self._pool.submit(self._hash, password, record).result(), known, seen)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class _Check:
    """`Logins.check`: callable from a thread (blocking), `on_loop` from the event loop."""

    def __init__(self, logins: Logins) -> None:
        self.on_loop = logins.on_loop
        self._blocking = logins.blocking

    def __call__(self, header: str | None) -> bool:
        return self._blocking(header)
