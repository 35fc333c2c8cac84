"""Agent runs: guarded lifecycle (state-carrying) plus result events.

Every lifecycle event carries the run's whole state, so the last message on
`fleet.run.<run_id>.state` *is* the run; commands read it (direct get) and
write with an expected last subject sequence (DESIGN §3.2).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Final, Literal

import msgspec

from . import subjects
from ._base import Event, Identity, Text
from .answers import Answer

__all__ = [
    "RUN_STATUSES",
    "TERMINAL_RUN_STATUSES",
    "Candidate",
    "Candidates",
    "CandidatesQuery",
    "Claim",
    "ExpiredQuery",
    "MaxSequence",
    "MaxSequenceQuery",
    "Proposal",
    "Proposals",
    "RunAnswer",
    "RunCancelRequested",
    "RunClaimed",
    "RunCreated",
    "RunEventAppended",
    "RunEventPage",
    "RunEventView",
    "RunEventsQuery",
    "RunFinalized",
    "RunLeaseExpired",
    "RunLifecycle",
    "RunPage",
    "RunReleased",
    "RunRenewed",
    "RunState",
    "RunStats",
    "RunStatsQuery",
    "RunStatus",
    "RunView",
    "RunnerStats",
    "RunsGetQuery",
    "RunsListQuery",
    "RuntimeRunStats",
    "run_view",
    "state_at",
]

RunStatus = Literal["created", "queued", "claimed", "running", "completed", "failed", "cancelled", "timeout"]
RUN_STATUSES: Final = ("created", "queued", "claimed", "running", "completed", "failed", "cancelled", "timeout")
TERMINAL_RUN_STATUSES: Final = frozenset({"completed", "failed", "cancelled", "timeout"})
RunSequence = Annotated[int, msgspec.Meta(ge=0)]


class RunState(msgspec.Struct, kw_only=True, frozen=True):
    """The full state of one run. Times are epoch seconds (UTC) or None."""

    run_id: Identity
    runner_id: str
    status: RunStatus
    queue: str | None = None
    priority: int = 0
    requested_runtime_id: str | None = None
    conversation_id: str | None = None
    thread_id: str | None = None
    workspace_id: str | None = None
    bot_id: str | None = None
    agent_id: str | None = None
    binding_id: str | None = None
    event_id: str | None = None
    deadline_at: int | None = None
    authorization: dict[str, Any] | None = None
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    created_at: int
    started_at: int | None = None
    finished_at: int | None = None
    claimed_by: str | None = None
    # sha256 of the claim token: the token itself only ever goes to the claimer.
    claim_token_sha256: str | None = None
    fence: int | None = None
    lease_expires_at: float | None = None
    dispatch_attempts: int = 0
    last_claimed_at: int | None = None
    cancel_requested_at: int | None = None
    reason: str | None = None
    usage: dict[str, Any] | None = None
    cost: float | None = None


class RunLifecycle(Event, kw_only=True, frozen=True):
    STREAM: ClassVar[str] = "FLEET_RUNS"

    state: RunState
    runtime_id: str | None = None
    reason: str | None = None

    def subject(self) -> str:
        return subjects.run_state(self.state.run_id)


def state_at(event: RunLifecycle, seq: int) -> RunState:
    """The run as of a lifecycle message stored at `seq`: a claim's fence is its own stream sequence."""
    if isinstance(event, RunClaimed):
        return msgspec.structs.replace(event.state, fence=seq)
    return event.state


class RunCreated(RunLifecycle, tag="run.created", kw_only=True, frozen=True):
    pass


class RunClaimed(RunLifecycle, tag="run.claimed", kw_only=True, frozen=True):
    pass


class RunRenewed(RunLifecycle, tag="run.renewed", kw_only=True, frozen=True):
    pass


class RunReleased(RunLifecycle, tag="run.released", kw_only=True, frozen=True):
    pass


class RunLeaseExpired(RunLifecycle, tag="run.lease_expired", kw_only=True, frozen=True):
    pass


class RunFinalized(RunLifecycle, tag="run.finalized", kw_only=True, frozen=True):
    pass


class RunCancelRequested(RunLifecycle, tag="run.cancel_requested", kw_only=True, frozen=True):
    pass


class RunEventAppended(Event, tag="run.event", kw_only=True, frozen=True):
    """A result event of a run; idempotent on (run_id, sequence): first write wins."""

    STREAM: ClassVar[str] = "FLEET_RUNS"

    run_id: Identity
    sequence: RunSequence
    event_type: Text
    data: dict[str, Any] = msgspec.field(default_factory=dict)
    usage: dict[str, Any] | None = None
    source: str = "runner"
    artifact_refs: list[Any] = msgspec.field(default_factory=list)
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    # The writer's fencing token (claim event sequence) when it holds the run.
    fence: int | None = None

    def subject(self) -> str:
        return subjects.run_event(self.run_id, self.sequence)


# -- what the run APIs answer ---------------------------------------------------


