"""Who a process connects as: an nkey seed file, and what every connection does with it.

An identity of a secure broker (services/node/identities.py) is an nkey pair: the broker's
config lists only the public key (`U...`) with its permissions; the seed (`SU...`) lives in
one file, mode 0600, that `nats.connect(url, nkeys_seed=FILE)` takes as is. Authenticating
is signing the nonce of the server's INFO with the seed (ed25519), so no secret crosses the
wire or sits in the broker's dir.

Three kinds of connection authenticate: nats-py (`Link`, `connect_once`), the publisher's raw
wire (services/writepath/wire.py) and the projector's raw stream reader. They all take a
`Servers` list, which carries the identity next to the URLs, and this module is the one
place that turns it into CONNECT fields (`connect_auth`) and a reply-inbox root
(`inbox_root`): each identity receives replies only under its own `_INBOX.<public key>`,
which its permissions allow it to subscribe to, so no identity can read another's replies.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import SplitResult, unquote

import nacl.signing
import nkeys

__all__ = ["DEFAULT_INBOX", "Identity", "Servers", "connect_auth", "identity_of", "inbox_prefix", "inbox_root",
           "new_seed", "url_auth", "write_seed"]

DEFAULT_INBOX: Final = "_INBOX"


def inbox_prefix(public_key: str) -> str:
    """The reply-inbox root of an identity: a subject token of its own, so `<root>.>` is all
    its permissions let it subscribe to (nats-py's default inboxes are `_INBOX.<22 chars>`:
    a 56-character public key never meets one)."""
    return f"{DEFAULT_INBOX}.{public_key}"


@dataclass(frozen=True, slots=True)
class Identity:
    """An nkey seed file and what follows from it (the public key, the reply-inbox root)."""

    seed_file: Path
    public_key: str

    @property
    def inbox_prefix(self) -> str:
        return inbox_prefix(self.public_key)

    @classmethod
    def load(cls, path: Path) -> Identity:
        """The identity of a seed file; ValueError naming the file and what is wrong."""
        return cls(Path(path), _keypair(Path(path)).public_key.decode())

    def sign(self, nonce: str) -> str:
        """The server's nonce signed with the seed: base64url without padding, the encoding
        nats-server tries first (it also accepts nats-py's standard base64)."""
        kp = _keypair(self.seed_file)  # read at each connect: a rotated file takes effect
        try:
            return base64.urlsafe_b64encode(kp.sign(nonce.encode())).rstrip(b"=").decode()
        finally:
            kp.wipe()

    def nats_options(self) -> dict[str, Any]:
        """nats-py's `connect` keywords for this identity."""
        return {"nkeys_seed": str(self.seed_file), "inbox_prefix": self.inbox_prefix}


def _keypair(path: Path) -> nkeys.KeyPair:
    try:
        seed = bytearray(path.read_bytes().strip())
    except OSError as exc:
        raise ValueError(f"credentials: cannot read {path}: {exc.strerror}") from None
    if not seed.startswith(b"SU"):
        raise ValueError(f"credentials: {path} is not an nkey user seed file (it must hold one 'SU...' seed, "
                         "as `fleetlog identities add` writes)")
    try:
        # nkeys decodes without checking the seed's CRC-16: a damaged seed would make another
        # key, and the broker would only say "Authorization Violation". Check it here.
        raw = base64.b32decode(bytes(seed) + b"=" * (-len(seed) % 8))
        if len(raw) < 4 or nkeys.crc16_checksum(raw[:-2]) != raw[-2:]:
            raise ValueError("checksum")
        return nkeys.from_seed(seed)
    except (nkeys.NkeysError, ValueError, TypeError, IndexError, binascii.Error):
        raise ValueError(f"credentials: {path} holds a damaged nkey seed (bad encoding or checksum)") from None


def new_seed() -> tuple[bytes, str]:
    """A fresh user nkey: (seed, public key)."""
    seed = bytes(nkeys.encode_seed(bytes(nacl.signing.SigningKey.generate()), nkeys.PREFIX_BYTE_USER))
    kp = nkeys.from_seed(bytearray(seed))
    try:
        return seed, kp.public_key.decode()
    finally:
        kp.wipe()


def write_seed(seed: bytes, out: Path) -> Path:
    """The seed file (mode 0600, never overwritten: it would lose a live identity's key)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ValueError(f"out: {out} exists; a seed file is never overwritten (choose another path)") from None
    with os.fdopen(fd, "wb") as f:
        f.write(seed + b"\n")
    return out


class Servers(list[str]):
    """Server URLs and the identity every connection to them authenticates as (None: anonymous,
    or whatever `user:pass@` / `token@` the URLs carry)."""

    def __init__(self, urls: list[str], identity: Identity | None = None) -> None:
        super().__init__(urls)
        self.identity = identity


def identity_of(servers: object) -> Identity | None:
    return servers.identity if isinstance(servers, Servers) else None


def inbox_root(identity: Identity | None) -> str:
    """The subject root of a connection's reply inboxes."""
    return identity.inbox_prefix if identity is not None else DEFAULT_INBOX


def url_auth(parts: SplitResult) -> tuple[str | None, str | None, str | None]:
    """(user, password, token) of a URL's `user:pass@` or `token@`."""
    if parts.username is not None and parts.password is not None:
        return unquote(parts.username), unquote(parts.password), None
    if parts.username:
        return None, None, unquote(parts.username)
    return None, None, None


def connect_auth(info: dict[str, Any], identity: Identity | None, user: str | None = None,
                 password: str | None = None, token: str | None = None) -> dict[str, str]:
    """The authentication fields of a raw CONNECT, given the server's INFO."""
    if identity is not None:
        nonce = info.get("nonce")
        if not isinstance(nonce, str) or not nonce:
            raise ValueError("the server sent no nonce: it does not accept nkey credentials (is it a secure broker?)")
        return {"nkey": identity.public_key, "sig": identity.sign(nonce)}
    if user is not None:
        return {"user": user, "pass": password or ""}
    if token is not None:
        return {"auth_token": token}
    return {}
