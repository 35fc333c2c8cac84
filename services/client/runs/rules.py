"""The run ledger's rules as pure functions over `RunState` (no I/O, no clock of their own).

Commands read a run's last lifecycle message, apply one of these, and publish the
result guarded by the sequence they read: the rules decide *what* may happen,
JetStream decides *who* gets to do it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import msgspec
from fleetlog.schemas import RUN_STATUSES, TERMINAL_RUN_STATUSES, RunState
from fleetlog.services.backbone.errors import FleetRefused, StaleHolderError

__all__ = [
    "EXPIRED_REASON",
    "ClaimFilter",
    "active",
    "check_holder",
    "check_status",
    "claim",
    "claimable",
    "expire",
    "finalize",
    "held",
    "lease_live",
    "new_run",
    "release",
    "renew",
    "request_cancel",
    "token_sha256",
]

replace = msgspec.structs.replace


def check_status(status: Any, field: str = "status") -> str:
    """Unknown statuses are refused before anything else happens."""
    if not isinstance(status, str) or status not in RUN_STATUSES:
        raise ValueError(f"Unknown run status {status!r} for {field} (known: {', '.join(RUN_STATUSES)})")
    return status


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def lease_seconds(lease_s: float) -> int:
    return max(int(lease_s), 1)


def new_run(run_id: str, runner_id: str, status: str, now: float, **fields: Any) -> RunState:
    created = int(now)
    return RunState(
        run_id=run_id,
        runner_id=runner_id,
        status=status,  # type: ignore[arg-type]  # checked by check_status
        created_at=created,
        updated_at=created,
        started_at=created if status == "running" else None,
        finished_at=created if status in TERMINAL_RUN_STATUSES else None,
        **fields,
    )


def held(state: RunState) -> bool:
    """A run is held while a claim stands: status `claimed`, or `running` under that claim."""
    return state.claim_token_sha256 is not None


def lease_live(state: RunState, now: float) -> bool:
    return held(state) and state.lease_expires_at is not None and now < state.lease_expires_at


@dataclass(frozen=True)
class ClaimFilter:
    """What a claimer is willing to take (equality filters; runner_ids as a set)."""

    queue: str | None = None
    runner_ids: frozenset[str] = frozenset()
    conversation_id: str | None = None
    bot_id: str | None = None
    workspace_id: str | None = None
    thread_id: str | None = None
    strict_thread: bool = False

    def matches(self, s: RunState) -> bool:
        if self.queue is not None and s.queue != self.queue:
            return False
        if self.runner_ids and s.runner_id not in self.runner_ids:
            return False
        for name in ("conversation_id", "bot_id", "workspace_id"):
            want = getattr(self, name)
            if want is not None and getattr(s, name) != want:
                return False
        if self.thread_id is not None:
            return s.thread_id == self.thread_id
        return not (self.strict_thread and s.thread_id is not None)


def claimable(state: RunState, runtime_id: str, now: float, flt: ClaimFilter) -> bool:
    if state.status == "queued":
        pass
    elif not held(state) or lease_live(state, now):
        return False
    if state.requested_runtime_id not in (None, "", runtime_id):
        return False
    return flt.matches(state)


def claim(state: RunState, runtime_id: str, lease_s: float, now: float, token: str) -> RunState:
    """The claimed state; its fence is the claim event's stream sequence, known once stored."""
    return replace(
        state,
        status="claimed",
        claimed_by=runtime_id,
        claim_token_sha256=token_sha256(token),
        fence=None,
        lease_expires_at=now + lease_seconds(lease_s),
        dispatch_attempts=state.dispatch_attempts + 1,
        last_claimed_at=int(now),
        updated_at=int(now),
    )


def _holds(state: RunState, claim_token: str | None, fence: int | None, runtime_id: str | None) -> bool:
    if not held(state):
        return False
    if runtime_id is not None and runtime_id != state.claimed_by:
        return False
    if claim_token is not None:
        return token_sha256(claim_token) == state.claim_token_sha256
    return fence is not None and fence == state.fence


