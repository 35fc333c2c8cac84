"""The runtime registry's client API: `fleet.runtimes.*`.

Registration is an acked publish; heartbeats are fire-and-forget facts that carry
the runtime's whole merged metadata (the stream keeps only the latest per runtime).
The stale marker (`mark_stale`, run by the reactor) publishes guarded by the sequence
of the runtime's latest message on any of its subjects (a wildcard guard), so a
heartbeat that lands first always wins and two markers never both mark it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
from fleetlog.schemas import (
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
)
from fleetlog.services.backbone.errors import FleetValidationError
from fleetlog.services.backbone.guarded import Guarded, WrongLastSequence
from fleetlog.services.client.seam import session_token
from fleetlog.services.writepath.publisher import Receipt, Token

if TYPE_CHECKING:
    from fleetlog.services.client.seam import FleetClient

__all__ = ["RuntimesAPI"]

STREAM = "FLEET_RUNTIMES"
_registration = msgspec.json.Decoder(RuntimeRegistered)
_heartbeat = msgspec.json.Decoder(RuntimeHeartbeat)
_Strs = list[str] | None
_Ids = list[str]  # inside RuntimesAPI the name `list` is the list() method


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
        version: str | None = None, capabilities: _Strs = None, labels: dict[str, str] | None = None,
        metadata: dict[str, Any] | None = None, heartbeat_deadline_s: float = 60,
    ) -> RuntimeView:
        """Upsert: status online; capabilities, labels and metadata are replaced."""
        if not isinstance(runtime_id, str) or not runtime_id:
            raise FleetValidationError("runtime_id", f"must be a non-empty string, got {runtime_id!r}")
        if isinstance(heartbeat_deadline_s, bool) or not isinstance(heartbeat_deadline_s, int | float) \
                or not math.isfinite(heartbeat_deadline_s) or heartbeat_deadline_s <= 0:
            raise FleetValidationError("heartbeat_deadline_s", f"must be a number > 0, got {heartbeat_deadline_s!r}")
        _check_shapes(capabilities, labels, metadata)
        event = RuntimeRegistered(
            id=new_event_id(), ts=now_iso(), runtime_id=runtime_id, display_name=display_name, endpoint=endpoint,
            version=version, capabilities=list(capabilities or []), labels=dict(labels or {}),
            metadata=dict(metadata or {}), heartbeat_deadline_s=float(heartbeat_deadline_s),
        )
        g = Guarded(await self._fleet.nats())
        _, seq, _ = await g.publish(event.subject(), encode_event(event), msg_id=event.id, expected_last_seq=None)
        self._seen = max(self._seen, seq)
        at = _epoch(event.ts)
        return RuntimeView(
            runtime_id=runtime_id, display_name=display_name, endpoint=endpoint, version=version,
            capabilities=event.capabilities, labels=event.labels, metadata=event.metadata, status="online",
            status_reason=None, heartbeat_deadline_s=event.heartbeat_deadline_s, registered_at=at,
            last_heartbeat_at=at, active_runs=None,
        )

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
        reg = _registration.decode(reg_msg.data)
        base = reg.metadata
        hb_msg = await g.last(STREAM, subjects.runtime(runtime_id, "heartbeat"))
        if hb_msg is not None and hb_msg.seq > reg_msg.seq:
            base = _heartbeat.decode(hb_msg.data).metadata
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
        return RuntimeView(
            runtime_id=runtime_id, display_name=reg.display_name, endpoint=reg.endpoint, version=reg.version,
            capabilities=reg.capabilities, labels=reg.labels, metadata=merged, status=status, status_reason=None,
            heartbeat_deadline_s=reg.heartbeat_deadline_s, registered_at=_epoch(reg.ts),
            last_heartbeat_at=_epoch(event.ts), active_runs=active_runs,
        )

    async def get(self, runtime_id: str, *, min_seq: Token | Receipt | None = None) -> RuntimeView | None:
        answer = await self._fleet.request(
            "fleetlog.runtimes.get", RuntimeGetQuery(runtime_id=runtime_id, min_seq=self._token(min_seq)),
            RuntimeList,
        )
        return answer.items[0] if answer.items else None

    async def list(
        self, statuses: _Strs = None, labels: dict[str, str] | None = None, limit: int = 100, *,
        min_seq: Token | Receipt | None = None,
    ) -> RuntimeList:
        """Runtimes by id; `labels` must all match; limit clamped to 1..500; `total` ignores the limit."""
        req = RuntimesListQuery(statuses=list(statuses) if statuses else None, labels=labels,
                                limit=max(1, min(500, int(limit))), min_seq=self._token(min_seq))
        return await self._fleet.request("fleetlog.runtimes.list", req, RuntimeList)

    async def mark_stale(self, reason: str = "heartbeat deadline passed") -> _Ids:
        """Mark runtimes whose heartbeat deadline passed as stale; returns the ids this call marked."""
        answer = await self._fleet.request(
            "fleetlog.runtimes.stale", StaleQuery(now=self.clock(), min_seq=self._token(None)), StaleRuntimes
        )
        g = Guarded(await self._fleet.nats())
        marked: _Ids = []
        for item in answer.items:
            event = RuntimeStatusChanged(id=new_event_id(), ts=now_iso(), runtime_id=item.runtime_id,
                                         status="stale", reason=reason)
            try:
                _, seq, _ = await g.publish(
                    event.subject(), encode_event(event), msg_id=event.id, expected_last_seq=item.last_seq,
                    expected_subject=subjects.runtime(item.runtime_id, "*"),
                )
            except WrongLastSequence:
                continue  # a heartbeat (or another marker) landed meanwhile
            self._seen = max(self._seen, seq)
            marked.append(item.runtime_id)
        return marked


def _check_shapes(capabilities: Any, labels: Any, metadata: Any) -> None:
    if capabilities is not None and (
        not isinstance(capabilities, list | tuple) or not all(isinstance(c, str) for c in capabilities)
    ):
        raise FleetValidationError("capabilities", "must be a list of strings")
    if labels is not None and (
        not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
    ):
        raise FleetValidationError("labels", "must be a dict of string to string")
    if metadata is not None and not isinstance(metadata, dict):
        raise FleetValidationError("metadata", f"must be a dict, got {type(metadata).__name__}")
