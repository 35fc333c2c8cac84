"""Retention: view rows follow their stream's age limit (DESIGN §6, "retention").

JetStream drops an attempt once it is older than the stream's max age; a rebuild then
no longer sees it, so the live view must drop it too or the two disagree. The projector
runs `keep_to_streams` beside its folds: every `interval_s` it reads each stream's first
stored sequence and lets every folding generation of a projection that implements
`Projection.trim` delete what came before it, in one transaction on the fold thread.
Deleting by stream sequence (not by event time) is exactly what a rebuild would lack.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Protocol

from fleetlog.projections._base import Projection, trims
from fleetlog.services.projector.store import Generation
from nats.aio.client import Client

__all__ = ["keep_to_streams"]

log = logging.getLogger("fleetlog.retention")


class RunningView(Protocol):
    """One generation the projector runs."""

    @property
    def projection(self) -> Projection: ...
    @property
    def gen(self) -> Generation: ...
    @property
    def folds(self) -> bool: ...


class RetainedViews(Protocol):
    """What retention needs of the projector (services/projector/runtime.py)."""

    @property
    def nc(self) -> Client | None: ...
    def running(self) -> Sequence[RunningView]: ...
    async def trim(self, projection: Projection, schema: str, stream: str, first_seq: int) -> int: ...


async def keep_to_streams(projector: RetainedViews, interval_s: float) -> None:
    trimmed: dict[tuple[str, str], int] = {}  # (schema, stream) -> first seq already trimmed to
    while True:
        await asyncio.sleep(interval_s)
        nc = projector.nc
        if nc is None or not nc.is_connected:
            continue
        firsts: dict[str, int] = {}
        for running in projector.running():
            if not running.folds or not trims(running.projection):
                continue
            for stream in running.projection.streams:
                if stream not in firsts:
                    try:
                        firsts[stream] = (await nc.jetstream().stream_info(stream)).state.first_seq
                    except Exception as exc:  # the broker away: the next tick tries again
                        log.debug("retention: no stream info for %s: %s", stream, exc)
                        continue
                first = firsts[stream]
                key = (running.gen.schema, stream)
                if first <= trimmed.get(key, 1):
                    continue
                try:
                    deleted = await projector.trim(running.projection, running.gen.schema, stream, first)
                except Exception as exc:
                    log.warning("retention: trimming %s/%s to %d failed: %s", running.gen.schema, stream, first, exc)
                    continue
                trimmed[key] = first
                if deleted:
                    log.info("retention: %s dropped %d rows before %s seq %d (aged out of the stream)",
                             running.gen.schema, deleted, stream, first)