def renew(
    state: RunState, claim_token: str, lease_s: float, now: float, runtime_id: str | None = None
) -> RunState | None:
    if not _holds(state, claim_token, None, runtime_id) or not lease_live(state, now):
        return None
    return replace(state, lease_expires_at=now + lease_seconds(lease_s), updated_at=int(now))


def _unclaimed(state: RunState) -> RunState:
    return replace(state, claimed_by=None, claim_token_sha256=None, lease_expires_at=None)


def _with_status(state: RunState, status: str, now: float) -> RunState:
    started = state.started_at if state.started_at is not None or status != "running" else int(now)
    finished = state.finished_at
    if status in TERMINAL_RUN_STATUSES and finished is None:
        finished = int(now)
    return replace(state, status=status, started_at=started, finished_at=finished, updated_at=int(now))


def active(state: RunState, claim_token: str, now: float, runtime_id: str | None = None) -> bool:
    """The renew rule: this token (and runtime, if given) holds the run and its lease is live."""
    return _holds(state, claim_token, None, runtime_id) and lease_live(state, now)


def release(
    state: RunState, claim_token: str, status: str, status_reason: str | None, now: float,
    runtime_id: str | None = None,
) -> RunState | None:
    """The claim given up; `status_reason` replaces the run's (None clears it), as in the store."""
    if status == "claimed":
        raise ValueError("release: status must not be 'claimed' (release gives the claim up)")
    if not active(state, claim_token, now, runtime_id):
        return None
    return replace(_with_status(_unclaimed(state), status, now), reason=status_reason)


EXPIRED_REASON = "claim lease expired"


def expire(state: RunState, now: float) -> RunState | None:
    if not held(state) or lease_live(state, now):
        return None
    return replace(_unclaimed(state), status="queued", reason=EXPIRED_REASON, updated_at=int(now))


def check_holder(
    state: RunState, claim_token: str | None, fence: int | None, runtime_id: str | None, action: str
) -> None:
    """While a run is claimed only its holder may write; stale credentials are refused at any time."""
    if claim_token is None and fence is None:
        if held(state):
            raise StaleHolderError(
                f"cannot {action} run {state.run_id!r}: it requires active claim ownership; the run is "
                f"claimed by {state.claimed_by!r} under fence {state.fence} (pass the runtime id and its "
                f"claim_token, or fence)"
            )
        return
    if not _holds(state, claim_token, fence, runtime_id):
        where = (
            f"now claimed by {state.claimed_by!r} under fence {state.fence}"
            if held(state)
            else f"no longer claimed (status {state.status!r})"
        )
        raise StaleHolderError(
            f"cannot {action} run {state.run_id!r}: claim ownership is not active (a stale claim); the run is {where}"
        )


def finalize(
    state: RunState,
    status: str,
    now: float,
    status_reason: str | None = None,
    usage: dict[str, Any] | None = None,
    cost: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> RunState:
    if status == "claimed":
        raise ValueError("finalize: status must not be 'claimed' (runs are claimed with claim_next)")
    if state.status in TERMINAL_RUN_STATUSES and status != state.status:
        raise FleetRefused(f"Cannot transition terminal run {state.run_id!r} from {state.status!r} to {status!r}")
    out = state
    if status in TERMINAL_RUN_STATUSES or status == "queued":
        out = _unclaimed(out)
    out = _with_status(out, status, now)
    changes: dict[str, Any] = {}
    if status_reason is not None:
        changes["reason"] = status_reason
    if usage is not None:
        changes["usage"] = usage
    if cost is not None:
        changes["cost"] = cost
    if metadata:
        changes["metadata"] = {**state.metadata, **metadata}
    return replace(out, **changes) if changes else out


def request_cancel(state: RunState, now: float, status_reason: str | None = None) -> RunState:
    """Every request stamps cancel_requested_at anew; status unchanged; a reason replaces the
    run's status_reason, None keeps it (the store's rule)."""
    return replace(
        state, cancel_requested_at=int(now), updated_at=int(now), reason=status_reason or state.reason
    )


def runner_filter(runner_ids: Collection[str] | None) -> frozenset[str]:
    return frozenset(runner_ids or ())
