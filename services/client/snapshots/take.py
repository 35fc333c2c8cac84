"""Taking a snapshot: the diff against its true predecessor, decided by JetStream; spooled when the broker is away.

With the broker there, the previous snapshot of (host, agent) is the subject's last
message (direct get) and the new one is published with
`Nats-Expected-Last-Subject-Sequence` = that message's seq: of any number of takers
(threads, processes, hosts) racing on one agent exactly one wins each position, the
others get WrongLastSequence, re-read and re-diff. So every snapshot is diffed against
the one stored right before it, and none is lost.

With the broker away (not connected, or a guarded step failing for transport reasons
within TAKE_TIMEOUT_S) the diff is computed against the last snapshot this process
knows for the agent, and the snapshot goes through the publisher (spooled to disk,
drained in order when the broker is back). While this process still has snapshots of
an agent queued there, later ones take the same road, so they cannot overtake them.

The diff record is published through the publisher too (acked, spooled if need be)
after its snapshot is stored, once per snapshot that has a diff.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec
from fleetlog.schemas import encode_event, new_event_id, now_iso, subjects
from fleetlog.schemas.snapshots import HostSnapshot, SnapshotDiff, compute_diff_fields, diff_changes
from fleetlog.services.backbone.errors import FleetUnavailable, FleetValidationError
from fleetlog.services.backbone.guarded import Guarded, WrongLastSequence
from fleetlog.services.client import activity
from fleetlog.services.writepath.receipt import Receipt

if TYPE_CHECKING:
    from fleetlog.services.client.seam import FleetClient

__all__ = ["Taken", "Taker"]

log = logging.getLogger("fleetlog.snapshots")

SNAPSHOTS = "FLEET_SNAPSHOTS"
TAKE_TIMEOUT_S = 2.0  # one guarded step; past it the broker counts as away for this take
MAX_RACES = 200  # lost races in a row before a take gives up (ten racers need at most nine)
KNOWN_MAX = 10_000  # (host, agent) pairs whose last snapshot this process remembers
_snapshot = msgspec.json.Decoder(HostSnapshot)


class Taken(NamedTuple):
    diff_fields: list[str]
    seq: int | None  # FLEET_SNAPSHOTS seq; None when it went to the publisher (spool)


class Taker:
    def __init__(self, fleet: FleetClient) -> None:
        self._fleet = fleet
        # subject -> (seq, data) of the newest snapshot this process knows; seq None: queued in the publisher
        self._known: dict[str, tuple[int | None, dict[str, Any]]] = {}
        self._queued: dict[str, list[Receipt]] = {}  # subject -> its snapshots still in the publisher
        self.seen = 0  # the highest FLEET_SNAPSHOTS seq this process stored (session consistency)

    def _still_queued(self, subject: str) -> bool:
        queue = [r for r in self._queued.get(subject, ()) if r.position is None]
        if queue:
            self._queued[subject] = queue
        else:
            self._queued.pop(subject, None)
        return bool(queue)

    def _remember(self, subject: str, seq: int | None, data: dict[str, Any]) -> None:
        known = self._known.get(subject)
        if seq is not None and known is not None and (known[0] is None or known[0] > seq):
            return  # a newer one (stored or queued) is already known
        if len(self._known) >= KNOWN_MAX and subject not in self._known:
            self._known.clear()
        self._known[subject] = (seq, data)

    async def take(self, host: str, agent: str, data: dict[str, Any], with_diff: bool) -> Taken:
        subject = subjects.snapshot(host, agent)
        encoded = msgspec.json.encode(data)  # once; the events carry these bytes
        raw: Any = msgspec.Raw(encoded)
        data = msgspec.json.decode(encoded)  # diffed as stored (tuples are lists), safe from later mutation
        ts = now_iso()
        event_id = new_event_id()
        if not self._still_queued(subject):
            try:
                return await self._guarded(subject, host, agent, data, raw, ts, with_diff)
            except (FleetUnavailable, OSError, TimeoutError) as exc:
                log.info("snapshot of %s/%s goes through the spool: %s", host, agent, exc)
            except Exception as exc:  # nats-py's connection errors while the broker goes away
                if type(exc).__module__.split(".")[0] != "nats":
                    raise
                log.info("snapshot of %s/%s goes through the spool: %r", host, agent, exc)
        known = self._known.get(subject)
        fields = compute_diff_fields(known[1] if known else None, data) if with_diff else []
        event = HostSnapshot(id=event_id, ts=ts, host=host, agent=agent, data=raw, has_diff=bool(fields),
                             diff_fields=fields)
        self._check_size(encode_event(event))
        self._queued.setdefault(subject, []).append(self._fleet.emit_validated(event))
        self._remember(subject, None, data)
        self._emit_diff(event, known[1] if known else None, data)
        return Taken(fields, None)

    async def _guarded(self, subject: str, host: str, agent: str, data: dict[str, Any], raw: Any, ts: str,
                       with_diff: bool) -> Taken:
        guarded = Guarded(await self._fleet.nats(timeout=0), timeout_s=TAKE_TIMEOUT_S)
        for _ in range(MAX_RACES):
            last = await guarded.last(SNAPSHOTS, subject)
            prev = _data(last.data) if last is not None else None
            fields = compute_diff_fields(prev, data) if with_diff else []
            # A fresh id per attempt: a refused publish must not leave its id in the dedup window.
            event = HostSnapshot(id=new_event_id(), ts=ts, host=host, agent=agent, data=raw,
                                 has_diff=bool(fields), diff_fields=fields)
            payload = encode_event(event)
            self._check_size(payload)
            try:
                _, seq, _ = await guarded.publish(subject, payload, msg_id=event.id,
                                                  expected_last_seq=last.seq if last is not None else 0)
            except WrongLastSequence:
                activity.count(activity.LOST_RACES, "snapshot")
                continue  # another taker stored first: diff against it
            self.seen = max(self.seen, seq)
            self._remember(subject, seq, data)
            self._emit_diff(event, prev, data)
            return Taken(fields, seq)
        raise FleetUnavailable(f"snapshot of {host}/{agent}: lost {MAX_RACES} races in a row on {subject}")

    def _check_size(self, payload: bytes) -> None:
        limit = self._fleet.settings.max_event_bytes
        if len(payload) > limit:
            raise FleetValidationError("data", f"encoded size {len(payload)} bytes exceeds max_event_bytes {limit}")

    def _emit_diff(self, snap: HostSnapshot, prev: dict[str, Any] | None, data: dict[str, Any]) -> None:
        if not snap.diff_fields:
            return  # never a record for a snapshot without a diff
        stamp = data.get("timestamp")
        record = SnapshotDiff(id=new_event_id(), ts=now_iso(), host=snap.host, agent=snap.agent,
                              timestamp=stamp if isinstance(stamp, str) else snap.ts,
                              diff_fields=list(snap.diff_fields), changes=diff_changes(prev, data),
                              snapshot_id=snap.id)
        if len(encode_event(record)) > self._fleet.settings.max_event_bytes:
            # The values would not fit one event: the fields still say what changed (the snapshots say to what).
            record = msgspec.structs.replace(record, changes={})
        self._fleet.emit_validated(record)
        activity.count(activity.DIFFS)


def _data(payload: bytes) -> dict[str, Any] | None:
    """The data of a stored snapshot; None when the message is not one (a foreign message: no base)."""
    try:
        return _snapshot.decode(payload).data
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        return None
