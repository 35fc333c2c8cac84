"""Runner runtimes: registration, heartbeat and status, latest per runtime kept."""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec

from . import subjects
from ._base import Event, Identity, Text

__all__ = ["RuntimeEvent", "RuntimeHeartbeat", "RuntimeRegistered", "RuntimeStatusChanged"]


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
    KIND: ClassVar[str] = "heartbeat"

    status: Text = "online"
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    active_runs: int | None = None


class RuntimeStatusChanged(RuntimeEvent, tag="runtime.status", kw_only=True, frozen=True):
    """Set by the stale-runtime marker (or an operator): e.g. "stale", "offline"."""

    KIND: ClassVar[str] = "status"

    status: Text
    reason: str | None = None
