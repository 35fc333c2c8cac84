"""Live facts for open pages: new attempts, snapshots and diffs, as server-sent events.

The facts are what agents publish; a plain NATS subscription on their subjects sees each one
as JetStream stores it (reading, never publishing). The subscription exists only while a
page listens: with no page open the dashboard costs the broker and the fold nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from typing import Any

import msgspec
from fleetlog.schemas import AttemptRecorded, HostSnapshot, SnapshotDiff, decode_event
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

__all__ = ["KEY_FIGURES", "LiveFeed", "fact_of"]

log = logging.getLogger("fleetlog.dashboard")

SUBJECTS = ("fleet.attempt.*.*", "fleet.snapshot.*.*", "fleet.diff.*.*")  # not fleet.attempt.purge
QUEUE_MAX = 8192  # > one interval of a large fleet; a page that cannot keep up loses events, not our memory
# A page shows each agent's newest fact of each kind: facts arriving within one interval are
# coalesced to the newest per (kind, agent) before they go out. At thousands of attempts a
# second this bounds what the browser redraws (and what the node spends) by the fleet's size.
COALESCE_S = 0.25
KEEPALIVE_S = 15.0
# The snapshot fields a Fleet row shows (the container dashboards' agent cards).
KEY_FIGURES = ("load1", "mem_used_bytes", "mem_total_bytes", "context_percent", "claude_procs", "alive")

_json = msgspec.json.Encoder()


def fact_of(data: bytes) -> dict[str, Any] | None:
    """What a page needs of one published fact; None for anything else (or undecodable)."""
    try:
        event = decode_event(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if isinstance(event, AttemptRecorded):
        return {"kind": "attempt", "id": event.id, "ts": event.ts, "agent": event.agent, "action": event.action,
                "outcome": event.outcome, "elapsed_s": event.elapsed_s}
    if isinstance(event, HostSnapshot):
        figures = {k: event.data[k] for k in KEY_FIGURES if k in event.data}
        return {"kind": "snapshot", "ts": event.ts, "host": event.host, "agent": event.agent, "figures": figures,
                "diff_fields": list(event.diff_fields)}
    if isinstance(event, SnapshotDiff):
        return {"kind": "diff", "ts": event.ts, "host": event.host, "agent": event.agent,
                "diff_fields": list(event.diff_fields), "changes": event.changes}
    return None


class LiveFeed:
    """Fans the facts out to every listening page (one bounded queue each)."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self._queues: set[asyncio.Queue[bytes]] = set()
        self._subs: list[Subscription] = []
        self._lock = asyncio.Lock()
        self._pending: dict[tuple[str, str], bytes] = {}
        self._flusher: asyncio.Task[None] | None = None
        self.received = 0
        self.delivered = 0
        self.dropped = 0

    @property
    def listeners(self) -> int:
        return len(self._queues)

    async def _on_msg(self, msg: Msg) -> None:
        fact = fact_of(msg.data)
        if fact is None:
            return
        self.received += 1
        line = b"event: " + fact["kind"].encode() + b"\ndata: " + _json.encode(fact) + b"\n\n"
        key = (fact["kind"], fact["agent"])
        self._pending.pop(key, None)  # re-insert: the newest goes out last, after older facts
        self._pending[key] = line

    async def _flush_every(self) -> None:
        while True:
            await asyncio.sleep(COALESCE_S)
            lines, self._pending = list(self._pending.values()), {}
            for queue in self._queues:
                for line in lines:
                    try:
                        queue.put_nowait(line)
                        self.delivered += 1
                    except asyncio.QueueFull:
                        self.dropped += 1

    async def _listen(self, queue: asyncio.Queue[bytes]) -> None:
        async with self._lock:
            self._queues.add(queue)
            if not self._subs:
                self._subs = [await self.nc.subscribe(s, cb=self._on_msg) for s in SUBJECTS]
                self._flusher = asyncio.create_task(self._flush_every(), name="dashboard live")
                await self.nc.flush()  # subscribed before the page is told it is live

    async def _leave(self, queue: asyncio.Queue[bytes]) -> None:
        async with self._lock:
            self._queues.discard(queue)
            if not self._queues:
                if self._flusher is not None:
                    self._flusher.cancel()
                    self._flusher = None
                self._pending.clear()
                subs, self._subs = self._subs, []
                for sub in subs:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()

    async def events(self) -> AsyncGenerator[bytes, None]:
        """One page's event stream: `ready` once subscribed, then facts as they come."""
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=QUEUE_MAX)
        await self._listen(queue)
        try:
            yield b"retry: 2000\nevent: ready\ndata: {}\n\n"
            while True:
                try:
                    yield await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    yield b": keepalive\n\n"  # finds a closed connection; proxies keep it open
        finally:
            await self._leave(queue)
