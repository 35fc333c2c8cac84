"""Reactors (DESIGN §6): workers that publish new facts, safe to run more than once.

Every effect is a guarded command: two sweepers racing over the same expired
lease produce one `run.lease_expired` (the other loses on the expected sequence);
a stale mark loses to a heartbeat that landed first. (Snapshot diffs are made by the
taker at take time since issue 11: no reactor diffs snapshots.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from fleetlog.services.backbone.config import FleetSettings
from fleetlog.services.backbone.tasks import stop_tasks
from fleetlog.services.client.fleet import Fleet

__all__ = ["Reactors"]

log = logging.getLogger("fleetlog.reactors")


class Reactors:
    """The claim-lease sweeper and the stale-runtime marker, on their own connection."""

    def __init__(self, settings: FleetSettings) -> None:
        self.settings = settings
        self._tasks: list[asyncio.Task[None]] = []
        self.fleet: Fleet | None = None
        self._stopping = asyncio.Event()
        self.swept = 0
        self.marked = 0

    async def start(self) -> None:
        self.fleet = await Fleet.connect(settings=self.settings, name="fleetlog-reactors", ensure=False)
        self._tasks = [
            asyncio.create_task(self._every("lease sweeper", self.sweep_leases)),
            asyncio.create_task(self._every("stale-runtime marker", self.mark_stale)),
        ]
        if self.settings.processor_sessions is not None:  # processors.run on the machine with the sessions
            runs = self.fleet.processors.serve_runs(self.settings.processor_sessions)
            self._tasks.append(asyncio.create_task(runs, name="processor runs"))

    async def sweep_leases(self) -> None:
        assert self.fleet is not None
        swept = 0
        try:
            while True:
                released = await self.fleet.runs.release_expired(limit=500)
                self.swept += len(released)
                swept += len(released)
                if len(released) < 500:
                    return
        finally:
            if swept:  # one line per sweep that released something, never one per idle tick
                log.info("lease sweep: released %d claimed runs whose lease had passed", swept)

    async def mark_stale(self) -> None:
        assert self.fleet is not None
        marked = len(await self.fleet.runtimes.mark_stale_runtimes())
        self.marked += marked
        if marked:
            log.info("stale marker: marked %d runtimes stale (no heartbeat in time)", marked)

    async def _every(self, name: str, fn: Callable[[], Awaitable[None]]) -> None:
        interval = self.settings.reactor_interval_s
        # The flag as well as the cancellation: Python 3.11's wait_for (inside nats-py) can
        # swallow a cancellation that lands as its inner future completes, and the loop
        # would then run on and hold `stop` forever.
        while not self._stopping.is_set():
            try:
                await fn()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a reactor never dies: it tries again next tick
                log.warning("%s: %s", name, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval)

    async def stop(self) -> None:
        self._stopping.set()
        await stop_tasks(self._tasks)  # cancels again if a cancellation is swallowed (backbone/tasks.py)
        if self.fleet is not None:
            await self.fleet.close()
