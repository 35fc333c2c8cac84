"""A NATS connection that tolerates a broker that is not there yet.

nats-py reconnects on its own once connected, but a first connect to an absent
broker fails. `Link` keeps trying in the background instead, so an agent that
starts before its broker still runs (its events spool) and catches up later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import weakref
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import nats
from nats.aio.client import Client

from .nkeyauth import identity_of

__all__ = ["Link", "connect_once", "denials", "reachable", "request_or_refused", "within"]

log = logging.getLogger("fleetlog.connection")
_DENIED = re.compile(r'permissions violation for publish to "([^"]+)"', re.IGNORECASE)
# Per connection: subject -> publishes nats-server refused (permissions). Weak: dies with the connection.
_denied: weakref.WeakKeyDictionary[Client, dict[str, int]] = weakref.WeakKeyDictionary()


def denials(nc: Client, subject: str) -> int:
    """How many publishes to `subject` nats-server refused on `nc` so far (a Link's connection).

    A publish outside the user's permissions is answered with an async -ERR and dropped: a
    request then only times out. A caller compares the count before and after its request to
    say PermissionDenied instead of "did not answer".

    Compared case-insensitively: nats-py lowercases the -ERR text it hands the error
    callback, so the subject it names is `$js.api...` or `fleet.runtime.rt1...` whatever the
    request's case (NATS subjects are case-sensitive, but two subjects that differ only in
    case both refused is no less a refusal)."""
    return _denied.get(nc, {}).get(subject.lower(), 0)

# Per connection with an identity (only those can be refused): subject -> futures waiting for
# its refusal (`request_or_refused`), woken by the Link's error callback.
_waiting: weakref.WeakKeyDictionary[Client, dict[str, set[asyncio.Future[None]]]] = weakref.WeakKeyDictionary()


def _note_denial(nc: Client, subject: str) -> None:
    counts = _denied.setdefault(nc, {})
    counts[subject] = counts.get(subject, 0) + 1
    for fut in _waiting.get(nc, {}).get(subject, ()):
        if not fut.done():
            fut.set_result(None)


async def request_or_refused(nc: Client, subject: str, payload: bytes, timeout_s: float,
                             headers: dict[str, str] | None = None) -> Any:
    """`nc.request`, but on a connection with an identity a refusal of `subject` by nats-server
    ends it at once (PermissionError naming the subject) instead of after `timeout_s`: a
    refused request is never answered, and waiting it out (on a cluster, retrying it for the
    whole failover window) only hid the refusal. Other connections: a plain request."""
    waiting = _waiting.get(nc)
    if waiting is None:
        return await nc.request(subject, payload, timeout=timeout_s, headers=headers)
    refused: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    mine = waiting.setdefault(subject.lower(), set())
    mine.add(refused)
    ask = asyncio.ensure_future(nc.request(subject, payload, timeout=timeout_s, headers=headers))
    try:
        await asyncio.wait((ask, refused), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        ask.cancel()
        raise
    finally:
        mine.discard(refused)
    if ask.done():
        return ask.result()
    ask.cancel()
    raise PermissionError(f"nats-server refused this identity's publish to {subject!r}")


OnConnect = Callable[[Client], Awaitable[None]]


async def connect_once(
    servers: list[str], name: str, timeout_s: float = 2.0,
    error_cb: Callable[[Exception], Awaitable[None]] | None = None, **kwargs: object,
) -> Client:
    """One nats-py connection with fleetlog's reconnect policy (forever, 0.25 s apart; the
    first connect too: it returns once a server answers). A `Servers` list's identity signs
    in with its nkey and takes its own reply-inbox root."""
    identity = identity_of(servers)
    if identity is not None:
        kwargs = {**identity.nats_options(), **kwargs}

    async def _quiet(exc: Exception) -> None:
        log.debug("nats: %s", exc)

    return await nats.connect(
        servers=list(servers),
        name=name,
        connect_timeout=timeout_s,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.25,
        ping_interval=5,
        max_outstanding_pings=3,
        error_cb=error_cb or _quiet,
        **kwargs,
    )


async def within(aw: Awaitable[object], timeout_s: float) -> bool:
    """Await `aw` for at most timeout_s; True if it completed.

    Not `asyncio.wait_for`: on Python 3.11 it loses a cancellation that arrives in the same
    loop turn as its inner wait completes (bpo-42130). A `while True` loop around it then never
    ends, and `asyncio.run()` hangs at shutdown waiting for the task it cancelled (issue 9: a
    fire-and-forget `emit_event` just before the end of `main()` sets the publisher's wake event
    exactly then). `asyncio.timeout` keeps the cancellation.
    """
    try:
        async with asyncio.timeout(timeout_s):
            await aw
    except TimeoutError:
        return False
    return True


async def reachable(servers: list[str], timeout_s: float = 0.5) -> bool:
    """Whether any server accepts a TCP connection within timeout_s: lets a one-shot command
    (`fleetlog emit`) spool at once when the broker is away instead of waiting to connect."""
    for raw in servers:
        url = raw if "://" in raw else "nats://" + raw
        parts = urlsplit(url)
        try:
            async with asyncio.timeout(timeout_s):
                _reader, writer = await asyncio.open_connection(parts.hostname or "127.0.0.1", parts.port or 4222)
        except (OSError, TimeoutError):
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True
    return False


class Link:
    def __init__(self, servers: list[str], name: str) -> None:
        self.servers = servers
        self.name = name
        self.nc: Client | None = None
        self._on_connect: list[OnConnect] = []
        self._on_disconnect: list[Callable[[], None]] = []
        self._up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def on_connect(self, cb: OnConnect) -> None:
        """Run `cb` once, after the first successful connect (nats-py restores subscriptions after)."""
        self._on_connect.append(cb)

    def on_disconnect(self, cb: Callable[[], None]) -> None:
        self._on_disconnect.append(cb)

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    async def start(self, wait_s: float = 2.0) -> bool:
        """Try to connect within wait_s; keep trying in the background if that fails."""
        self._task = asyncio.create_task(self._connect_loop(), name=f"fleetlog-link-{self.name}")
        if not await within(self._up.wait(), wait_s):
            log.warning("NATS at %s not reachable yet; continuing offline and retrying", ",".join(self.servers))
        return self._up.is_set()

    async def wait_connected(self, timeout_s: float) -> bool:
        if self.connected:
            return True
        if not await within(self._up.wait(), timeout_s):
            return False
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not self.connected and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        return self.connected

    async def _connect_loop(self) -> None:
        delay = 0.1
        while not self._closed:
            # nats-py's first connect retries inside itself and can swallow a cancellation while
            # it does (closing or process end then waits on it): enter it only once a server
            # accepts TCP; an absent broker is waited for here, where cancelling works.
            if not await reachable(self.servers, 1.0):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            try:
                async with asyncio.timeout(5.0):  # not wait_for: see `within`
                    nc = await connect_once(
                        self.servers,
                        self.name,
                        error_cb=self._error,
                        disconnected_cb=self._disconnected,
                        reconnected_cb=self._reconnected,
                    )
            except Exception as exc:
                log.debug("connect to %s failed: %s", self.servers, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            self.nc = nc
            if identity_of(self.servers) is not None:  # only an identity's publishes can be refused
                _waiting.setdefault(nc, {})
            for cb in self._on_connect:
                # Each on its own: one failing (a broken spool) must not keep the others, or
                # the link, from coming up.
                try:
                    await cb(nc)
                except Exception:
                    log.exception("an on-connect step of %s failed; continuing", self.name)
            self._up.set()
            return

    async def _error(self, exc: Exception) -> None:
        match = _DENIED.search(str(exc))
        if match and self.nc is not None:
            _note_denial(self.nc, match.group(1).lower())  # nats-py lowercased it already; so do lookups
            log.warning("nats: %s", exc)
        else:
            log.debug("nats: %s", exc)

    async def _disconnected(self) -> None:
        if not self._closed:  # closing calls this too: not a loss
            log.warning("NATS connection lost (%s); reconnecting", self.name)
        for cb in self._on_disconnect:
            cb()

    async def _reconnected(self) -> None:
        log.info("NATS reconnected (%s)", self.name)

    async def close(self) -> None:
        self._closed = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            # nats-py's connect can swallow a cancellation while it cycles through servers;
            # never let closing a client hang on it.
            await asyncio.wait({self._task}, timeout=2.0)
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.drain()
            with contextlib.suppress(Exception):
                await self.nc.close()
