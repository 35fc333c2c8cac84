"""Runner runtimes: registration, heartbeat and status, latest per runtime kept."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import msgspec

from . import subjects
from ._base import Event, Identity, Text
from .answers import Answer

__all__ = [
    "RuntimeEvent",
    "RuntimeGetQuery",
    "RuntimeHeartbeat",
    "RuntimeList",
    "RuntimeRegistered",
    "RuntimeStatusChanged",
    "RuntimeView",
    "RuntimesListQuery",
    "StaleQuery",
    "StaleRuntime",
    "StaleRuntimes",
]


class RuntimeEvent(Event, kw_only=True, frozen=True):
    STREAM: ClassVar[str] = "FLEET_RUNTIMES"
    KIND: ClassVar[str] = ""

    runtime_id: Identity

    def subject(self) -> str:
        return subjects.runtime(self.runtime_id, self.KIND)


class RuntimeRegistered(RuntimeEvent, tag="runtime.registered", kw_only=True, frozen=True):
    KIND: ClassVar[str] = "registration"

    display_name: str | None = None
    endpoint: str | None = None
    version: str | None = None
    capabilities: list[str] = msgspec.field(default_factory=list)
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    heartbeat_deadline_s: float = 60.0


class RuntimeHeartbeat(RuntimeEvent, tag="runtime.heartbeat", kw_only=True, frozen=True):
    """`metadata` is the runtime's whole metadata after the merge (state-carrying): the
    stream keeps only the latest heartbeat, so a rebuild must not need the earlier ones."""

    KIND: ClassVar[str] = "heartbeat"

    status: Text = "online"
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    active_runs: int | None = None


class RuntimeStatusChanged(RuntimeEvent, tag="runtime.status", kw_only=True, frozen=True):
    """Set by the stale-runtime marker (or an operator): e.g. "stale", "offline"."""

    KIND: ClassVar[str] = "status"

    status: Text
    reason: str | None = None


# -- what the runtime APIs answer ------------------------------------------------


class RuntimeView(msgspec.Struct, kw_only=True):
    runtime_id: str
    display_name: str | None
    endpoint: str | None
    version: str | None
    capabilities: list[str]
    labels: dict[str, str]
    metadata: dict[str, Any]
    status: str
    status_reason: str | None
    heartbeat_deadline_s: float
    registered_at: int
    last_heartbeat_at: int
    active_runs: int | None


class RuntimeGetQuery(msgspec.Struct, kw_only=True):
    runtime_id: str
    min_seq: dict[str, int] | None = None


class RuntimesListQuery(msgspec.Struct, kw_only=True):
    statuses: list[str] | None = None
    labels: dict[str, str] | None = None  # every given label must match
    limit: Annotated[int, msgspec.Meta(ge=1, le=500)] = 100
    min_seq: dict[str, int] | None = None


class RuntimeList(Answer, kw_only=True):
    items: list[RuntimeView]
    total: int


class StaleQuery(msgspec.Struct, kw_only=True):
    """Runtimes not yet marked stale whose heartbeat deadline passed before `now`."""

    now: float
    min_seq: dict[str, int] | None = None


class StaleRuntime(msgspec.Struct, kw_only=True):
    runtime_id: str
    last_heartbeat_at: int
    last_seq: int  # stream sequence of the runtime's latest message: the marker publishes guarded by it


class StaleRuntimes(Answer, kw_only=True):
    items: list[StaleRuntime]
