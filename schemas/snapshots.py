"""Host self-snapshots and the diffs derived from consecutive snapshots."""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec

from . import subjects
from ._base import Event, Identity

__all__ = ["HostSnapshot", "SnapshotDiff"]


class HostSnapshot(Event, tag="snapshot.taken", kw_only=True, frozen=True):
    STREAM: ClassVar[str] = "FLEET_SNAPSHOTS"

    host: Identity
    agent: Identity
    data: dict[str, Any] = msgspec.field(default_factory=dict)

    def subject(self) -> str:
        return subjects.snapshot(self.host, self.agent)


class SnapshotDiff(Event, tag="snapshot.diff", kw_only=True, frozen=True):
    """Derived by the snapshot differ from two consecutive snapshots (stream seqs)."""

    STREAM: ClassVar[str] = "FLEET_DIFFS"

    host: Identity
    agent: Identity
    from_seq: int | None
    to_seq: int
    added: dict[str, Any] = msgspec.field(default_factory=dict)
    removed: list[str] = msgspec.field(default_factory=list)
    changed: dict[str, Any] = msgspec.field(default_factory=dict)

    def subject(self) -> str:
        return subjects.diff(self.host, self.agent)
