"""Live facts for open pages: new attempts, snapshots and diffs, as server-sent events.

The facts are what agents publish; a plain NATS subscription on their subjects sees each one
as JetStream stores it (reading, never publishing). The subscription exists only while a
page listens: with no page open the dashboard costs the broker and the fold nothing.

At thousands of facts a second the subscription must not fall behind: the NATS callback
only files each message under (kind, agent) — read from its subject, nothing decoded — and
every COALESCE_S the newest of each is decoded and fanned out. Should NATS still drop
messages (the client's pending limit: a slow consumer) or the connection drop and come
back, facts were missed: the feed then re-reads the newest per agent from the views (the
same query path as the pages), once they have folded up to the streams' ends as of then,
and sends those, so an open page converges. It has its own connection, so a burst of facts
never queues the pages' requests behind it, and so its errors (slow consumer) are its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import msgspec
from fleetlog.schemas import AttemptRecorded, Event, HostSnapshot, SnapshotDiff, decode_event
from fleetlog.services.backbone.config import FleetSettings
from fleetlog.services.backbone.link import connect_once
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import SlowConsumerError

__all__ = ["KEY_FIGURES", "LiveFeed", "checked", "fact_of", "sse"]

log = logging.getLogger("fleetlog.dashboard")

SUBJECTS = ("fleet.attempt.*.*", "fleet.snapshot.*.*", "fleet.diff.*.*")  # not fleet.attempt.purge
QUEUE_MAX = 8192  # > one interval of a large fleet; a page that cannot keep up loses events, not our memory
# A page shows each agent's newest fact of each kind: facts arriving within one interval are
# coalesced to the newest per (kind, agent) before they go out. At thousands of attempts a
# second this bounds what the browser redraws (and what the node spends) by the fleet's size.
COALESCE_S = 0.25
KEEPALIVE_S = 15.0
KEEPALIVE = b": keepalive\n\n"  # an SSE comment: the page ignores it
# The subscription's pending limits: filing a message costs next to nothing, so these only
# absorb bursts while the event loop is busy elsewhere (a page render, a scrape).
PENDING_MSGS = 200_000
PENDING_BYTES = 256 * 2**20
# The snapshot fields a Fleet row shows (the container dashboards' agent cards).
KEY_FIGURES = ("load1", "mem_used_bytes", "mem_total_bytes", "context_percent", "claude_procs", "alive")

# The newest facts per agent as the views hold them once folded to the streams' ends as of the
# call (given the feed's connection to look those up): fleet_page.newest_facts.
Resync = Callable[[Client], Awaitable[list[dict[str, Any]]]]

_json = msgspec.json.Encoder()


def fact_of(event: Event) -> dict[str, Any] | None:
    """What a page needs of one published fact; None for any other kind of event."""
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


def checked(subject: str, data: bytes) -> Event | None:
    """The fact published on `subject`, or None: undecodable, or a payload that disagrees with
    its subject. The broker lets an identity publish only on its own subjects, not its payload:
    agent mallory may publish on fleet.attempt.mallory.x a payload saying agent "alice". The
    fold refuses that ("subject mismatch", services/projector/fold.py); the live view, which
    reads the facts before the fold, must refuse it the same way or show it as alice's."""
    try:
        event = decode_event(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return event if event.subject() == subject else None


def sse(fact: dict[str, Any]) -> bytes:
    return b"event: " + str(fact["kind"]).encode() + b"\ndata: " + _json.encode(fact) + b"\n\n"


def _key(subject: str) -> tuple[str, str]:
    """(kind, agent token) of a fact's subject: fleet.attempt.<agent>.<action>,
    fleet.snapshot.<host>.<agent>, fleet.diff.<host>.<agent>."""
    parts = subject.split(".")
    kind = parts[1]
    return kind, parts[2] if kind == "attempt" else parts[2] + "." + parts[3]


class LiveFeed:
    """Fans the facts out to every listening page (one bounded queue each)."""

    def __init__(self, settings: FleetSettings, resync: Resync, pending_msgs: int = PENDING_MSGS) -> None:
        self.settings = settings
        self.resync = resync
        self.pending_msgs = pending_msgs
        self.keepalive_s = KEEPALIVE_S  # also how often an idle stream's login is checked again (http.py)
        self.nc: Client | None = None
        self._queues: set[asyncio.Queue[bytes]] = set()
        self._subs: list[Subscription] = []
        self._lock = asyncio.Lock()
        self._pending: dict[tuple[str, str], tuple[str, bytes]] = {}  # key -> (subject, payload)
        self._flusher: asyncio.Task[None] | None = None
        self._missed = False  # facts were lost (slow consumer, reconnect): re-read before the next flush
        self.received = 0  # facts filed
        self.delivered = 0  # updates queued to pages
        self.dropped = 0  # updates a page's full queue refused
        self.dropped_nats = 0  # messages the NATS client dropped (slow consumer)
        self.refused = 0  # undecodable, or a payload that disagrees with its subject (a forgery)
        self.resyncs = 0

    @property
    def listeners(self) -> int:
        return len(self._queues)

    def figures(self) -> dict[str, int]:
        """For /metrics (metrics.LIVE)."""
        return {"received": self.received, "sent": self.delivered, "dropped_page": self.dropped,
                "dropped_nats": self.dropped_nats, "resyncs": self.resyncs, "refused": self.refused}

    async def _on_msg(self, msg: Msg) -> None:
        try:
            key = _key(msg.subject)
        except IndexError:
            return
        self.received += 1
        self._pending.pop(key, None)  # re-insert: the newest goes out last, after older facts
        self._pending[key] = (msg.subject, msg.data)

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, SlowConsumerError):
            if not self._missed:
                log.warning("dashboard live view: NATS dropped facts (slow consumer); re-reading the views")
            self.dropped_nats += 1
            self._missed = True
        else:
            log.debug("dashboard live view: nats: %s", exc)

    async def _on_disconnect(self) -> None:
        if self.nc is not None and not self.nc.is_closed:  # closing calls this too: not a loss
            log.warning("dashboard live view: NATS connection lost (a server-side slow consumer, or the "
                        "broker went away); reconnecting")

    async def _on_reconnect(self) -> None:
        self._missed = True  # facts published while disconnected never came
        log.info("dashboard live view reconnected to NATS; re-reading the views")

    async def _flush_every(self) -> None:
        while True:
            await asyncio.sleep(COALESCE_S)
            self._fan_out(self._take())
            if self._missed and self.nc is not None:
                self._missed = False
                self.resyncs += 1
                try:
                    newest = await self.resync(self.nc)
                except Exception as exc:  # the views did not answer: try again next round
                    log.warning("dashboard live view: re-reading the views failed: %s", exc)
                    self._missed = True
                    continue
                # Facts filed during the re-read are newer than it: they go out after it.
                self._fan_out([sse(f) for f in newest])

    def _take(self) -> list[bytes]:
        """The coalesced facts as page updates. Checked here, not when filed: decoding in the
        NATS callback is what falls behind at thousands of facts a second. A forgery is filed
        under its subject's (own) key, so it can only displace its publisher's own newest fact
        of that interval, never another agent's."""
        raw, self._pending = list(self._pending.values()), {}
        lines: list[bytes] = []
        for subject, data in raw:
            event = checked(subject, data)
            if event is None:
                self.refused += 1
                continue
            fact = fact_of(event)
            if fact is not None:
                lines.append(sse(fact))
        return lines

    def _fan_out(self, lines: list[bytes]) -> None:
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
            if self._subs:
                return
            if self.nc is None:
                self.nc = await connect_once(self.settings.servers(), "fleetlog-dashboard-live",
                                             error_cb=self._on_error, disconnected_cb=self._on_disconnect,
                                             reconnected_cb=self._on_reconnect)
            self._subs = [await self.nc.subscribe(s, cb=self._on_msg, pending_msgs_limit=self.pending_msgs,
                                                  pending_bytes_limit=PENDING_BYTES) for s in SUBJECTS]
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

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()

    async def events(self) -> AsyncGenerator[bytes, None]:
        """One page's event stream: `ready` once subscribed, then facts as they come."""
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=QUEUE_MAX)
        await self._listen(queue)
        try:
            yield b"retry: 2000\nevent: ready\ndata: {}\n\n"
            while True:
                try:
                    yield await asyncio.wait_for(queue.get(), self.keepalive_s)
                except TimeoutError:
                    yield KEEPALIVE  # finds a closed connection; proxies keep it open
        finally:
            await self._leave(queue)
