"""Host self-snapshots and the diffs derived from consecutive snapshots.

A host (or an agent on it) publishes what it knows about itself as one JSON object
(`snapshot.taken` on `fleet.snapshot.<host>.<agent>`). The snapshot differ reactor
turns each snapshot into a `snapshot.diff` against the one before it on the same
subject, on `fleet.diff.<host>.<agent>`, which clients subscribe to.

How a diff is computed is part of the contract (`diff_data`), so a consumer in any
language reads the same thing: objects are walked key by key and every leaf gets a
JSON Pointer path (RFC 6901: `/disk/free`, `~1` for `/` and `~0` for `~` in a key);
lists, scalars and empty objects are leaves. `added` maps new paths to their values,
`removed` lists the paths gone (sorted), `changed` maps each path whose value differs
to `{"from": old, "to": new}`. Values are compared as JSON (`1` differs from `1.0`
and from `true`). A diff with no base (`from_seq` null: the first snapshot, or its
base aged out of the stream) has everything in `added`.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Final

import msgspec

from . import subjects
from ._base import Event, Identity
from .answers import Answer

__all__ = [
    "DiffList",
    "DiffRow",
    "DiffsQuery",
    "HostSnapshot",
    "SnapshotDiff",
    "SnapshotDiffAnswer",
    "SnapshotDiffQuery",
    "SnapshotGetQuery",
    "SnapshotHistoryQuery",
    "SnapshotList",
    "SnapshotRow",
    "SnapshotsLatestQuery",
    "diff_data",
    "pointer",
]

MAX_LIMIT: Final = 500
Limit = Annotated[int, msgspec.Meta(ge=1, le=MAX_LIMIT)]
Seq = Annotated[int, msgspec.Meta(ge=1)]


class HostSnapshot(Event, tag="snapshot.taken", kw_only=True, frozen=True):
    STREAM: ClassVar[str] = "FLEET_SNAPSHOTS"

    host: Identity
    agent: Identity
    data: dict[str, Any] = msgspec.field(default_factory=dict)

    def subject(self) -> str:
        return subjects.snapshot(self.host, self.agent)


class SnapshotDiff(Event, tag="snapshot.diff", kw_only=True, frozen=True):
    """Derived by the snapshot differ from two consecutive snapshots (FLEET_SNAPSHOTS seqs)."""

    STREAM: ClassVar[str] = "FLEET_DIFFS"

    host: Identity
    agent: Identity
    from_seq: int | None  # the base snapshot; None: no base (everything is `added`)
    to_seq: int
    snapshot_ts: str | None = None  # the `ts` of the snapshot at to_seq
    added: dict[str, Any] = msgspec.field(default_factory=dict)
    removed: list[str] = msgspec.field(default_factory=list)
    changed: dict[str, Any] = msgspec.field(default_factory=dict)  # path -> {"from": old, "to": new}
    # The diff was too large to publish (it can be larger than both snapshots: paths repeat
    # their parents, `changed` holds both values): added/removed/changed are left empty and
    # `paths` counts what they held; compare the snapshots themselves (`diff` on demand).
    truncated: bool = False
    paths: int | None = None

    def subject(self) -> str:
        return subjects.diff(self.host, self.agent)

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.truncated)


def pointer(parent: str, key: str) -> str:
    """`parent` + one RFC 6901 reference token."""
    return f"{parent}/{key.replace('~', '~0').replace('/', '~1')}"


def _leaves(value: dict[str, Any], prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    for key, item in value.items():
        path = pointer(prefix, key)
        if isinstance(item, dict) and item:
            _leaves(item, path, out)
        else:
            out[path] = item
    return out


_canonical = msgspec.json.Encoder(order="sorted").encode


def diff_data(old: dict[str, Any] | None, new: dict[str, Any]) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    """(added, removed, changed) from `old` to `new` (see the module doc)."""
    before = _leaves(old, "", {}) if old is not None else {}
    after = _leaves(new, "", {})
    added = {p: v for p, v in after.items() if p not in before}
    removed = sorted(p for p in before if p not in after)
    changed = {
        p: {"from": before[p], "to": v}
        for p, v in after.items()
        if p in before and _canonical(before[p]) != _canonical(v)
    }
    return added, removed, changed


# ---- queries and answers (fleetlog.snapshots.*) ----


class SnapshotRow(msgspec.Struct, kw_only=True):
    host: str
    agent: str
    seq: int  # FLEET_SNAPSHOTS sequence
    id: str
    ts: str  # as published
    taken_at: int  # ts as epoch seconds (UTC)
    data: dict[str, Any]


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


class SnapshotGetQuery(msgspec.Struct, kw_only=True):
    """One snapshot: by seq, else the newest of (host, agent)."""

    host: str
    agent: str
    seq: Seq | None = None
    min_seq: dict[str, int] | None = None


class SnapshotDiffQuery(msgspec.Struct, kw_only=True):
    """A diff computed on demand between two stored snapshots of one (host, agent).

    `to_seq` defaults to the newest; `from_seq` to the snapshot just before `to_seq`."""

    host: str
    agent: str
    from_seq: Seq | None = None
    to_seq: Seq | None = None
    min_seq: dict[str, int] | None = None


class SnapshotDiffAnswer(Answer, kw_only=True):
    host: str
    agent: str
    found: bool  # False: no such snapshot (to_seq, or from_seq when given)
    from_seq: int | None = None
    to_seq: int | None = None
    added: dict[str, Any] = msgspec.field(default_factory=dict)
    removed: list[str] = msgspec.field(default_factory=list)
    changed: dict[str, Any] = msgspec.field(default_factory=dict)


class DiffsQuery(msgspec.Struct, kw_only=True):
    """Diffs the differ published, oldest first after `after_seq` (a FLEET_DIFFS seq)."""

    host: str | None = None
    agent: str | None = None
    after_seq: int = 0
    limit: Limit = 100
    changes_only: bool = False
    min_seq: dict[str, int] | None = None


class DiffRow(msgspec.Struct, kw_only=True):
    host: str
    agent: str
    seq: int  # FLEET_DIFFS sequence
    from_seq: int | None
    to_seq: int
    snapshot_ts: str | None
    added: dict[str, Any]
    removed: list[str]
    changed: dict[str, Any]
    truncated: bool = False  # too large to publish: compare the snapshots (`diff`)


class DiffList(Answer, kw_only=True):
    items: list[DiffRow]
    next_cursor: int | None = None  # pass as after_seq for the next page
