"""Dashboard logins of a secure node: a password per `reader` / `admin` identity, kept as a
salted scrypt hash in the identities registry (services/node/identities.py writes them, the
dashboard checks HTTP Basic credentials against them).

NATS authenticates the node's connections; a browser cannot sign an nkey nonce, so the page
and /metrics ask for a password instead, issued with the identity and never stored in clear.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any, Final

__all__ = ["LOGIN_ROLES", "Logins", "hash_password", "new_password", "verify_password", "write_password"]

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


class Logins:
    """Checks an HTTP `Authorization: Basic` header against the registry's reader and admin
    identities (user `ROLE-NAME`). Fails closed: no registry, no login."""

    def __init__(self, registry: Path) -> None:
        self.registry = Path(registry)
        self._seen: tuple[float, int] | None = None
        self._users: dict[str, dict[str, Any]] = {}
        # Headers already verified against the current registry: scrypt once per login, not per request.
        self._ok: set[bytes] = set()

    def _load(self) -> None:
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

    def check(self, header: str | None) -> bool:
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
        if record is None or not verify_password(password, record):
            return False
        self._ok.add(key)
        return True
