"""The snapshot differ (DESIGN §6): one `snapshot.diff` per host snapshot, on `fleet.diff.<host>.<agent>`.

It follows FLEET_SNAPSHOTS through one durable pull consumer that every differ
shares (run as many as you like: each message goes to one of them, and survives
their restarts). Exactly one diff per snapshot is guaranteed by JetStream, not
by the consumer: the diff subject's last message says which snapshot was diffed
last (`to_seq`), the new diff is based on that snapshot and published with
`Nats-Expected-Last-Subject-Sequence` = that message's seq. A differ that loses
the race (or redelivers after a crash between publish and ack) re-reads, sees the
snapshot already covered, and only acks.

So the diffs of one (host, agent) form a chain: each diff's `from_seq` is the
previous diff's `to_seq`, and every snapshot gets its own diff whatever order the
snapshots reach the differs in: a differ handed snapshot S walks the subject from
the chain's end up to S (direct get `next_by_subj`), diffing each snapshot in turn.
So a crashed differ's unacked batch, or two differs holding snapshots of one
subject, cost at most some "covered" redeliveries, never a missing diff.

A diff whose base has aged out of the stream has `from_seq` null and everything in
`added`. A diff larger than `max_event_bytes` (the projector's limit) is published
`truncated`: its paths left out, counted in `paths`. The differ diffs exactly the
snapshots the projector folds (same size, decode, subject and ts rules). An error on
one snapshot hands the rest of its batch back (`nak` with a delay), so they come back
in order; after MAX_DELIVER failed deliveries a snapshot is given up and logged.
A rebuild of the views never runs the differ: diffs are facts in FLEET_DIFFS.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import msgspec
from fleetlog.schemas import encode_event, new_event_id, now_iso, parse_ts, subjects
from fleetlog.schemas.snapshots import HostSnapshot, SnapshotDiff, diff_data
from fleetlog.services.backbone.guarded import Guarded, WrongLastSequence
from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

__all__ = ["SnapshotDiffer"]

log = logging.getLogger("fleetlog.reactors")

SNAPSHOTS = "FLEET_SNAPSHOTS"
DIFFS = "FLEET_DIFFS"
DURABLE = "fleetlog-snapshot-differ"
MAX_RACES = 50
MAX_DELIVER = 5  # deliveries of one snapshot that failed with an error before it is given up
RETRY_DELAY_S = 1.0
RECENT_MAX = 10_000  # subjects whose last snapshot is kept in memory
ACK_WAIT_S = 30.0  # a crashed differ's unacked snapshots come back after this long
DEFAULT_MAX_EVENT_BYTES = 512 * 1024  # FleetSettings.max_event_bytes' default
_snapshot = msgspec.json.Decoder(HostSnapshot)
_diff = msgspec.json.Decoder(SnapshotDiff)


class SnapshotDiffer:
    def __init__(self, nc: Client, batch: int = 256, durable: str = DURABLE,
                 max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self.nc = nc
        self.batch = batch
        self.durable = durable
        self.max_event_bytes = max_event_bytes  # the projector's limit: a larger diff would be a reject
        self.guarded = Guarded(nc)
        self._sub: Any = None
        self.published = 0  # diffs this differ published
        self.truncated = 0  # ... of which too large to carry their paths
        self.covered = 0  # snapshots another differ (or an earlier delivery) had already diffed
        self.caught_up = 0  # diffs published for earlier snapshots on the way (included in published)
        # diff subject -> (seq, snapshot) of the last snapshot this differ diffed: the base of
        # the subject's next diff, so the common case needs no direct get for it
        self._recent: dict[str, tuple[int, HostSnapshot]] = {}
        self.skipped = 0  # messages the projector rejects too (not a valid snapshot): no diff
        self.retried = 0  # deliveries handed back after an error (redelivered in order after RETRY_DELAY_S)
        self.failed = 0  # snapshots given up after MAX_DELIVER failed deliveries

    async def start(self) -> None:
        js = self.nc.jetstream()
        config = ConsumerConfig(
            durable_name=self.durable, ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
            ack_wait=ACK_WAIT_S, max_ack_pending=4 * self.batch, filter_subject="fleet.snapshot.*.*",
        )
        await js.add_consumer(SNAPSHOTS, config)  # creates it, or brings an existing one to this config
        self._sub = await js.pull_subscribe_bind(self.durable, SNAPSHOTS)

    async def run_once(self, timeout: float = 1.0) -> int:
        """Fetch up to one batch, diff each snapshot in order, ack it. Returns the messages handled.

        An error on one message (broker away, a timeout) hands it and the rest of the batch
        back with one delay (`nak`), so they are redelivered in order and each snapshot still
        gets its own diff; after MAX_DELIVER deliveries a snapshot is given up (`term`, logged):
        the next snapshot's diff then covers it."""
        if self._sub is None:
            await self.start()
        try:
            msgs = await self._sub.fetch(self.batch, timeout=timeout)
        except (TimeoutError, NatsTimeout):
            return 0
        started = time.monotonic()
        for i, msg in enumerate(msgs):
            try:
                await self.handle(msg.metadata.sequence.stream, msg.subject, msg.data)
            except Exception as exc:
                await self._hand_back(msgs[i:], exc)
                return i
            await msg.ack()
            if time.monotonic() - started > ACK_WAIT_S / 3:  # a slow batch: keep the rest ours
                for rest in msgs[i + 1:]:
                    await rest.in_progress()
                started = time.monotonic()
        return len(msgs)

    async def _hand_back(self, msgs: list[Any], exc: Exception) -> None:
        first = msgs[0]
        if first.metadata.num_delivered >= MAX_DELIVER:
            self.failed += 1
            log.error("snapshot differ: gave up on %s seq %d after %d deliveries: %s", first.subject,
                      first.metadata.sequence.stream, first.metadata.num_delivered, exc)
            await first.term()
            msgs = msgs[1:]
        else:
            log.warning("snapshot differ: %s; retrying %d snapshots in %.0f s", exc, len(msgs), RETRY_DELAY_S)
        self.retried += len(msgs)
        for msg in msgs:
            with contextlib.suppress(Exception):  # unacked messages come back after ack_wait anyway
                await msg.nak(delay=RETRY_DELAY_S)

    async def run(self) -> None:
        while True:
            await self.run_once()

    def _valid(self, subject: str, data: bytes) -> HostSnapshot | None:
        """The snapshot, if the projector folds it (the same rules: size, decode, subject, ts)."""
        if len(data) > self.max_event_bytes:
            return None
        try:
            snap = _snapshot.decode(data)
            parse_ts(snap.ts)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, ValueError):
            return None
        return snap if snap.subject() == subject else None

    async def handle(self, seq: int, subject: str, data: bytes) -> SnapshotDiff | None:
        """Bring the subject's diff chain up to the snapshot at `seq`; returns its diff if this
        call published it, None if it was covered already or is not a snapshot.

        The chain is walked in stream order from the last diff's `to_seq`: every valid
        snapshot in between (delivered to another differ, or not yet redelivered after a
        crash) gets its own diff first, so the order messages arrive in never matters."""
        target = self._valid(subject, data)
        if target is None:
            self.skipped += 1
            return None
        diff_subject = subjects.diff(target.host, target.agent)
        races, progress = 0, 0  # lost races since the chain last moved on
        while True:
            last = await self.guarded.last(DIFFS, diff_subject)
            expected, base_seq, walk_from = 0, None, None
            if last is not None:
                expected = last.seq
                try:
                    previous = _diff.decode(last.data)
                except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
                    # A foreign message on the diff subject: a fresh chain starts at this
                    # snapshot (walking from seq 1 would diff all the stored history again).
                    previous, walk_from = None, seq - 1
                if previous is not None:
                    if previous.to_seq >= seq:
                        self.covered += 1
                        return None
                    base_seq = walk_from = previous.to_seq
                    if previous.to_seq > progress:  # another differ moved the chain on: fine
                        progress, races = previous.to_seq, 0
            step = await self._next_snapshot(subject, walk_from, seq)
            if step is None:  # nothing valid up to `seq` (cannot happen: `seq` itself is valid)
                return None
            step_seq, snap = step
            cached = self._recent.get(diff_subject)
            base = cached[1] if cached is not None and cached[0] == base_seq else await self._base(base_seq)
            event = self._diff(snap, step_seq, base_seq if base is not None else None, base)
            try:
                await self.guarded.publish(diff_subject, encode_event(event), msg_id=event.id,
                                           expected_last_seq=expected)
            except WrongLastSequence:
                races += 1  # the diff subject moved meanwhile: re-read
                if races > MAX_RACES:
                    raise RuntimeError(f"snapshot differ: lost {MAX_RACES} races on {diff_subject}") from None
                continue
            self.published += 1
            self.truncated += event.truncated
            if len(self._recent) >= RECENT_MAX:
                self._recent.clear()
            self._recent[diff_subject] = (step_seq, snap)  # the next diff's base, without a get
            if step_seq == seq:
                return event
            self.caught_up += 1

    async def _next_snapshot(self, subject: str, after: int | None, upto: int) -> tuple[int, HostSnapshot] | None:
        """The first valid snapshot on `subject` after seq `after` (None: from the start), up to `upto`."""
        seq = 1 if after is None else after + 1
        while seq <= upto:
            msg = await self.guarded.next(SNAPSHOTS, subject, seq)
            if msg is None or msg.seq > upto:
                return None
            snap = self._valid(subject, msg.data)
            if snap is not None:
                return msg.seq, snap
            seq = msg.seq + 1  # garbage on the subject: no diff for it
        return None

    def _diff(self, snap: HostSnapshot, seq: int, base_seq: int | None, base: HostSnapshot | None) -> SnapshotDiff:
        added, removed, changed = diff_data(base.data if base is not None else None, snap.data)
        event = SnapshotDiff(id=new_event_id(), ts=now_iso(), host=snap.host, agent=snap.agent, from_seq=base_seq,
                             to_seq=seq, snapshot_ts=snap.ts, added=added, removed=removed, changed=changed)
        if len(encode_event(event)) <= self.max_event_bytes:
            return event
        return SnapshotDiff(id=event.id, ts=event.ts, host=snap.host, agent=snap.agent, from_seq=base_seq,
                            to_seq=seq, snapshot_ts=snap.ts, truncated=True,
                            paths=len(added) + len(removed) + len(changed))

    async def _base(self, seq: int | None) -> HostSnapshot | None:
        if seq is None:
            return None
        msg = await self.guarded.get(SNAPSHOTS, seq)
        if msg is None:
            return None  # aged out of the stream
        try:
            return _snapshot.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
            return None

    async def stop(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception as exc:  # the connection may already be closing
                log.debug("snapshot differ: unsubscribe: %s", exc)
            self._sub = None
