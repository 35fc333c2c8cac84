"""Runner runtimes: registration, heartbeat and status, latest per runtime kept."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import msgspec

from . import subjects
from ._base import Event, Identity, Text
from .answers import Answer

__all__ = [
    "RuntimeCounts",
    "RuntimeCountsQuery",
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
    "capabilities_of",
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
    # A JSON object, as the store this replaces kept it; a list of names only in events stored
    # before v2 (folded as {name: true}).
    capabilities: dict[str, Any] | list[str] = msgspec.field(default_factory=dict)
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    heartbeat_deadline_s: float = 60.0
    # Carried forward by a re-registration (state-carrying: the stream keeps only the latest):
    # the first registration's stream sequence (the runtime's `id`; None on the first, whose
    # own sequence it is) and time (`created_at`, epoch seconds).
    first_seq: int | None = None
    first_registered_at: int | None = None


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
    """A runtime with the keys of the store fleetlog replaces (epoch seconds); fleetlog adds
    `status_reason`, `heartbeat_deadline_s` and `active_runs` (the last heartbeat's) beside them."""

    id: int  # the stream sequence of its first registration
    runtime_id: str
    status: str
    display_name: str | None
    endpoint: str | None
    version: str | None
    capabilities: dict[str, Any]
    labels: dict[str, str]
    metadata: dict[str, Any]
    last_heartbeat_at: int
    heartbeat_deadline_at: int  # last heartbeat + heartbeat_deadline_s, rounded up
    created_at: int
    updated_at: int
    status_reason: str | None
    heartbeat_deadline_s: float
    active_runs: int | None


def capabilities_of(value: dict[str, Any] | list[str]) -> dict[str, Any]:
    """A pre-v2 list of names reads as {name: true}."""
    return dict(value) if isinstance(value, dict) else {name: True for name in value}


class RuntimeGetQuery(msgspec.Struct, kw_only=True):
    runtime_id: str
    min_seq: dict[str, int] | None = None


class RuntimesListQuery(msgspec.Struct, kw_only=True):
    statuses: list[str] | None = None
    labels: dict[str, str] | None = None  # every given label must match
    limit: Annotated[int, msgspec.Meta(ge=1, le=500)] = 100
    after: int | None = None  # only runtimes whose id is greater (the previous page's next_after)
    min_seq: dict[str, int] | None = None


class RuntimeList(Answer, kw_only=True):
    items: list[RuntimeView]
    total: int  # every match, ignoring limit and after
    # More after this page (the limit, or the connection's max_payload, cut it): ask again
    # with after=next_after.
    has_more: bool = False
    next_after: int | None = None


class StaleQuery(msgspec.Struct, kw_only=True):
    """Runtimes not already `stale_status` whose heartbeat deadline passed before `now`, or,
    with `stale_after_seconds`, whose last heartbeat is older than that."""

    now: float
    stale_status: Text = "stale"
    stale_after_seconds: Annotated[float, msgspec.Meta(ge=0)] | None = None
    min_seq: dict[str, int] | None = None


class StaleRuntime(msgspec.Struct, kw_only=True):
    runtime: RuntimeView
    last_seq: int  # stream sequence of the runtime's latest message: the marker publishes guarded by it


class StaleRuntimes(Answer, kw_only=True):
    items: list[StaleRuntime]


class RuntimeCountsQuery(msgspec.Struct, kw_only=True):
    now: float
    min_seq: dict[str, int] | None = None


class RuntimeCounts(Answer, kw_only=True):
    total_count: int
    online_count: int
    stale_count: int
    avg_heartbeat_age_seconds: float | None  # over ages >= 0, 2 places
    max_heartbeat_age_seconds: float | None
