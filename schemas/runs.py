"""Agent runs: guarded lifecycle (state-carrying) plus result events.

Every lifecycle event carries the run's whole state, so the last message on
`fleet.run.<run_id>.state` *is* the run; commands read it (direct get) and
write with an expected last subject sequence (DESIGN §3.2).
"""

from __future__ import annotations

from typing import Any, ClassVar, Final

import msgspec

from . import subjects
from ._base import Event, Identity, Text

__all__ = [
    "RUN_STATUSES",
    "TERMINAL_RUN_STATUSES",
    "RunCancelRequested",
    "RunClaimed",
    "RunCreated",
    "RunEventAppended",
    "RunFinalized",
    "RunLeaseExpired",
    "RunLifecycle",
    "RunReleased",
    "RunRenewed",
    "RunState",
]

RUN_STATUSES: Final = ("created", "queued", "claimed", "running", "completed", "failed", "cancelled", "timeout")
TERMINAL_RUN_STATUSES: Final = frozenset({"completed", "failed", "cancelled", "timeout"})


class RunState(msgspec.Struct, kw_only=True, frozen=True):
    """The full state of one run. Times are epoch seconds (UTC) or None."""

    run_id: Identity
    runner_id: str
    status: Text
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
    sequence: int
    event_type: Text
    data: dict[str, Any] = msgspec.field(default_factory=dict)
    usage: dict[str, Any] | None = None
    source: str = "runner"
    artifact_refs: list[Any] = msgspec.field(default_factory=list)
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    # The writer's fencing token (claim event sequence) when it holds the run.
    fence: int | None = None

    def subject(self) -> str:
        return subjects.run_event(self.run_id)
