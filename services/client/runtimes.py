"""The runtime registry's client API: `fleet.runtimes.*`.

Registration is an acked publish; heartbeats are fire-and-forget facts that carry
the runtime's whole merged metadata (the stream keeps only the latest per runtime).
The stale marker (`mark_stale_runtimes`, run by the reactor) publishes guarded by the sequence
of the runtime's latest message on any of its subjects (a wildcard guard), so a
heartbeat that lands first always wins and two markers never both mark it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from fleetlog.schemas import (
    Event,
    RuntimeHeartbeat,
    RuntimeRegistered,
    RuntimeStatusChanged,
    encode_event,
    new_event_id,
    now_iso,
    parse_ts,
    subjects,
)
from fleetlog.schemas.runtimes import (
    RuntimeGetQuery,
    RuntimeList,
    RuntimesListQuery,
    RuntimeView,
    StaleQuery,
    StaleRuntimes,
    capabilities_of,
)
from fleetlog.services.backbone.errors import FleetValidationError
from fleetlog.services.backbone.guarded import Guarded, StoredMsg, WrongLastSequence
from fleetlog.services.client.seam import session_token
from fleetlog.services.writepath.publisher import Receipt, Token

if TYPE_CHECKING:
    from fleetlog.services.client.seam import FleetClient

__all__ = ["RuntimesAPI"]

STREAM = "FLEET_RUNTIMES"
_registration = msgspec.json.Decoder(RuntimeRegistered)
_heartbeat = msgspec.json.Decoder(RuntimeHeartbeat)
_Strs = list[str] | None
E = TypeVar("E", bound=Event)
_Views = list[RuntimeView]  # inside RuntimesAPI the name `list` is the list() method


def _epoch(ts: str) -> int:
    return int(parse_ts(ts).timestamp())


class RuntimesAPI:
    def __init__(self, fleet: FleetClient, clock: Callable[[], float] = time.time) -> None:
        self._fleet = fleet
        self.clock = clock
        self._seen = 0
        self.last_heartbeat: Receipt | None = None  # the receipt of the latest heartbeat (fire-and-forget)
        # runtime_id -> (registration seq, metadata after our last heartbeat's merge)
        self._merged: dict[str, tuple[int, dict[str, Any]]] = {}

    def _token(self, min_seq: Token | Receipt | None) -> dict[str, int] | None:
        return session_token(min_seq, STREAM, self._seen)

    async def register(
        self, runtime_id: str, display_name: str | None = None, endpoint: str | None = None,
        version: str | None = None, capabilities: dict[str, Any] | None = None, labels: dict[str, str] | None = None,
        metadata: dict[str, Any] | None = None, heartbeat_deadline_s: float = 60,
    ) -> RuntimeView:
        """Upsert: status online; capabilities (a JSON object), labels and metadata are replaced;
        `id` and `created_at` stay those of the first registration."""
        if not isinstance(runtime_id, str) or not runtime_id:
            raise FleetValidationError("runtime_id", f"must be a non-empty string, got {runtime_id!r}")
        if isinstance(heartbeat_deadline_s, bool) or not isinstance(heartbeat_deadline_s, int | float) \
                or not math.isfinite(heartbeat_deadline_s) or heartbeat_deadline_s <= 0:
            raise FleetValidationError("heartbeat_deadline_s", f"must be a number > 0, got {heartbeat_deadline_s!r}")
        _check_shapes(capabilities, labels, metadata)
        g = Guarded(await self._fleet.nats())
        prev_msg = await g.last(STREAM, subjects.runtime(runtime_id, "registration"))
        first_seq: int | None = None
        first_at: int | None = None
        prev = _foreign_or(prev_msg, _registration.decode)
        if prev is not None:  # a re-registration: the stream keeps only this one, so carry them
            assert prev_msg is not None
            first_seq = prev.first_seq if prev.first_seq is not None else prev_msg.seq
            first_at = prev.first_registered_at if prev.first_registered_at is not None else _epoch(prev.ts)
        elif prev_msg is not None:  # a foreign message there: the view still knows the first registration
            known = await self.get(runtime_id, min_seq={STREAM: prev_msg.seq})
            if known is not None:
                first_seq, first_at = known.id, known.created_at
        event = RuntimeRegistered(
            id=new_event_id(), ts=now_iso(), runtime_id=runtime_id, display_name=display_name, endpoint=endpoint,
            version=version, capabilities=dict(capabilities or {}), labels=dict(labels or {}),
            metadata=dict(metadata or {}), heartbeat_deadline_s=float(heartbeat_deadline_s),
            first_seq=first_seq, first_registered_at=first_at,
        )
        _, seq, _ = await g.publish(event.subject(), encode_event(event), msg_id=event.id, expected_last_seq=None)
        self._seen = max(self._seen, seq)
        at = _epoch(event.ts)
        return _view(event, seq, status="online", metadata=event.metadata, last_heartbeat_at=at, updated_at=at,
                     active_runs=None)

    async def heartbeat(
        self, runtime_id: str, status: str = "online", metadata: dict[str, Any] | None = None,
        active_runs: int | None = None,
    ) -> RuntimeView | None:
        """Merge metadata, refresh the heartbeat (fire-and-forget publish). None for an unknown runtime."""
        if not isinstance(status, str) or not status:
            raise FleetValidationError("status", f"must be a non-empty string, got {status!r}")
        if metadata is not None and not isinstance(metadata, dict):
            raise FleetValidationError("metadata", f"must be a dict, got {type(metadata).__name__}")
        g = Guarded(await self._fleet.nats())
        reg_msg = await g.last(STREAM, subjects.runtime(runtime_id, "registration"))
        if reg_msg is None:
            return None
        reg = _foreign_or(reg_msg, _registration.decode)
        if reg is None:  # a foreign message on the subject: the registration as the view folded it
            known = await self.get(runtime_id, min_seq={STREAM: reg_msg.seq})
            if known is None:
                return None
            reg = _registration_of(known)
        base = reg.metadata
        hb_msg = await g.last(STREAM, subjects.runtime(runtime_id, "heartbeat"))
        hb = _foreign_or(hb_msg, _heartbeat.decode)
        if hb is not None and hb_msg is not None and hb_msg.seq > reg_msg.seq:
            base = hb.metadata
        mine = self._merged.get(runtime_id)
        if mine is not None and mine[0] == reg_msg.seq:
            # Our own previous heartbeat may still be queued (fire-and-forget): merge onto it.
            base = mine[1]
        merged = {**base, **(metadata or {})}
        self._merged[runtime_id] = (reg_msg.seq, merged)
        event = RuntimeHeartbeat(id=new_event_id(), ts=now_iso(), runtime_id=runtime_id, status=status,
                                 metadata=merged, active_runs=active_runs)
        receipt = self._fleet.emit(event)
        self.last_heartbeat = receipt
        at = _epoch(event.ts)
        return _view(reg, reg_msg.seq, status=status, metadata=merged, last_heartbeat_at=at, updated_at=at,
                     active_runs=active_runs)

    async def get(self, runtime_id: str, *, min_seq: Token | Receipt | None = None) -> RuntimeView | None:
        answer = await self._fleet.request(
            "fleetlog.runtimes.get", RuntimeGetQuery(runtime_id=runtime_id, min_seq=self._token(min_seq)),
            RuntimeList,
        )
        return answer.items[0] if answer.items else None

    async def list(
        self, statuses: _Strs = None, labels: dict[str, str] | None = None, limit: int = 100, *,
        after: int | None = None, min_seq: Token | Receipt | None = None,
    ) -> RuntimeList:
        """Runtimes by id; `labels` must all match; limit clamped to 1..500; `total` ignores the limit.
        `has_more`: ask again with `after=answer.next_after` (the page may be cut to fit a reply)."""
        req = RuntimesListQuery(statuses=list(statuses) if statuses else None, labels=labels,
                                limit=max(1, min(500, int(limit))), after=after, min_seq=self._token(min_seq))
        return await self._fleet.request("fleetlog.runtimes.list", req, RuntimeList)

    async def mark_stale_runtimes(
        self, now: float | datetime | None = None, stale_status: str = "stale",
        stale_after_seconds: float | None = None,
    ) -> _Views:
        """Mark runtimes `stale_status` when their heartbeat deadline passed before `now` (default:
        the clock), or, given `stale_after_seconds` (negative counts as 0), when their last
        heartbeat is older than that. Rows already `stale_status` are skipped. Returns the rows
        this call changed; a heartbeat that lands first, or another marker, wins the runtime."""
        if not isinstance(stale_status, str) or not stale_status:
            raise FleetValidationError("stale_status", f"must be a non-empty string, got {stale_status!r}")
        after: float | None = None
        if stale_after_seconds is not None:
            if isinstance(stale_after_seconds, bool) or not isinstance(stale_after_seconds, int | float) \
                    or not math.isfinite(stale_after_seconds):
                raise FleetValidationError("stale_after_seconds", f"must be a number, got {stale_after_seconds!r}")
            after = max(float(stale_after_seconds), 0.0)
        at = self.clock() if now is None else now.timestamp() if isinstance(now, datetime) else float(now)
        req = StaleQuery(now=at, stale_status=stale_status, stale_after_seconds=after, min_seq=self._token(None))
        answer = await self._fleet.request("fleetlog.runtimes.stale", req, StaleRuntimes)
        g = Guarded(await self._fleet.nats())
        marked: _Views = []
        for item in answer.items:
            runtime = item.runtime
            event = RuntimeStatusChanged(id=new_event_id(), ts=now_iso(), runtime_id=runtime.runtime_id,
                                         status=stale_status, reason="heartbeat deadline passed")
            try:
                _, seq, _ = await g.publish(
                    event.subject(), encode_event(event), msg_id=event.id, expected_last_seq=item.last_seq,
                    expected_subject=subjects.runtime(runtime.runtime_id, "*"),
                )
            except WrongLastSequence:
                continue  # a heartbeat (or another marker) landed meanwhile
            self._seen = max(self._seen, seq)
            marked.append(msgspec.structs.replace(
                runtime, status=stale_status, status_reason=event.reason, updated_at=_epoch(event.ts)
            ))
        return marked


def _foreign_or(msg: StoredMsg | None, decode: Callable[[bytes], E]) -> E | None:
    """The event in a guarded read's last message; None for none, or for a foreign message: one
    that is not this subject's event (nats-server stores its replies on whatever subject a
    requester named; docs/security.md, "Replies as a deputy"). The fold refuses those too."""
    if msg is None:
        return None
    try:
        event = decode(msg.data)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None
    return event if event.subject() == msg.subject else None


def _registration_of(view: RuntimeView) -> RuntimeRegistered:
    """A registration standing for what the view folded (a foreign message replaced the last one)."""
    return RuntimeRegistered(
        id=new_event_id(), ts=now_iso(), runtime_id=view.runtime_id, display_name=view.display_name,
        endpoint=view.endpoint, version=view.version, capabilities=view.capabilities, labels=view.labels,
        metadata=view.metadata, heartbeat_deadline_s=view.heartbeat_deadline_s, first_seq=view.id,
        first_registered_at=view.created_at)


def _view(
    reg: RuntimeRegistered, reg_seq: int, *, status: str, metadata: dict[str, Any], last_heartbeat_at: int,
    updated_at: int, active_runs: int | None,
) -> RuntimeView:
    """The view a registration (stored at `reg_seq`) and the latest change give, as the fold gives it."""
    return RuntimeView(
        id=reg.first_seq if reg.first_seq is not None else reg_seq, runtime_id=reg.runtime_id, status=status,
        display_name=reg.display_name, endpoint=reg.endpoint, version=reg.version,
        capabilities=capabilities_of(reg.capabilities), labels=reg.labels, metadata=metadata,
        last_heartbeat_at=last_heartbeat_at,
        heartbeat_deadline_at=math.ceil(last_heartbeat_at + reg.heartbeat_deadline_s),
        created_at=reg.first_registered_at if reg.first_registered_at is not None else _epoch(reg.ts),
        updated_at=updated_at, status_reason=None, heartbeat_deadline_s=reg.heartbeat_deadline_s,
        active_runs=active_runs,
    )


def _check_shapes(capabilities: Any, labels: Any, metadata: Any) -> None:
    if capabilities is not None and not isinstance(capabilities, dict):
        raise FleetValidationError("capabilities", f"must be a dict (a JSON object), got {type(capabilities).__name__}")
    if labels is not None and (
        not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
    ):
        raise FleetValidationError("labels", "must be a dict of string to string")
    if metadata is not None and not isinstance(metadata, dict):
        raise FleetValidationError("metadata", f"must be a dict, got {type(metadata).__name__}")
