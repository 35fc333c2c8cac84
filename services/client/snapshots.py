"""Host self-snapshots' client API: `fleet.snapshots.take/latest/history/get/diff/diffs/watch`.

`take` is a fire-and-forget fact (the agent is never slowed): the snapshot is
validated at the call and enqueued; its receipt is the consistency token. The
diffs between consecutive snapshots are made by the snapshot differ reactor
(`services/reactors/snapshot_differ.py`) and published on `fleet.diff.<host>.<agent>`;
`watch` follows them live, `diffs` pages through them, and `diff` compares any two
stored snapshots on demand.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any, cast

import msgspec
from fleetlog.schemas import encode_event, new_event_id, now_iso, parse_ts, subjects
from fleetlog.schemas.snapshots import (
    DiffList,
    DiffsQuery,
    HostSnapshot,
    SnapshotDiff,
    SnapshotDiffAnswer,
    SnapshotDiffQuery,
    SnapshotGetQuery,
    SnapshotHistoryQuery,
    SnapshotList,
    SnapshotRow,
    SnapshotsLatestQuery,
)
from fleetlog.services.backbone.errors import FleetValidationError, check_identity
from fleetlog.services.writepath.publisher import Receipt, Token
from nats.js.api import ConsumerConfig, DeliverPolicy

if TYPE_CHECKING:
    from fleetlog.services.client.seam import FleetClient

__all__ = ["SnapshotsAPI"]

SNAPSHOTS = "FLEET_SNAPSHOTS"
DIFFS = "FLEET_DIFFS"
_diff = msgspec.json.Decoder(SnapshotDiff)
_encode = msgspec.json.Encoder().encode
MinSeq = Token | Receipt | None


def _token(min_seq: MinSeq) -> dict[str, int] | None:
    if isinstance(min_seq, Receipt):
        return min_seq.token
    return dict(min_seq) if min_seq else None


def _limit(value: int, high: int = 500) -> int:
    return max(1, min(high, int(value)))


class SnapshotsAPI:
    def __init__(self, fleet: FleetClient) -> None:
        self._fleet = fleet
        self.hostname = socket.gethostname() or "localhost"

    def take(self, agent: str, data: Mapping[str, Any], host: str | None = None, ts: str | None = None) -> Receipt:
        """Publish one snapshot of `host` (default: this machine's hostname) as seen by `agent`.

        `data` must be a JSON object (a dict with string keys, JSON-encodable values);
        it is encoded at the call, so changing it afterwards changes nothing. Never
        blocks; raises FleetValidationError (naming the field) for bad input only. `ts`
        (default now) is an ISO-8601 time, stored as given; no offset means UTC."""
        agent = check_identity("agent", agent)
        if ts is not None:
            try:
                parse_ts(ts)
            except (TypeError, ValueError) as exc:
                raise FleetValidationError("ts", f"must be an ISO-8601 time: {exc}") from None
            if not 10 <= len(ts) <= 64:  # the contract's IsoTs (fromisoformat also takes "20240101")
                raise FleetValidationError("ts", f"must be 10 to 64 characters, got {len(ts)}")
        host = check_identity("host", self.hostname if host is None else host)
        if not isinstance(data, Mapping):
            raise FleetValidationError("data", f"must be a JSON object (a dict), got {type(data).__name__}")
        bad = next((k for k in data if not isinstance(k, str)), None)
        if bad is not None:
            raise FleetValidationError("data", f"keys must be strings, got {bad!r}")
        try:  # encoded once, at the call: the caller may mutate `data` afterwards
            raw = msgspec.Raw(_encode(data if type(data) is dict else dict(data)))
        except (TypeError, msgspec.EncodeError, ValueError, OverflowError) as exc:
            raise FleetValidationError("data", f"must be JSON-encodable: {exc}") from None
        event = HostSnapshot(id=new_event_id(), ts=now_iso() if ts is None else ts, host=host, agent=agent,
                             data=cast(dict[str, Any], raw))
        size = len(encode_event(event))  # a copy of `raw`, not a parse
        limit = self._fleet.settings.max_event_bytes
        if size > limit:
            raise FleetValidationError("data", f"encoded size {size} bytes exceeds max_event_bytes {limit}")
        # Every wire rule is checked above (identities, ts, a JSON object, the size): the sender
        # encodes the event with `data` as the bytes encoded here, no second pass over them.
        return self._fleet.emit_validated(event)

    async def latest(self, host: str | None = None, agent: str | None = None, limit: int = 100,
                     after: list[str] | tuple[str, str] | None = None, *, min_seq: MinSeq = None) -> SnapshotList:
        """The newest snapshot of every (host, agent), ordered by host then agent; `next_after`
        pages on (as `after`)."""
        req = SnapshotsLatestQuery(host=host, agent=agent, after=list(after) if after else None,
                                   limit=_limit(limit), min_seq=_token(min_seq))
        return await self._fleet.request("fleetlog.snapshots.latest", req, SnapshotList)

    async def history(self, host: str, agent: str, limit: int = 10, before_seq: int | None = None, *,
                      min_seq: MinSeq = None) -> SnapshotList:
        """Snapshots of (host, agent), newest first; `next_cursor` pages on (as `before_seq`)."""
        req = SnapshotHistoryQuery(host=host, agent=agent, limit=_limit(limit), before_seq=before_seq,
                                   min_seq=_token(min_seq))
        return await self._fleet.request("fleetlog.snapshots.history", req, SnapshotList)

    async def get(self, host: str, agent: str, seq: int | None = None, *,
                  min_seq: MinSeq = None) -> SnapshotRow | None:
        """The snapshot at `seq`, else the newest of (host, agent); None when there is none."""
        req = SnapshotGetQuery(host=host, agent=agent, seq=seq, min_seq=_token(min_seq))
        answer = await self._fleet.request("fleetlog.snapshots.get", req, SnapshotList)
        return answer.items[0] if answer.items else None

    async def diff(self, host: str, agent: str, from_seq: int | None = None, to_seq: int | None = None, *,
                   min_seq: MinSeq = None) -> SnapshotDiffAnswer:
        """What changed between two stored snapshots (default: the newest and the one before)."""
        req = SnapshotDiffQuery(host=host, agent=agent, from_seq=from_seq, to_seq=to_seq, min_seq=_token(min_seq))
        return await self._fleet.request("fleetlog.snapshots.diff", req, SnapshotDiffAnswer)

    async def diffs(self, host: str | None = None, agent: str | None = None, after_seq: int = 0, limit: int = 100,
                    changes_only: bool = False, *, min_seq: MinSeq = None) -> DiffList:
        """The differ's diffs, oldest first after `after_seq` (a FLEET_DIFFS seq)."""
        req = DiffsQuery(host=host, agent=agent, after_seq=max(0, int(after_seq)), limit=_limit(limit),
                         changes_only=changes_only, min_seq=_token(min_seq))
        return await self._fleet.request("fleetlog.snapshots.diffs", req, DiffList)

    async def watch(self, host: str | None = None, agent: str | None = None, *, after_seq: int | None = None,
                    changes_only: bool = True) -> AsyncIterator[tuple[int, SnapshotDiff]]:
        """Diffs as the differ publishes them: (FLEET_DIFFS seq, diff), in stream order.

        From the first iteration on by default (the subscription starts when the loop does);
        from `after_seq` + 1 to replay history first (`after_seq=0`: everything kept). An ordered
        consumer straight on FLEET_DIFFS (no query service involved): it survives
        reconnects and never skips. Messages that do not decode are skipped (the
        projector records them as rejects)."""
        subject = subjects.diff(host, agent) if host is not None and agent is not None else (
            f"fleet.diff.{'*' if host is None else subjects.escape_token(host)}"
            f".{'*' if agent is None else subjects.escape_token(agent)}"
        )
        js = (await self._fleet.nats()).jetstream()
        if after_seq is None:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.NEW)
        else:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                    opt_start_seq=max(0, int(after_seq)) + 1)
        sub = await js.subscribe(subject, stream=DIFFS, ordered_consumer=True, config=config)
        try:
            async for msg in sub.messages:
                try:
                    diff = _diff.decode(msg.data)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue
                if changes_only and diff.empty:
                    continue
                assert msg.metadata is not None
                yield msg.metadata.sequence.stream, diff
        finally:
            await sub.unsubscribe()
