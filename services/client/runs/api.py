"""The run ledger's client API: `fleet.runs.*`.

Commands (create, claim_next, renew, release, release_expired, finalize,
request_cancel, append_event, reconcile) are guarded: read the run's last lifecycle message
(direct get), apply `rules`, publish with the expected last subject sequence.
JetStream lets exactly one concurrent writer win; the others re-read and retry,
or move on to the next candidate. The view only proposes claim candidates.

Reads of the view (list, events, stats) wait for this client's own commands by
default (session consistency); `get` reads the stream itself and is always fresh.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import msgspec
from fleetlog.schemas import (
    RunCancelRequested,
    RunClaimed,
    RunCreated,
    RunEventAppended,
    RunFinalized,
    RunLeaseExpired,
    RunReleased,
    RunRenewed,
    RunState,
    encode_event,
    new_event_id,
    now_iso,
    subjects,
)
from fleetlog.schemas.run_stats import Reconciled
from fleetlog.schemas.runs import (
    Candidates,
    ClaimedRun,
    ExpiredQuery,
    FoldedStateQuery,
    RunEventPage,
    RunEventsQuery,
    RunLifecycle,
    RunPage,
    RunsListQuery,
    RunView,
    run_view,
    state_at,
)
from fleetlog.services.backbone.errors import FleetValidationError
from fleetlog.services.backbone.guarded import Guarded, StoredMsg, WrongLastSequence
from fleetlog.services.client.runs import rules
from fleetlog.services.client.runs.claims import ClaimCounters, Claimer
from fleetlog.services.client.runs.events import ResultEvents, _dict, _text
from fleetlog.services.client.runs.stats import RunStatsReads, RuntimeRegistry
from fleetlog.services.client.seam import session_token
from fleetlog.services.writepath.publisher import Receipt, Token

if TYPE_CHECKING:
    from fleetlog.services.client.seam import FleetClient

__all__ = ["ClaimCounters", "RunsAPI"]  # ClaimCounters: from .claims

log = logging.getLogger("fleetlog.runs")

STREAM = "FLEET_RUNS"
_lifecycle = msgspec.json.Decoder(
    RunCreated | RunClaimed | RunRenewed | RunReleased | RunLeaseExpired | RunFinalized | RunCancelRequested
)
_run_event = msgspec.json.Decoder(RunEventAppended)


MAX_RETRIES = 64
# Aliases: inside RunsAPI the name `list` is the list() method.
_Strs = list[str] | None
_Refs = list[Any] | None
_Views = list[RunView]


def _clamp(value: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, int(value)))


class RunsAPI(ResultEvents, RunStatsReads):
    def __init__(
        self, fleet: FleetClient, clock: Callable[[], float] = time.time, runtimes: RuntimeRegistry | None = None
    ) -> None:
        self._fleet = fleet
        self.clock = clock  # injectable: tests drive lease expiry without sleeping
        self._seen = 0  # highest FLEET_RUNS sequence this client wrote: reads wait for it
        self._claimer = Claimer(self)
        # The client's runtimes API (`fleet.runtimes`): runtime stats and `reconcile` read and
        # mark runtimes with its clock and its session token.
        self._runtimes = runtimes

    # -- plumbing ------------------------------------------------------------------
    async def _guarded(self) -> Guarded:
        return Guarded(await self._fleet.nats())

    def _note(self, seq: int) -> None:
        self._seen = max(self._seen, seq)

    def _token(self, min_seq: Token | Receipt | None) -> dict[str, int] | None:
        return session_token(min_seq, STREAM, self._seen)

    async def _load(self, g: Guarded, run_id: str) -> tuple[RunState | None, int]:
        """The run's state (None: no such run) and the sequence a write to it must expect.

        The last message on the run's lifecycle subject is the run, unless it is none of its
        lifecycle events: nats-server stores whatever it sends to a reply subject an identity
        named (a JetStream ack, an API answer: docs/security.md, "Replies as a deputy"), and
        the stream keeps one message per subject. Such a foreign message says nothing about
        the run: its state is then the view's (which refused the message), and the next write
        is guarded on the foreign message's sequence, so it replaces it."""
        msg = await g.last(STREAM, subjects.run_state(run_id))
        if msg is None:
            return None, 0
        state = _state_or_none(msg)
        if state is None:
            log.warning("run %s: the last lifecycle message (seq %d) is not a lifecycle event of the run; "
                        "reading the view's state instead", run_id, msg.seq)
            answer = await self._fleet.request(
                "fleetlog.runs.state", FoldedStateQuery(run_id=run_id, min_seq={STREAM: msg.seq}), Candidates)
            state = answer.items[0].state if answer.items else None
        return state, msg.seq

    async def _read(self, g: Guarded, run_id: str) -> tuple[RunState, int] | None:
        state, seq = await self._load(g, run_id)
        return None if state is None else (state, seq)

    async def _view(self, g: Guarded, state: RunState) -> RunView:
        """A run's view; a run whose lifecycle began before v2 carries no `created_seq`: its
        first lifecycle message's sequence is its `id` (one more direct get)."""
        if state.created_seq is not None:
            return run_view(state)
        first = await g.first(STREAM, subjects.run_state(state.run_id))
        return run_view(state, first.seq if first is not None else None)

    async def _write(
        self, g: Guarded, cls: type[RunLifecycle], state: RunState, expected: int, *,
        runtime_id: str | None = None, reason: str | None = None,
    ) -> int:
        event = cls(id=new_event_id(), ts=now_iso(), state=state, runtime_id=runtime_id, reason=reason)
        _, seq, _ = await g.publish(event.subject(), encode_event(event), msg_id=event.id, expected_last_seq=expected)
        self._note(seq)
        self._claimer.wrote(cls, state.run_id, seq)
        return seq

    @property
    def counters(self) -> ClaimCounters:
        """How claiming went for this client (claims, lost races, proposal lists, skipped proposals)."""
        return self._claimer.counters

    # -- commands ------------------------------------------------------------------
    async def create(
        self, run_id: str, runner_id: str, status: str = "running", *, queue_name: str | None = None,
        priority: int = 0, requested_runtime_id: str | None = None, conversation_id: str | None = None,
        thread_id: str | None = None, workspace_id: str | None = None, bot_id: str | None = None,
        agent_id: str | None = None, binding_id: str | None = None, event_id: str | None = None,
        deadline_at: int | None = None, authorization: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> RunView:
        """Create a run; idempotent by run_id (an existing run is returned unchanged)."""
        rules.check_status(status)
        _text("run_id", run_id)
        _text("runner_id", runner_id)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise FleetValidationError("priority", f"must be an integer, got {priority!r}")
        state = rules.new_run(
            run_id, runner_id, status, self.clock(), queue=queue_name, priority=priority,
            requested_runtime_id=requested_runtime_id, conversation_id=conversation_id, thread_id=thread_id,
            workspace_id=workspace_id, bot_id=bot_id, agent_id=agent_id, binding_id=binding_id,
            event_id=event_id, deadline_at=deadline_at, authorization=authorization,
            metadata=_dict("metadata", metadata),
        )
        g = await self._guarded()
        have, guard = await self._load(g, run_id)
        current = None if have is None else (have, guard)
        if current is None:
            try:
                seq = await self._write(g, RunCreated, state, guard)  # 0, or over a foreign message
                return run_view(msgspec.structs.replace(state, created_seq=seq))
            except WrongLastSequence:
                current = await self._read(g, run_id)  # created concurrently: theirs stands
        assert current is not None
        self._note(current[1])
        return await self._view(g, current[0])

    async def get(self, run_id: str) -> RunView | None:
        """The run as its last lifecycle message says (read from the stream: always fresh)."""
        g = await self._guarded()
        current = await self._read(g, _text("run_id", run_id))
        return None if current is None else await self._view(g, current[0])

    async def claim_next(
        self, runtime_id: str, queue_name: str | None = None, lease_s: float = 60, *,
        runner_ids: _Strs = None, conversation_id: str | None = None, bot_id: str | None = None,
        workspace_id: str | None = None, thread_id: str | None = None, strict_thread: bool = False,
    ) -> ClaimedRun | None:
        """Claim the best eligible run (priority desc, then creation order), or None if there is none.

        The result alone carries the `claim_token`; its `fence` (the claim's stream sequence)
        grows with every claim of the run.
        """
        _text("runtime_id", runtime_id)
        flt = rules.ClaimFilter(queue_name, rules.runner_filter(runner_ids), conversation_id, bot_id, workspace_id,
                                thread_id, strict_thread)
        return await self._claimer.claim_next(runtime_id, flt, lease_s)

    async def _command(
        self, run_id: str, cls: type[RunLifecycle], change: Callable[[RunState], RunState | None], *,
        runtime_id: str | None = None, reason: str | None = None,
    ) -> RunView | None:
        """Read the run, apply `change` (None: the rule says no), publish guarded; retry when beaten."""
        g = await self._guarded()
        for _ in range(MAX_RETRIES):
            current = await self._read(g, run_id)
            if current is None:
                return None
            state = change(current[0])
            if state is None:
                return None
            try:
                await self._write(g, cls, state, current[1], runtime_id=runtime_id, reason=reason)
            except WrongLastSequence:
                continue  # another writer got there first: read again
            return await self._view(g, state)
        raise TimeoutError(f"{cls.__struct_config__.tag} {run_id!r}: lost {MAX_RETRIES} races in a row")

    async def renew(
        self, run_id: str, claim_token: str, lease_s: float = 60, runtime_id: str | None = None
    ) -> RunView | None:
        """Extend the lease; None unless claimed by this token (and runtime) with a live lease.

        The returned run's `cancel_requested` tells the holder an operator asked it to stop.
        """
        return await self._command(
            run_id, RunRenewed, lambda s: rules.renew(s, claim_token, lease_s, self.clock(), runtime_id),
            runtime_id=runtime_id,
        )

    async def release(
        self, run_id: str, claim_token: str, status: str = "queued", status_reason: str | None = None,
        runtime_id: str | None = None,
    ) -> RunView | None:
        """Give the claim up (default back to queued); None unless held by this token with a live lease."""
        rules.check_status(status)
        return await self._command(
            run_id, RunReleased,
            lambda s: rules.release(s, claim_token, status, status_reason, self.clock(), runtime_id),
            runtime_id=runtime_id, reason=status_reason,
        )

    async def validate_active_claim(self, run_id: str, claim_token: str, runtime_id: str | None = None) -> bool:
        """Whether this token (and runtime, if given) holds the run under a live lease: the renew rule.
        Read from the stream (always fresh); False for an unknown run."""
        current = await self._read(await self._guarded(), _text("run_id", run_id))
        return current is not None and rules.active(current[0], claim_token, self.clock(), runtime_id)

    async def release_expired(self, limit: int = 100) -> _Views:
        """Put claims whose lease passed back to queued (oldest lease first); safe to run concurrently."""
        limit = _clamp(limit, 1, 500)
        now = self.clock()
        answer = await self._fleet.request(
            "fleetlog.runs.expired", ExpiredQuery(now=now, limit=limit, min_seq=self._token(None)), Candidates
        )
        g = await self._guarded()
        released: _Views = []
        for cand in answer.items:
            state = rules.expire(cand.state, now)
            if state is None:
                continue
            try:
                await self._write(g, RunLeaseExpired, state, cand.state_seq, reason=rules.EXPIRED_REASON)
            except WrongLastSequence:
                continue  # renewed, released or expired by another sweeper meanwhile
            released.append(run_view(state))
        return released

    async def reconcile(self) -> Reconciled:
        """Mark silent runtimes stale, then release expired claims (what the reactors do each tick)."""
        stale = await self._registry().mark_stale_runtimes()
        released = 0
        while True:  # every expired lease, 500 at a time
            batch = await self.release_expired(limit=500)
            released += len(batch)
            if len(batch) < 500:
                break
        return Reconciled(stale_count=len(stale), released_claim_count=released)

    async def finalize(
        self, run_id: str, status: str, status_reason: str | None = None, usage: dict[str, Any] | None = None,
        cost: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None, *,
        claim_token: str | None = None, fence: int | None = None, runtime_id: str | None = None,
    ) -> RunView | None:
        """Set the run's status; terminal statuses set finished_at once and clear the claim.

        `usage` and `cost` are JSON objects (replaced when given); `metadata` is merged.
        """
        rules.check_status(status)
        for name, value in (("usage", usage), ("cost", cost), ("metadata", metadata)):
            if value is not None:
                _dict(name, value)

        def change(state: RunState) -> RunState:
            rules.check_holder(state, claim_token, fence, runtime_id, "finalize")
            return rules.finalize(state, status, self.clock(), status_reason, usage, cost, metadata)

        return await self._command(run_id, RunFinalized, change, runtime_id=runtime_id, reason=status_reason)

    async def request_cancel(self, run_id: str, status_reason: str | None = None) -> RunView | None:
        """Ask the holder to stop: stamps cancel_requested_at, keeps the status, sets status_reason
        (None keeps the old one) and appends an `admin.run_cancel` host event after the others."""
        view = await self._command(
            run_id, RunCancelRequested, lambda s: rules.request_cancel(s, self.clock(), status_reason),
            reason=status_reason,
        )
        if view is not None:
            await self.append_audit_event(run_id, "admin.run_cancel", {"status_reason": status_reason})
        return view

    # -- reads of the view -----------------------------------------------------------
    async def list(
        self, conversation_id: str | None = None, statuses: _Strs = None, runner_id: str | None = None,
        bot_id: str | None = None, workspace_id: str | None = None, thread_id: str | None = None,
        strict_thread: bool = False, before_id: int | None = None, limit: int = 50, *,
        binding_id: str | None = None, agent_id: str | None = None, min_seq: Token | Receipt | None = None,
    ) -> RunPage:
        """Runs newest first (by `id`): items, next_cursor (pass as before_id), has_more, total_count."""
        if before_id is not None and (isinstance(before_id, bool) or not isinstance(before_id, int)):
            raise FleetValidationError("before_id", f"must be a run's integer id, got {before_id!r}")
        for s in statuses or ():
            rules.check_status(s, "statuses")
        req = RunsListQuery(
            conversation_id=conversation_id, statuses=list(statuses) if statuses else None,  # type: ignore[arg-type]
            runner_id=runner_id, bot_id=bot_id, workspace_id=workspace_id, thread_id=thread_id,
            strict_thread=strict_thread, before_id=before_id, limit=_clamp(limit, 1, 100),
            min_seq=self._token(min_seq), binding_id=binding_id, agent_id=agent_id,
        )
        return await self._fleet.request("fleetlog.runs.list", req, RunPage)

    async def events(
        self, run_id: str, before_sequence: int | None = None, after_sequence: int | None = None, limit: int = 50,
        direction: str = "forward", *, min_seq: Token | Receipt | None = None,
    ) -> RunEventPage:
        """A run's result events; bounds exclusive; backward is newest first, anything else forward."""
        direction = "backward" if direction == "backward" else "forward"  # the store's rule: never an error
        req = RunEventsQuery(
            run_id=_text("run_id", run_id), before_sequence=before_sequence, after_sequence=after_sequence,
            limit=_clamp(limit, 1, 100), direction=direction,  # type: ignore[arg-type]
            min_seq=self._token(min_seq),
        )
        return await self._fleet.request("fleetlog.runs.events", req, RunEventPage)

    async def watch(self, run_id: str) -> AsyncIterator[RunView]:
        """The run now, then every change as it is stored (e.g. a holder learns of a cancel at once)."""
        from nats.js.api import DeliverPolicy

        nc = await self._fleet.nats()
        sub = await nc.jetstream().subscribe(
            subjects.run_state(run_id), ordered_consumer=True, deliver_policy=DeliverPolicy.LAST_PER_SUBJECT
        )
        try:
            async for msg in sub.messages:
                state = _state_or_none(StoredMsg(msg.metadata.sequence.stream, msg.subject, msg.data))
                if state is not None:  # a foreign message (see `_load`) is no change of the run
                    yield run_view(state)
        finally:
            await sub.unsubscribe()


def _state_or_none(msg: StoredMsg) -> RunState | None:
    """The run's state in a lifecycle message; None for anything else stored on its subject
    (undecodable, or another subject's event)."""
    try:
        event: RunLifecycle = _lifecycle.decode(msg.data)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None
    if event.subject() != msg.subject:
        return None
    return state_at(event, msg.seq)
