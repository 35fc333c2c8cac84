"""Host snapshots as agent containers take them, and the diff records made at take time.

A snapshot (`snapshot.taken` on `fleet.snapshot.<host>.<agent>`) is one JSON object, the
agent container's field set (services/client/snapshots/gather.py) or whatever the caller
made. The taker diffs it against the previous snapshot of the same (host, agent) in
stream order (`compute_diff_fields`, the seed's rules, below) and stores the result with
it (`has_diff`, `diff_fields`); when something changed it also publishes one
`snapshot.diff` record `{agent, host, timestamp, diff_fields, changes}` on
`fleet.diff.<host>.<agent>`, `changes` mapping each field to `{from, to}`.

The diff rules are part of the contract, so every consumer reads the same thing:
both snapshots are flattened to dotted keys (`pids.tmux.server`); lists are whole values;
an empty nested dict contributes no key; values compare as Python compares them
(`1 == 1.0 == True`; a key missing on one side and None on the other is no change); only
the top-level `timestamp` is skipped; the changed keys come back sorted.

Version 2 (this one) replaced version 1's JSON Pointer diffs. A v1 `snapshot.taken` is
upcast when folded (its data kept, `has_diff` false, `diff_fields` []); a v1
`snapshot.diff` (added/removed/changed by pointer) is rejected with a reason naming v1.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Final

import msgspec

from . import subjects
from ._base import Event, Identity, Version
from .answers import Answer

__all__ = [
    "DiffList",
    "DiffRow",
    "DiffsQuery",
    "HostSnapshot",
    "SnapshotDiff",
    "SnapshotHistoryQuery",
    "SnapshotList",
    "SnapshotRow",
    "SnapshotsLatestQuery",
    "compute_diff_fields",
    "diff_changes",
    "flatten",
]

MAX_LIMIT: Final = 500
EVENT_VERSION: Final = 2
Limit = Annotated[int, msgspec.Meta(ge=1, le=MAX_LIMIT)]
Seq = Annotated[int, msgspec.Meta(ge=1)]
SKIPPED: Final = "timestamp"  # the one top-level key a diff never names (it changes every time)


class HostSnapshot(Event, tag="snapshot.taken", kw_only=True, frozen=True):
    STREAM: ClassVar[str] = "FLEET_SNAPSHOTS"

    host: Identity
    agent: Identity
    data: dict[str, Any] = msgspec.field(default_factory=dict)
    # Set by the taker against the previous snapshot of (host, agent) in stream order.
    has_diff: bool = False
    diff_fields: list[str] = msgspec.field(default_factory=list)
    v: Version = EVENT_VERSION

    def subject(self) -> str:
        return subjects.snapshot(self.host, self.agent)


class SnapshotDiff(Event, tag="snapshot.diff", kw_only=True, frozen=True):
    """The seed's diff record, published by the taker once per snapshot that has a diff."""

    STREAM: ClassVar[str] = "FLEET_DIFFS"

    host: Identity
    agent: Identity
    timestamp: str | None = None  # the snapshot's `timestamp` (else its event ts)
    diff_fields: list[str] = msgspec.field(default_factory=list)
    changes: dict[str, Any] = msgspec.field(default_factory=dict)  # field -> {"from": old, "to": new}
    snapshot_id: str | None = None  # the snapshot.taken event this diff belongs to
    v: Version = EVENT_VERSION

    def subject(self) -> str:
        return subjects.diff(self.host, self.agent)


def flatten(value: Mapping[str, Any], prefix: str = "", out: dict[str, Any] | None = None) -> dict[str, Any]:
    """Dotted keys to leaf values: dicts are walked (an empty one adds nothing), lists are whole values."""
    out = {} if out is None else out
    for key, item in value.items():
        path = f"{prefix}{key}"
        if isinstance(item, Mapping):
            flatten(item, path + ".", out)
        else:
            out[path] = item
    return out


def _changed(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if k != SKIPPED and before.get(k) != after.get(k))


def compute_diff_fields(prev: Mapping[str, Any] | None, latest: Mapping[str, Any]) -> list[str]:
    """The dotted keys that differ from `prev` to `latest`, sorted; [] when prev is None (module doc)."""
    if prev is None:
        return []
    return _changed(flatten(prev), flatten(latest))


def diff_changes(prev: Mapping[str, Any] | None, latest: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{field: {"from": old, "to": new}} for each of compute_diff_fields (a missing side is None)."""
    if prev is None:
        return {}
    before, after = flatten(prev), flatten(latest)
    return {k: {"from": before.get(k), "to": after.get(k)} for k in _changed(before, after)}


# ---- queries and answers (fleetlog.snapshots.*) ----


class SnapshotRow(msgspec.Struct, kw_only=True):
    host: str
    agent: str
    seq: int  # FLEET_SNAPSHOTS sequence
    id: str
    ts: str  # the event's ts, as published
    taken_at: int  # ts as epoch seconds (UTC)
    data: dict[str, Any]  # the snapshot as taken
    has_diff: bool
    diff_fields: list[str]

    def snapshot(self) -> dict[str, Any]:
        """The stored snapshot dict as `take` returned it: the data with has_diff and diff_fields."""
        return {**self.data, "has_diff": self.has_diff, "diff_fields": list(self.diff_fields)}


class SnapshotList(Answer, kw_only=True):
    items: list[SnapshotRow]
    next_cursor: int | None = None  # history: pass as before_seq for the next (older) page
    next_after: list[str] | None = None  # latest: [host, agent], pass as `after` for the next page


class SnapshotsLatestQuery(msgspec.Struct, kw_only=True):
    """The newest snapshot of every (host, agent), optionally of one host or one agent."""

    host: str | None = None
    agent: str | None = None
    after: list[str] | None = None  # [host, agent]: the page after this pair (the previous next_after)
    limit: Limit = 100
    min_seq: dict[str, int] | None = None


class SnapshotHistoryQuery(msgspec.Struct, kw_only=True):
    """One (host, agent)'s snapshots, newest first, paged by `before_seq` (exclusive)."""

    host: str
    agent: str
    limit: Limit = 10
    before_seq: Seq | None = None
    min_seq: dict[str, int] | None = None


class DiffsQuery(msgspec.Struct, kw_only=True):
    """Diff records, oldest first after `after_seq` (a FLEET_DIFFS seq)."""

    host: str | None = None
    agent: str | None = None
    after_seq: int = 0
    limit: Limit = 100
    min_seq: dict[str, int] | None = None


class DiffRow(msgspec.Struct, kw_only=True):
    host: str
    agent: str
    seq: int  # FLEET_DIFFS sequence
    timestamp: str | None
    diff_fields: list[str]
    changes: dict[str, Any]


class DiffList(Answer, kw_only=True):
    items: list[DiffRow]
    next_cursor: int | None = None  # pass as after_seq for the next page
