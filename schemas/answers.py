"""Shapes shared by every query-service reply and request."""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["Answer", "ProjectionStatus", "RejectRow", "RejectsAnswer", "RejectsQuery", "SqlAnswer", "SqlQuery",
           "StatusAnswer", "StatusQuery", "StreamStatus"]


class Answer(msgspec.Struct, kw_only=True):
    """Every reply says what it reflects: `as_of` = folded seq per stream, `lag` = events not yet folded."""

    as_of: dict[str, int] = msgspec.field(default_factory=dict)
    lag: dict[str, int] = msgspec.field(default_factory=dict)


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


class StatusAnswer(Answer, kw_only=True):
    streams: list[StreamStatus]
    projections: list[ProjectionStatus]
    rejects_total: int


class RejectsQuery(msgspec.Struct, kw_only=True):
    projection: str | None = None
    limit: int = 50
    min_seq: dict[str, int] | None = None


class RejectRow(msgspec.Struct, kw_only=True):
    projection: str
    stream: str
    seq: int
    subject: str
    reason: str
    data: str  # the original bytes, UTF-8 with replacement (the rejects stream keeps them exactly)
    rejected_at: str


class RejectsAnswer(Answer, kw_only=True):
    items: list[RejectRow]


class SqlQuery(msgspec.Struct, kw_only=True):
    sql: str
    max_rows: int | None = None
    min_seq: dict[str, int] | None = None


class SqlAnswer(Answer, kw_only=True):
    columns: list[str]
    rows: list[list[Any]]
    truncated: bool