class RunView(msgspec.Struct, kw_only=True):
    """A run as every read shows it: times in epoch seconds, never the claim token."""

    run_id: str
    runner_id: str
    status: str
    queue: str | None
    priority: int
    requested_runtime_id: str | None
    conversation_id: str | None
    thread_id: str | None
    workspace_id: str | None
    bot_id: str | None
    agent_id: str | None
    binding_id: str | None
    event_id: str | None
    deadline_at: int | None
    authorization: dict[str, Any] | None
    metadata: dict[str, Any]
    created_at: int
    started_at: int | None
    finished_at: int | None
    claimed_by: str | None
    fence: int | None
    lease_expires_at: int | None
    dispatch_attempts: int
    last_claimed_at: int | None
    cancel_requested_at: int | None
    reason: str | None
    usage: dict[str, Any] | None
    cost: float | None

    @property
    def cancel_requested(self) -> bool:
        return self.cancel_requested_at is not None


def run_view(state: RunState) -> RunView:
    fields = {f: getattr(state, f) for f in RunView.__struct_fields__ if f != "lease_expires_at"}
    lease = state.lease_expires_at
    return RunView(**fields, lease_expires_at=None if lease is None else math.ceil(lease))


class Claim(msgspec.Struct, kw_only=True):
    """What `claim_next` returns to the claimer alone: the run, the secret token, the fencing token."""

    run: RunView
    claim_token: str
    fence: int


class RunEventView(msgspec.Struct, kw_only=True):
    run_id: str
    sequence: int
    type: str
    data: dict[str, Any]
    usage: dict[str, Any] | None
    source: str
    artifact_refs: list[Any]
    metadata: dict[str, Any]
    created_at: int
    fence: int | None


class RunsGetQuery(msgspec.Struct, kw_only=True):
    run_id: str
    min_seq: dict[str, int] | None = None


class RunAnswer(Answer, kw_only=True):
    run: RunView | None


class RunsListQuery(msgspec.Struct, kw_only=True):
    conversation_id: str | None = None
    statuses: list[RunStatus] | None = None
    runner_id: str | None = None
    bot_id: str | None = None
    workspace_id: str | None = None
    thread_id: str | None = None
    strict_thread: bool = False
    before_id: str | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=100)] = 50
    min_seq: dict[str, int] | None = None


class RunPage(Answer, kw_only=True):
    items: list[RunView]
    next_cursor: str | None
    has_more: bool
    total_count: int


class RunEventsQuery(msgspec.Struct, kw_only=True):
    run_id: str
    before_sequence: int | None = None
    after_sequence: int | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=100)] = 50
    direction: Literal["forward", "backward"] = "forward"
    min_seq: dict[str, int] | None = None


class RunEventPage(Answer, kw_only=True):
    items: list[RunEventView]
    next_cursor: int | None
    prev_cursor: int | None
    has_more: bool


class CandidatesQuery(msgspec.Struct, kw_only=True):
    """Runs the view believes claimable; the claimer's guarded publish decides."""

    runtime_id: str
    now: float
    queue: str | None = None
    runner_ids: list[str] | None = None
    conversation_id: str | None = None
    bot_id: str | None = None
    workspace_id: str | None = None
    thread_id: str | None = None
    strict_thread: bool = False
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 32
    min_seq: dict[str, int] | None = None
    # (k, n, salt): within a priority, runs whose stripe (a hash of the run id, mod n) is k
    # come first, then the other stripes in an order set by salt; None: exact creation order.
    # Racing claimers ask for different k and salts.
    stripe: tuple[
        Annotated[int, msgspec.Meta(ge=0)], Annotated[int, msgspec.Meta(ge=1, le=4096)],
        Annotated[int, msgspec.Meta(ge=0, lt=2**31)]
    ] | None = None


class Candidate(msgspec.Struct, kw_only=True, array_like=True):
    state: RunState
    state_seq: int


class Candidates(Answer, kw_only=True):
    items: list[Candidate]


class Proposal(msgspec.Struct, kw_only=True, array_like=True):
    """A run the view believes claimable. The stored state JSON passes through undecoded on
    both sides: the claimer decodes a proposal only when it tries it (measured: decoding 256
    states per list was half the query service's CPU, and most proposals are never tried)."""

    run_id: str
    priority: int
    state_seq: int
    state: msgspec.Raw
    stripe: int = 0  # striped lists: hash(run_id) mod n (CandidatesQuery.stripe)


class Proposals(Answer, kw_only=True):
    items: list[Proposal]


class ExpiredQuery(msgspec.Struct, kw_only=True):
    now: float
    limit: Annotated[int, msgspec.Meta(ge=1, le=500)] = 100
    min_seq: dict[str, int] | None = None


class MaxSequenceQuery(msgspec.Struct, kw_only=True):
    run_id: str
    min_seq: dict[str, int] | None = None


class MaxSequence(Answer, kw_only=True):
    sequence: int | None


class RuntimeRunStats(msgspec.Struct, kw_only=True):
    runtime_id: str
    active: int  # running + claimed
    claimed: int


class RunnerStats(msgspec.Struct, kw_only=True):
    runner_id: str
    total: int
    by_status: dict[str, int]
    success_rate: float | None


class RunStatsQuery(msgspec.Struct, kw_only=True):
    since: float | None = None  # epoch seconds; None = all time
    until: float | None = None
    runner_id: str | None = None
    min_seq: dict[str, int] | None = None


class RunStats(Answer, kw_only=True):
    since: int | None
    until: int
    total: int
    by_status: dict[str, int]
    finished: int
    throughput_per_hour: float | None
    avg_duration_s: float | None
    avg_queue_wait_s: float | None
    p50_duration_s: float | None
    p95_duration_s: float | None
    p99_duration_s: float | None
    runtimes: list[RuntimeRunStats]
    runners: list[RunnerStats]
