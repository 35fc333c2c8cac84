"""Action attempts: one fact per thing an agent tried, with its outcome and timing."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Final

import msgspec

from . import subjects
from ._base import Event, Identity, IsoTs, Text
from .answers import Answer

__all__ = [
    "CANONICAL_OUTCOMES",
    "ActionStats",
    "AttemptEvent",
    "AttemptPage",
    "AttemptRecorded",
    "AttemptRow",
    "AttemptStats",
    "AttemptStatsQuery",
    "AttemptSummary",
    "AttemptSummaryQuery",
    "AttemptsPurgeRequest",
    "AttemptsPurged",
    "AttemptsQuery",
    "PurgeResult",
]

# The outcomes the attempt store this replaces knew; any other non-empty string is accepted too.
CANONICAL_OUTCOMES: Final = (
    "success",
    "precondition_fail",
    "send_error",
    "completion_timeout",
    "skipped_by_policy",
)

Pane = dict[str, Any] | None


class AttemptEvent(Event, kw_only=True, frozen=True):
    STREAM: ClassVar[str] = "FLEET_ATTEMPTS"


class AttemptRecorded(AttemptEvent, tag="attempt.recorded", kw_only=True, frozen=True):
    """An agent attempted `action`; `outcome` says how it went.

    Panes are normalised by the client before publishing: `{"format": ..., "text": ...}`
    with the text tail-truncated (and `"truncated": true` when it was cut).
    """

    agent: Identity
    action: Identity
    outcome: Text
    elapsed_s: Annotated[float, msgspec.Meta(ge=0)]
    pane_before: Pane = None
    pane_after: Pane = None
    extras: dict[str, Any] = msgspec.field(default_factory=dict)

    def subject(self) -> str:
        return subjects.attempt(self.agent, self.action)


class AttemptsPurged(AttemptEvent, tag="attempt.purged", kw_only=True, frozen=True):
    """Attempts with an event time before `before` leave the view.

    A purge is a fact in the attempts stream, so a rebuild replays it at the same
    point and yields the same rows as the live view.
    """

    before: IsoTs
    days: float | None = None

    def subject(self) -> str:
        return subjects.attempt_purge()


# -- the attempts view's query contract (requests and replies of the query service) --

Limit = Annotated[int, msgspec.Meta(ge=1, le=10_000)]
Offset = Annotated[int, msgspec.Meta(ge=0)]
OptionalFilter = Annotated[str, msgspec.Meta(min_length=1)] | None


class AttemptsQuery(msgspec.Struct, kw_only=True):
    agent: OptionalFilter = None
    action: OptionalFilter = None
    outcome: OptionalFilter = None
    since: IsoTs | None = None  # absolute; the client turns "24h" into a time
    limit: Limit = 50
    offset: Offset = 0
    min_seq: dict[str, int] | None = None


class AttemptRow(msgspec.Struct, kw_only=True):
    id: str
    ts: str
    agent: str
    action: str
    outcome: str
    elapsed_s: float
    pane_before: dict[str, Any] | None
    pane_after: dict[str, Any] | None
    extras: dict[str, Any]


class AttemptPage(Answer, kw_only=True):
    items: list[AttemptRow]
    offset: int = 0  # the request's offset: items[0] is the offset-th newest match
    # Set when the page was cut to fit the connection's max_payload: ask again with
    # offset=next_offset for the rest of the page asked for.
    has_more: bool = False
    next_offset: int | None = None


class AttemptStatsQuery(msgspec.Struct, kw_only=True):
    agent: OptionalFilter = None
    since: IsoTs | None = None
    min_seq: dict[str, int] | None = None


class ActionStats(msgspec.Struct, kw_only=True):
    action: str
    outcome: str
    count: int
    mean_elapsed_s: float
    p95_elapsed_s: float


class AttemptStats(Answer, kw_only=True):
    items: list[ActionStats]


class AttemptSummaryQuery(msgspec.Struct, kw_only=True):
    agent: Identity
    limit: Limit = 100
    min_seq: dict[str, int] | None = None


class AttemptSummary(Answer, kw_only=True):
    agent: str
    last_action_at: str
    last_action_name: str
    last_action_outcome: str
    last_action_elapsed_s: float | None
    counts: dict[str, int]
    p95_elapsed_s_by_action: dict[str, float]


class AttemptsPurgeRequest(msgspec.Struct, kw_only=True):
    days: Annotated[float, msgspec.Meta(ge=0)]


class PurgeResult(Answer, kw_only=True):
    deleted: int
    before: str
