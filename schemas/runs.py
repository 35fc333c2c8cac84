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
from ._base import Event, Identity, Text, parse_ts
from .answers import Answer

__all__ = [
    "RUNTIME_QUERIES",
    "RUN_STATUSES",
    "TERMINAL_RUN_STATUSES",
    "Candidate",
    "Candidates",
    "CandidatesQuery",
    "ClaimedRun",
    "ExpiredQuery",
    "FoldedStateQuery",
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
    "RunStatus",
    "RunView",
    "RunsGetQuery",
    "RunsListQuery",
    "claimed_run",
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
    # The stream sequence of the run's creation event: the run's integer `id`. Like `fence`, a
    # creation cannot know its own sequence, so it is stored as None and every reader fills it
    # in (`state_at`); later lifecycle events carry it forward.
    created_seq: int | None = None
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
    updated_at: int | None = None  # None only in events stored before v2: the event's time then
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
    # A JSON object, as the store this replaces kept it; a number only in events stored before
    # v2 (the view shows it as {"amount": n}).
    cost: dict[str, Any] | float | None = None


class RunLifecycle(Event, kw_only=True, frozen=True):
    STREAM: ClassVar[str] = "FLEET_RUNS"

    state: RunState
    runtime_id: str | None = None
    reason: str | None = None

    def subject(self) -> str:
        return subjects.run_state(self.state.run_id)


def state_at(event: RunLifecycle, seq: int) -> RunState:
    """The run as of a lifecycle message stored at `seq`: a creation's `created_seq` and a
    claim's `fence` are their own stream sequences; an event stored before v2 (no
    `updated_at`) was updated when it was stored."""
    state = event.state
    changes: dict[str, Any] = {}
    if isinstance(event, RunCreated) and state.created_seq is None:
        changes["created_seq"] = seq
    if isinstance(event, RunClaimed):
        changes["fence"] = seq
    if state.updated_at is None:
        changes["updated_at"] = int(parse_ts(event.ts).timestamp())
    return msgspec.structs.replace(state, **changes) if changes else state


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
    """A run as every read shows it, with the keys of the ledger store fleetlog replaces:
    times in epoch seconds (int) or None, never the claim token. fleetlog adds `fence` (the
    claim's fencing token) and `authorization` beside them.

    `authorization` holds the credentials the run's holder works with (tokens): it is filled
    only where the run was read from the stream itself — `get`, `create`, the commands' results
    and the claimer's `ClaimedRun` — which the broker allows only `runtime`, `service` and
    `admin` identities. A query answer any identity may ask (`fleetlog.runs.list`) carries None
    (`run_view(..., public=True)`); the ledger store this replaces returned it from no read."""

    id: int  # the stream sequence of the run's creation: orders runs by creation
    run_id: str
    event_id: str | None
    agent_id: str | None
    binding_id: str | None
    runner_id: str
    conversation_id: str | None
    thread_id: str | None
    workspace_id: str | None
    bot_id: str | None
    status: str
    status_reason: str | None
    queue_name: str | None
    priority: int
    requested_runtime_id: str | None
    claimed_by_runtime_id: str | None
    claim_lease_expires_at: int | None  # rounded up
    dispatch_attempts: int
    last_claimed_at: int | None
    created_at: int
    started_at: int | None
    finished_at: int | None
    updated_at: int
    deadline_at: int | None
    cancel_requested_at: int | None
    usage: dict[str, Any] | None
    cost: dict[str, Any] | None
    metadata: dict[str, Any]
    fence: int | None
    authorization: dict[str, Any] | None

    @property
    def cancel_requested(self) -> bool:
        return self.cancel_requested_at is not None


class ClaimedRun(RunView, kw_only=True):
    """What `claim_next` returns to the claimer alone: the run with its secret `claim_token`
    (and `fence`, the fencing token)."""

    claim_token: str


def _view_fields(state: RunState, created_seq: int | None) -> dict[str, Any]:
    lease = state.lease_expires_at
    cost = state.cost
    seq = state.created_seq if state.created_seq is not None else created_seq
    return {
        "id": seq if seq is not None else 0,
        "run_id": state.run_id, "event_id": state.event_id, "agent_id": state.agent_id,
        "binding_id": state.binding_id, "runner_id": state.runner_id, "conversation_id": state.conversation_id,
        "thread_id": state.thread_id, "workspace_id": state.workspace_id, "bot_id": state.bot_id,
        "status": state.status, "status_reason": state.reason, "queue_name": state.queue,
        "priority": state.priority, "requested_runtime_id": state.requested_runtime_id,
        "claimed_by_runtime_id": state.claimed_by,
        "claim_lease_expires_at": None if lease is None else math.ceil(lease),
        "dispatch_attempts": state.dispatch_attempts, "last_claimed_at": state.last_claimed_at,
        "created_at": state.created_at, "started_at": state.started_at, "finished_at": state.finished_at,
        "updated_at": state.updated_at if state.updated_at is not None else state.created_at,
        "deadline_at": state.deadline_at, "cancel_requested_at": state.cancel_requested_at,
        "usage": state.usage,
        "cost": {"amount": cost} if isinstance(cost, int | float) else cost,  # a pre-v2 number
        "metadata": state.metadata, "fence": state.fence, "authorization": state.authorization,
    }


def run_view(state: RunState, created_seq: int | None = None, *, public: bool = False) -> RunView:
    """The view of a run; `created_seq` stands in for a pre-v2 state's missing `created_seq`.
    `public`: for an answer every identity may read, without the run's `authorization`."""
    fields = _view_fields(state, created_seq)
    if public:
        fields["authorization"] = None
    return RunView(**fields)


def claimed_run(state: RunState, claim_token: str) -> ClaimedRun:
    return ClaimedRun(**_view_fields(state, None), claim_token=claim_token)


class RunEventView(msgspec.Struct, kw_only=True):
    """A result event with the store's keys; `id` is its stream sequence. fleetlog adds `fence`."""

    id: int
    run_id: str
    sequence: int
    type: str
    data: dict[str, Any]
    usage: dict[str, Any] | None
    created_at: int
    source: str
    artifact_refs: list[Any]
    metadata: dict[str, Any]
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
    before_id: int | None = None  # a run's `id`: the page holds older runs only
    limit: Annotated[int, msgspec.Meta(ge=1, le=100)] = 50
    min_seq: dict[str, int] | None = None
    binding_id: str | None = None
    # The store's agent filter: agent_id, or (no agent_id) a binding "agent_<id>_…" / "debug:<id>:…".
    agent_id: str | None = None


class RunPage(Answer, kw_only=True):
    items: list[RunView]
    next_cursor: int | None  # the last item's `id` when there is more: pass it as before_id
    has_more: bool
    total_count: int


class RunEventsQuery(msgspec.Struct, kw_only=True):
    run_id: str
    before_sequence: int | None = None
    after_sequence: int | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=100)] = 50
    direction: Literal["forward", "backward"] = "forward"  # the client maps anything else to forward
    min_seq: dict[str, int] | None = None


class RunEventPage(Answer, kw_only=True):
    items: list[RunEventView]
    next_cursor: int | None
    prev_cursor: int | None
    has_more: bool


# Query endpoints whose answers carry whole run states, `authorization` included: the next
# lifecycle message is written from them (a claim, an expiry), so they cannot leave it out.
# Only identities that write runs may ask them (services/node/identities.py denies the others).
RUNTIME_QUERIES: Final = ("fleetlog.runs.candidates", "fleetlog.runs.expired", "fleetlog.runs.state")


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


class FoldedStateQuery(msgspec.Struct, kw_only=True):
    """One run's state as the view folded it (`fleetlog.runs.state`: no item if the view has no
    such run). A guarded reader's fallback when the run's last lifecycle message in the stream
    is not a lifecycle event (docs/security.md, "Replies as a deputy"): pass that message's
    seq as `min_seq`, so the view has folded (and refused) it."""

    run_id: str
    min_seq: dict[str, int] | None = None


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
