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
previous diff's `to_seq`. Every snapshot gets its own diff when one differ runs, or
when the snapshots of one subject reach the differs one at a time; if two differs
take two snapshots of the same subject at once, the later snapshot's diff may come
first and then covers both (the earlier one gets none: the chain never goes back).
A diff whose base has aged out of the stream has `from_seq` null and everything in
`added`. A rebuild of the views never runs the differ: diffs are facts in FLEET_DIFFS.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from fleetlog.schemas import encode_event, new_event_id, now_iso, subjects
from fleetlog.schemas.snapshots import HostSnapshot, SnapshotDiff, diff_data
from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from .guarded import BrokerRefused, Guarded, WrongLastSequence

__all__ = ["SnapshotDiffer"]

log = logging.getLogger("fleetlog.reactors")

SNAPSHOTS = "FLEET_SNAPSHOTS"
DIFFS = "FLEET_DIFFS"
DURABLE = "fleetlog-snapshot-differ"
MAX_RACES = 50
_snapshot = msgspec.json.Decoder(HostSnapshot)
_diff = msgspec.json.Decoder(SnapshotDiff)


class SnapshotDiffer:
    def __init__(self, nc: Client, batch: int = 256, durable: str = DURABLE) -> None:
        self.nc = nc
        self.batch = batch
        self.durable = durable
        self.guarded = Guarded(nc)
        self._sub: Any = None
        self.published = 0  # diffs this differ published
        self.covered = 0  # snapshots another differ (or an earlier delivery) had already diffed
        self.skipped = 0  # messages that are not a valid snapshot (the projector rejects them)
        self.failed = 0  # diffs JetStream refused (e.g. larger than max_payload)

    async def start(self) -> None:
        js = self.nc.jetstream()
        config = ConsumerConfig(
            durable_name=self.durable, ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
            ack_wait=30, max_ack_pending=4 * self.batch,
        )
        self._sub = await js.pull_subscribe("fleet.snapshot.*.*", durable=self.durable, stream=SNAPSHOTS,
                                            config=config)

    async def run_once(self, timeout: float = 1.0) -> int:
        """Fetch up to one batch, diff each snapshot in order, ack it. Returns the messages handled."""
        if self._sub is None:
            await self.start()
        try:
            msgs = await self._sub.fetch(self.batch, timeout=timeout)
        except (TimeoutError, NatsTimeout):
            return 0
        for msg in msgs:
            await self.handle(msg.metadata.sequence.stream, msg.subject, msg.data)
            await msg.ack()
        return len(msgs)

    async def run(self) -> None:
        while True:
            await self.run_once()

    async def handle(self, seq: int, subject: str, data: bytes) -> SnapshotDiff | None:
        """The diff for the snapshot at `seq`, published; None if it was covered or is not a snapshot."""
        try:
            snap = _snapshot.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
            self.skipped += 1
            return None
        if snap.subject() != subject:
            self.skipped += 1
            return None
        diff_subject = subjects.diff(snap.host, snap.agent)
        for _ in range(MAX_RACES):
            last = await self.guarded.last(DIFFS, diff_subject)
            expected, base_seq = 0, None
            if last is not None:
                expected = last.seq
                try:
                    previous = _diff.decode(last.data)
                except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
                    previous = None  # a foreign message on the diff subject: start a fresh chain
                if previous is not None:
                    if previous.to_seq >= seq:
                        self.covered += 1
                        return None
                    base_seq = previous.to_seq
            base = await self._base(base_seq)
            added, removed, changed = diff_data(base.data if base is not None else None, snap.data)
            event = SnapshotDiff(
                id=new_event_id(), ts=now_iso(), host=snap.host, agent=snap.agent,
                from_seq=base_seq if base is not None else None, to_seq=seq, snapshot_ts=snap.ts,
                added=added, removed=removed, changed=changed,
            )
            try:
                await self.guarded.publish(diff_subject, encode_event(event), msg_id=event.id,
                                           expected_last_seq=expected)
            except WrongLastSequence:
                continue  # another differ wrote this subject meanwhile: re-read
            except BrokerRefused as exc:
                self.failed += 1
                log.warning("snapshot differ: no diff for %s seq %d: %s", subject, seq, exc)
                return None
            self.published += 1
            return event
        raise RuntimeError(f"snapshot differ: lost {MAX_RACES} races in a row on {diff_subject}")

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
