"""A NATS connection that tolerates a broker that is not there yet.

nats-py reconnects on its own once connected, but a first connect to an absent
broker fails. `Link` keeps trying in the background instead, so an agent that
starts before its broker still runs (its events spool) and catches up later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import nats
from nats.aio.client import Client

__all__ = ["Link", "connect_once"]

log = logging.getLogger("fleetlog.connection")

OnConnect = Callable[[Client], Awaitable[None]]


async def connect_once(
    servers: list[str], name: str, timeout_s: float = 2.0,
    error_cb: Callable[[Exception], Awaitable[None]] | None = None, **kwargs: object,
) -> Client:
    """One nats-py connection with fleetlog's reconnect policy (forever, 0.25 s apart; the
    first connect too: it returns once a server answers)."""

    async def _quiet(exc: Exception) -> None:
        log.debug("nats: %s", exc)

    return await nats.connect(
        servers=servers,
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
        try:
            await asyncio.wait_for(self._up.wait(), wait_s)
        except TimeoutError:
            log.warning("NATS at %s not reachable yet; continuing offline and retrying", ",".join(self.servers))
        return self._up.is_set()

    async def wait_connected(self, timeout_s: float) -> bool:
        if self.connected:
            return True
        try:
            await asyncio.wait_for(self._up.wait(), timeout_s)
        except TimeoutError:
            return False
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not self.connected and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        return self.connected

    async def _connect_loop(self) -> None:
        delay = 0.1
        while not self._closed:
            try:
                nc = await asyncio.wait_for(
                    connect_once(
                        self.servers,
                        self.name,
                        disconnected_cb=self._disconnected,
                        reconnected_cb=self._reconnected,
                    ),
                    timeout=5.0,
                )
            except Exception as exc:
                log.debug("connect to %s failed: %s", self.servers, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            self.nc = nc
            for cb in self._on_connect:
                await cb(nc)
            self._up.set()
            return

    async def _disconnected(self) -> None:
        for cb in self._on_disconnect:
            cb()

    async def _reconnected(self) -> None:
        log.info("reconnected to NATS")

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
