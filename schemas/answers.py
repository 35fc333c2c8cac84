"""Shapes shared by every query-service reply and request."""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = [
    "Answer",
    "CatchUp",
    "ProjectionStatus",
    "RejectRow",
    "RejectsAnswer",
    "RejectsQuery",
    "SqlAnswer",
    "SqlQuery",
    "StatusAnswer",
    "StatusQuery",
    "StreamStatus",
    "node_status_subject",
]


class Answer(msgspec.Struct, kw_only=True):
    """Every reply says what it reflects, computed when it is made: `as_of` = the folded seq per
    stream the answer's read saw, `lag` = the stream's last seq minus that, `lag_s` = the age in
    seconds of the oldest event not yet folded (0 when caught up)."""

    as_of: dict[str, int] = msgspec.field(default_factory=dict)
    lag: dict[str, int] = msgspec.field(default_factory=dict)
    lag_s: dict[str, float] = msgspec.field(default_factory=dict)


def node_status_subject(node: str) -> str:
    """Where one node answers status, serving or catching up (`node` = its micro service id)."""
    return f"fleetlog.node.{node}.status"


class StatusQuery(msgspec.Struct, kw_only=True):
    min_seq: dict[str, int] | None = None


class StreamStatus(msgspec.Struct, kw_only=True):
    name: str
    messages: int
    bytes: int
    first_seq: int
    last_seq: int
    subjects: list[str]


class ProjectionStatus(msgspec.Struct, kw_only=True):
    name: str
    version: int
    generation: int
    state: str  # live | building
    checkpoints: dict[str, int]
    lag: dict[str, int]
    lag_seconds: dict[str, float]
    rejects: int
    rows: dict[str, int]


class CatchUp(msgspec.Struct, kw_only=True):
    """A node's progress towards the stream's last seq as of when it started (its target)."""

    stream: str
    folded: int
    target: int


class StatusAnswer(Answer, kw_only=True):
    streams: list[StreamStatus]
    projections: list[ProjectionStatus]
    rejects_total: int
    # The answering node: "serving" (in the query group) or "catching up" (not answering
    # queries until its views reach `catch_up`'s targets).
    node: str = ""
    node_state: str = "serving"
    catch_up: list[CatchUp] = msgspec.field(default_factory=list)


class RejectsQuery(msgspec.Struct, kw_only=True):
    projection: str | None = None
    limit: int = 50
    min_seq: dict[str, int] | None = None
    stream: str | None = None  # only rejects of this stream ...
    seq: int | None = None  # ... at this seq (`fleetlog rejects show SEQ`)


class RejectRow(msgspec.Struct, kw_only=True):
    projection: str
    stream: str
    seq: int
    subject: str
    reason: str
    data: str  # a preview of the original bytes, UTF-8 with replacement (the stream keeps them exactly)
    rejected_at: str
    data_bytes: int = 0  # size of the original bytes
    data_truncated: bool = False  # `data` is a preview: `fleetlog rejects show SEQ --raw` gives them all


class RejectsAnswer(Answer, kw_only=True):
    items: list[RejectRow]
    has_more: bool = False  # items were left off to fit the reply into the connection's max_payload


class SqlQuery(msgspec.Struct, kw_only=True):
    sql: str
    max_rows: int | None = None
    min_seq: dict[str, int] | None = None


class SqlAnswer(Answer, kw_only=True):
    columns: list[str]
    rows: list[list[Any]]
    truncated: bool
    truncated_by: str = ""  # "max_rows" or "max_payload" (the reply had to fit the connection's limit)
