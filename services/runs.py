"""The run ledger's client API: `fleet.runs.*`.

Commands (create, claim_next, renew, release, release_expired, finalize,
request_cancel, append_event) are guarded: read the run's last lifecycle message
(direct get), apply `run_rules`, publish with the expected last subject sequence.
JetStream lets exactly one concurrent writer win; the others re-read and retry,
or move on to the next candidate. The view only proposes claim candidates.

Reads of the view (list, events, stats) wait for this client's own commands by
default (session consistency); `get` reads the stream itself and is always fresh.
"""

from __future__ import annotations

import random
import secrets
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
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
    parse_ts,
    subjects,
)
from fleetlog.schemas.runs import (
    Candidate,
    Candidates,
    CandidatesQuery,
    Claim,
    ExpiredQuery,
    MaxSequence,
    MaxSequenceQuery,
    RunEventPage,
    RunEventsQuery,
    RunEventView,
    RunLifecycle,
    RunPage,
    RunsListQuery,
    RunStats,
    RunStatsQuery,
    RunView,
    run_view,
    state_at,
)

from . import run_rules as rules
from .errors import FleetValidationError
from .guarded import Guarded, StoredMsg, WrongLastSequence
from .publisher import Receipt, Token
from .timeparse import parse_since

if TYPE_CHECKING:
    from .client import Fleet

__all__ = ["ClaimCounters", "RunsAPI"]

STREAM = "FLEET_RUNS"
_lifecycle = msgspec.json.Decoder(
    RunCreated | RunClaimed | RunRenewed | RunReleased | RunLeaseExpired | RunFinalized | RunCancelRequested
)
_run_event = msgspec.json.Decoder(RunEventAppended)


class _ClaimedState(msgspec.Struct):
    run_id: str
    dispatch_attempts: int = 0
    lease_expires_at: float | None = None  # None unless held
    claim_token_sha256: str | None = None


class _ClaimSeen(msgspec.Struct):
    state: _ClaimedState


_claim_seen = msgspec.json.Decoder(_ClaimSeen).decode  # three fields of a claim; the rest is skipped
# A command re-reads and retries after losing a race; this many losses in a row means something is wrong.
MAX_RETRIES = 64
CANDIDATES_TTL_S = 0.25
# Proposals per fetch: wide enough that racing claimers, picking at random within the top
# priority, rarely pick the same run (measured: 32 gave ~6 lost races per claim with 8 claimers).
CANDIDATES = 256

# Aliases: inside RunsAPI the name `list` is the list() method.
_Strs = list[str] | None
_Refs = list[Any] | None
_Views = list[RunView]


class ClaimCounters(msgspec.Struct):
    """How claiming went for this client: for benches, tests and dashboards."""

    claims: int = 0
    conflicts: int = 0  # guarded publishes that lost the race
    fetches: int = 0  # candidate lists asked of the view
    stale_candidates: int = 0  # proposals the claimer's own check refused


class _CandidateCache(msgspec.Struct):
    items: list[Candidate]
    fetched_at: float  # time.monotonic()
    fetched_now: float  # the API's clock: leases may have expired since

    def expired(self, now: float) -> bool:
        return max(time.monotonic() - self.fetched_at, now - self.fetched_now) > CANDIDATES_TTL_S


def _text(field: str, value: Any, *, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise FleetValidationError(field, f"must be a non-empty string, got {value!r}")
    return value


def _dict(field: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise FleetValidationError(field, f"must be a dict, got {type(value).__name__}")
    return value


def _clamp(value: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, int(value)))


class RunsAPI:
    def __init__(self, fleet: Fleet, clock: Callable[[], float] = time.time) -> None:
        self._fleet = fleet
        self.clock = clock  # injectable: tests drive lease expiry without sleeping
        self._seen = 0  # highest FLEET_RUNS sequence this client wrote: reads wait for it
        # Highest sequence of this client's writes that can make a run claimable (create, release,
        # finalize, expire): proposals wait for it. Its own claims only remove candidates, so
        # proposals need not wait for those (a stale proposal just loses its guarded publish).
        self._proposals_seq = 0
        self._cache: dict[tuple[Any, ...], _CandidateCache] = {}
        self.counters = ClaimCounters()
        self._contended = False  # the last claim_next lost a race
        self._watching = False
        # run_id -> (stream sequence of its latest lifecycle message, lease end if a rival holds it)
        self._moved: dict[str, tuple[int, float | None]] = {}
        self._my_claims: set[str] = set()  # token hashes of this client's claims (bounded)

    # -- plumbing ------------------------------------------------------------------
    async def _guarded(self) -> Guarded:
        return Guarded(await self._fleet.nats())

    def _note(self, seq: int) -> None:
        self._seen = max(self._seen, seq)

    def _token(self, min_seq: Token | Receipt | None) -> dict[str, int] | None:
        if isinstance(min_seq, Receipt):
            return min_seq.token
        if min_seq is not None:
            return dict(min_seq)
        return {STREAM: self._seen} if self._seen else None

    async def _read(self, g: Guarded, run_id: str) -> tuple[RunState, int] | None:
        msg = await g.last(STREAM, subjects.run_state(run_id))
        if msg is None:
            return None
        return _state_of(msg), msg.seq

    async def _write(
        self, g: Guarded, cls: type[RunLifecycle], state: RunState, expected: int, *,
        runtime_id: str | None = None, reason: str | None = None,
    ) -> int:
        event = cls(id=new_event_id(), ts=now_iso(), state=state, runtime_id=runtime_id, reason=reason)
        _, seq, _ = await g.publish(event.subject(), encode_event(event), msg_id=event.id, expected_last_seq=expected)
        self._note(seq)
        if cls not in (RunClaimed, RunCancelRequested):
            # This client may have made a run claimable (a renew may shorten a lease): propose afresh.
            self._cache.clear()
            self._proposals_seq = seq
        return seq

    # -- commands ------------------------------------------------------------------
    async def create(
        self, run_id: str, runner_id: str, status: str = "running", *, queue: str | None = None,
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
            run_id, runner_id, status, self.clock(), queue=queue, priority=priority,
            requested_runtime_id=requested_runtime_id, conversation_id=conversation_id, thread_id=thread_id,
            workspace_id=workspace_id, bot_id=bot_id, agent_id=agent_id, binding_id=binding_id,
            event_id=event_id, deadline_at=deadline_at, authorization=authorization,
            metadata=_dict("metadata", metadata),
        )
        g = await self._guarded()
        current = await self._read(g, run_id)
        if current is None:
            try:
                await self._write(g, RunCreated, state, 0)
                return run_view(state)
            except WrongLastSequence:
                current = await self._read(g, run_id)  # created concurrently: theirs stands
        assert current is not None
        self._note(current[1])
        return run_view(current[0])

    async def get(self, run_id: str) -> RunView | None:
        """The run as its last lifecycle message says (read from the stream: always fresh)."""
        current = await self._read(await self._guarded(), _text("run_id", run_id))
        return None if current is None else run_view(current[0])

    async def claim_next(
        self, runtime_id: str, queue: str | None = None, lease_s: float = 60, *,
        runner_ids: _Strs = None, conversation_id: str | None = None, bot_id: str | None = None,
        workspace_id: str | None = None, thread_id: str | None = None, strict_thread: bool = False,
    ) -> Claim | None:
        """Claim the best eligible run (priority desc, then creation order), or None if there is none."""
        _text("runtime_id", runtime_id)
        flt = rules.ClaimFilter(queue, rules.runner_filter(runner_ids), conversation_id, bot_id, workspace_id,
                                thread_id, strict_thread)
        key = (runtime_id, flt)
        g = await self._guarded()
        if not self._watching:
            await self._watch_lifecycles(g)
        need_seq = 0  # how far the view must have folded to stop proposing what we skipped
        lost = 0  # races lost to rivals in this call
        fetches = 0
        useless = False  # the last proposals were all taken: wait for the view before asking again
        while True:
            cache = self._cache.get(key)
            if cache is None or not cache.items or cache.expired(self.clock()):
                if fetches == MAX_RETRIES:
                    break
                fetches += 1
                cache = await self._fetch(key, flt, need_seq if useless else 0)
                useless = True
                if not cache.items:
                    return None
            pick = _pick(cache.items, spread=lost > 0 or self._contended)
            state_now: RunState | None = pick.state
            seq_now = pick.state_seq
            moved, rival_lease = self._moved.get(pick.state.run_id, (0, None))
            if moved > seq_now:
                # Its lifecycle moved since it was proposed; the next proposals wait until the view
                # has folded that far. Claimed by a rival whose lease runs: skip it without a round
                # trip. Anything else: look at the run itself (it may still be the best one).
                self.counters.stale_candidates += 1
                need_seq = max(need_seq, moved)
                if rival_lease is not None and rival_lease > self.clock():
                    lost += 1
                    continue
                state_now = None
            useless = False
            for _attempt in range(MAX_RETRIES):
                if state_now is None:  # re-read it: it may still be the best claimable run
                    fresh = await self._read(g, pick.state.run_id)
                    if fresh is None:
                        break
                    state_now, seq_now = fresh
                    rival = state_now.claim_token_sha256
                    if rival is not None and rival not in self._my_claims:
                        lost += 1  # a rival claimer, not just our own stale proposal: spread out
                now = self.clock()
                if not rules.claimable(state_now, runtime_id, now, flt):
                    break
                token = secrets.token_urlsafe(32)
                state = rules.claim(state_now, runtime_id, lease_s, now, token)
                if len(self._my_claims) > 100_000:
                    self._my_claims.clear()
                self._my_claims.add(state.claim_token_sha256 or "")
                try:
                    fence = await self._write(g, RunClaimed, state, seq_now, runtime_id=runtime_id)
                except WrongLastSequence as exc:
                    self.counters.conflicts += 1
                    need_seq = max(need_seq, _actual_seq(exc))
                    state_now = None
                    continue
                self.counters.claims += 1
                self._contended = lost > 0
                return Claim(run=run_view(msgspec.structs.replace(state, fence=fence)), claim_token=token,
                             fence=fence)
        raise TimeoutError(f"claim_next: rivals took every proposal in {MAX_RETRIES} rounds (heavy contention)")

    async def _watch_lifecycles(self, g: Guarded) -> None:
        """Follow every run's lifecycle sequence with an ordered consumer (new messages only).
        A rival's claim arrives here within milliseconds, long before the view folds it, so a
        claimer rarely publishes into a race it has already lost (measured in an 8-process race:
        0.025 lost races per claim, against 0.3 with a plain subscription comparing counters)."""
        from nats.js.api import DeliverPolicy

        moved, mine = self._moved, self._my_claims

        async def on_message(msg: Any) -> None:
            state = _claim_seen(msg.data).state
            if len(moved) > 200_000:
                moved.clear()  # bounded; forgetting only costs a lost race
            rival = state.claim_token_sha256 is not None and state.claim_token_sha256 not in mine
            moved[state.run_id] = (msg.metadata.sequence.stream, state.lease_expires_at if rival else None)

        self._watching = True
        await g.nc.jetstream().subscribe(
            "fleet.run.*.state", cb=on_message, ordered_consumer=True, deliver_policy=DeliverPolicy.NEW
        )

    async def _fetch(self, key: tuple[Any, ...], flt: rules.ClaimFilter, need_seq: int) -> _CandidateCache:
        runtime_id = key[0]
        wait = max(need_seq, self._proposals_seq)
        token = {STREAM: wait} if wait else None
        req = CandidatesQuery(
            runtime_id=runtime_id, now=self.clock(), queue=flt.queue, runner_ids=sorted(flt.runner_ids) or None,
            conversation_id=flt.conversation_id, bot_id=flt.bot_id, workspace_id=flt.workspace_id,
            thread_id=flt.thread_id, strict_thread=flt.strict_thread, limit=CANDIDATES, min_seq=token,
        )
        answer = await self._fleet.request("fleetlog.runs.candidates", req, Candidates)
        self.counters.fetches += 1
        cache = self._cache[key] = _CandidateCache(answer.items, time.monotonic(), req.now)
        return cache

    async def renew(
        self, run_id: str, claim_token: str, lease_s: float = 60, runtime_id: str | None = None
    ) -> RunView | None:
        """Extend the lease; None unless claimed by this token (and runtime) with a live lease.

        The returned run's `cancel_requested` tells the holder an operator asked it to stop.
        """
        g = await self._guarded()
        for _ in range(MAX_RETRIES):
            current = await self._read(g, run_id)
            if current is None:
                return None
            state = rules.renew(current[0], claim_token, lease_s, self.clock(), runtime_id)
            if state is None:
                return None
            try:
                await self._write(g, RunRenewed, state, current[1], runtime_id=runtime_id)
            except WrongLastSequence:
                continue
            return run_view(state)
        raise TimeoutError(f"renew {run_id!r}: lost {MAX_RETRIES} races in a row")

    async def release(
        self, run_id: str, claim_token: str, status: str = "queued", reason: str | None = None,
        runtime_id: str | None = None,
    ) -> RunView | None:
        """Give the claim up (default back to queued); None unless held by this token with a live lease."""
        rules.check_status(status)
        g = await self._guarded()
        for _ in range(MAX_RETRIES):
            current = await self._read(g, run_id)
            if current is None:
                return None
            state = rules.release(current[0], claim_token, status, reason, self.clock(), runtime_id)
            if state is None:
                return None
            try:
                await self._write(g, RunReleased, state, current[1], runtime_id=runtime_id, reason=reason)
            except WrongLastSequence:
                continue
            return run_view(state)
        raise TimeoutError(f"release {run_id!r}: lost {MAX_RETRIES} races in a row")

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
                await self._write(g, RunLeaseExpired, state, cand.state_seq, reason="claim lease expired")
            except WrongLastSequence:
                continue  # renewed, released or expired by another sweeper meanwhile
            released.append(run_view(state))
        return released

    async def finalize(
        self, run_id: str, status: str, reason: str | None = None, usage: dict[str, Any] | None = None,
        cost: float | None = None, metadata: dict[str, Any] | None = None, *,
        claim_token: str | None = None, fence: int | None = None, runtime_id: str | None = None,
    ) -> RunView | None:
        """Set the run's status; terminal statuses set finished_at once and clear the claim."""
        rules.check_status(status)
        g = await self._guarded()
        for _ in range(MAX_RETRIES):
            current = await self._read(g, run_id)
            if current is None:
                return None
            rules.check_holder(current[0], claim_token, fence, runtime_id, "finalize")
            state = rules.finalize(current[0], status, self.clock(), reason, usage, cost, metadata)
            try:
                await self._write(g, RunFinalized, state, current[1], runtime_id=runtime_id, reason=reason)
            except WrongLastSequence:
                continue
            return run_view(state)
        raise TimeoutError(f"finalize {run_id!r}: lost {MAX_RETRIES} races in a row")

    async def request_cancel(self, run_id: str, reason: str | None = None) -> RunView | None:
        """Ask the holder to stop: sets cancel_requested_at and records `admin.run_cancel`."""
        g = await self._guarded()
        for _ in range(MAX_RETRIES):
            current = await self._read(g, run_id)
            if current is None:
                return None
            state = rules.request_cancel(current[0], self.clock())
            try:
                await self._write(g, RunCancelRequested, state, current[1], reason=reason)
            except WrongLastSequence:
                continue
            await self.append_audit_event(run_id, "admin.run_cancel", {"reason": reason})
            return run_view(state)
        raise TimeoutError(f"request_cancel {run_id!r}: lost {MAX_RETRIES} races in a row")

    # -- result events ---------------------------------------------------------------
    def _event(
        self, run_id: str, sequence: int, type: str, data: Any, usage: Any, source: str, artifact_refs: Any,
        metadata: Any, fence: int | None,
    ) -> RunEventAppended:
        _text("run_id", run_id)
        if isinstance(sequence, bool) or not isinstance(sequence, int) or sequence < 0:
            raise FleetValidationError("sequence", f"must be an integer >= 0, got {sequence!r}")
        _text("type", type)
        if usage is not None and not isinstance(usage, dict):
            raise FleetValidationError("usage", f"must be a dict or None, got {type_name(usage)}")
        if artifact_refs is not None and not isinstance(artifact_refs, list):
            raise FleetValidationError("artifact_refs", f"must be a list, got {type_name(artifact_refs)}")
        return RunEventAppended(
            id=new_event_id(), ts=now_iso(), run_id=run_id, sequence=sequence, event_type=type,
            data=_dict("data", data), usage=usage, source=_text("source", source),
            artifact_refs=list(artifact_refs or []), metadata=_dict("metadata", metadata), fence=fence,
        )

    async def append_event(
        self, run_id: str, sequence: int, type: str, data: dict[str, Any] | None = None,
        usage: dict[str, Any] | None = None, source: str = "runner", artifact_refs: _Refs = None,
        metadata: dict[str, Any] | None = None, *, claim_token: str | None = None, fence: int | None = None,
    ) -> RunEventView | None:
        """Store a result event; idempotent on (run_id, sequence): a duplicate returns the stored one.

        While the run is claimed only its holder may append. The publish is guarded by the
        run's lifecycle sequence, so a claim that changes hands meanwhile refuses it.
        None for an unknown run.
        """
        draft = self._event(run_id, sequence, type, data, usage, source, artifact_refs, metadata, None)
        g = await self._guarded()
        state_subject = subjects.run_state(run_id)
        for _ in range(MAX_RETRIES):
            current = await self._read(g, run_id)
            if current is None:
                return None
            state, state_seq = current
            if source != "host":
                rules.check_holder(state, claim_token, fence, None, "append to")
            fence_now = state.fence if rules.held(state) else None
            event = msgspec.structs.replace(draft, id=new_event_id(), fence=fence_now)
            try:
                _, seq, _ = await g.publish(
                    event.subject(), encode_event(event), msg_id=event.id,
                    expected_last_seq=state_seq, expected_subject=state_subject,
                )
            except WrongLastSequence:
                continue  # the run's lifecycle moved: re-check who holds it
            self._note(seq)
            first = await g.first(STREAM, event.subject())
            if first is not None and first.seq != seq:
                return _event_view(first)  # (run_id, sequence) was taken: the first write stands
            return _event_view(StoredMsg(seq, event.subject(), encode_event(event)))
        raise TimeoutError(f"append_event {run_id!r}: lost {MAX_RETRIES} races in a row")

    def emit_event(
        self, run_id: str, sequence: int, type: str, data: dict[str, Any] | None = None,
        usage: dict[str, Any] | None = None, source: str = "runner", artifact_refs: _Refs = None,
        metadata: dict[str, Any] | None = None, *, fence: int | None = None,
    ) -> Receipt:
        """Fire-and-forget `append_event` for a holder's hot path: never blocks.

        Pass the claim's `fence`: the view refuses (to rejects, with the reason) a runner
        event whose fence is not the run's current claim at its stream position.
        """
        return self._fleet.emit(self._event(run_id, sequence, type, data, usage, source, artifact_refs,
                                            metadata, fence))

    async def append_audit_event(
        self, run_id: str, type: str, data: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None,
    ) -> RunEventView | None:
        """A host event at sequence max + 1; concurrent appends never share a sequence. None if no such run."""
        g = await self._guarded()
        if await self._read(g, run_id) is None:
            return None
        last = await g.last(STREAM, subjects.run_events(run_id))
        hint = -1
        if last is not None:
            hint = _run_event.decode(last.data).sequence
            token = {STREAM: max(last.seq, self._seen)}
            answer = await self._fleet.request(
                "fleetlog.runs.max_sequence", MaxSequenceQuery(run_id=run_id, min_seq=token), MaxSequence
            )
            hint = max(hint, answer.sequence if answer.sequence is not None else -1)
        sequence = hint + 1
        for _ in range(MAX_RETRIES * 16):
            event = self._event(run_id, sequence, type, data, None, "host", None, metadata, None)
            try:
                _, seq, _ = await g.publish(event.subject(), encode_event(event), msg_id=event.id, expected_last_seq=0)
            except WrongLastSequence:
                sequence += 1  # taken meanwhile: the next one
                continue
            self._note(seq)
            return _event_view(StoredMsg(seq, event.subject(), encode_event(event)))
        raise TimeoutError(f"append_audit_event {run_id!r}: no free sequence found")

    # -- reads of the view -----------------------------------------------------------
    async def list(
        self, conversation_id: str | None = None, statuses: _Strs = None, runner_id: str | None = None,
        bot_id: str | None = None, workspace_id: str | None = None, thread_id: str | None = None,
        strict_thread: bool = False, before_id: str | None = None, limit: int = 50, *,
        min_seq: Token | Receipt | None = None,
    ) -> RunPage:
        """Runs newest first: items, next_cursor (pass as before_id), has_more, total_count."""
        for s in statuses or ():
            rules.check_status(s, "statuses")
        req = RunsListQuery(
            conversation_id=conversation_id, statuses=list(statuses) if statuses else None,  # type: ignore[arg-type]
            runner_id=runner_id, bot_id=bot_id, workspace_id=workspace_id, thread_id=thread_id,
            strict_thread=strict_thread, before_id=before_id, limit=_clamp(limit, 1, 100),
            min_seq=self._token(min_seq),
        )
        return await self._fleet.request("fleetlog.runs.list", req, RunPage)

    async def events(
        self, run_id: str, before_sequence: int | None = None, after_sequence: int | None = None, limit: int = 50,
        direction: str = "forward", *, min_seq: Token | Receipt | None = None,
    ) -> RunEventPage:
        """A run's result events; bounds exclusive; forward (ascending) or backward."""
        if direction not in ("forward", "backward"):
            raise FleetValidationError("direction", f"must be 'forward' or 'backward', got {direction!r}")
        req = RunEventsQuery(
            run_id=_text("run_id", run_id), before_sequence=before_sequence, after_sequence=after_sequence,
            limit=_clamp(limit, 1, 100), direction=direction,  # type: ignore[arg-type]
            min_seq=self._token(min_seq),
        )
        return await self._fleet.request("fleetlog.runs.events", req, RunEventPage)

    async def stats(
        self, since: float | str | datetime | None = None, until: float | str | datetime | None = None,
        runner_id: str | None = None, *, min_seq: Token | Receipt | None = None,
    ) -> RunStats:
        """Counts per status, success rates per runner, throughput, durations (avg, p50/p95/p99), queue wait.

        `since`/`until`: epoch seconds, a datetime, ISO-8601 text, or relative (`24h`, `7d`).
        """
        req = RunStatsQuery(since=_epoch_or_none("since", since), until=_epoch_or_none("until", until),
                            runner_id=runner_id, min_seq=self._token(min_seq))
        return await self._fleet.request("fleetlog.runs.stats", req, RunStats)

    async def watch(self, run_id: str) -> AsyncIterator[RunView]:
        """The run now, then every change as it is stored (e.g. a holder learns of a cancel at once)."""
        from nats.js.api import DeliverPolicy

        nc = await self._fleet.nats()
        sub = await nc.jetstream().subscribe(
            subjects.run_state(run_id), ordered_consumer=True, deliver_policy=DeliverPolicy.LAST_PER_SUBJECT
        )
        try:
            async for msg in sub.messages:
                yield run_view(_state_of(StoredMsg(msg.metadata.sequence.stream, msg.subject, msg.data)))
        finally:
            await sub.unsubscribe()


def _epoch_or_none(field: str, value: float | str | datetime | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    text = parse_since(value)  # type: ignore[arg-type]
    if text is None:
        raise FleetValidationError(field, f"must be epoch seconds, a datetime, ISO-8601 or relative, got {value!r}")
    return parse_ts(text).timestamp()


def type_name(value: Any) -> str:
    return type(value).__name__


def _state_of(msg: StoredMsg) -> RunState:
    event: RunLifecycle = _lifecycle.decode(msg.data)
    return state_at(event, msg.seq)


def _event_view(msg: StoredMsg) -> RunEventView:
    e = _run_event.decode(msg.data)
    return RunEventView(
        run_id=e.run_id, sequence=e.sequence, type=e.event_type, data=e.data, usage=e.usage, source=e.source,
        artifact_refs=e.artifact_refs, metadata=e.metadata, created_at=int(parse_ts(e.ts).timestamp()),
        fence=e.fence,
    )


def _pick(items: list[Candidate], spread: bool) -> Candidate:
    """Take the head; once a race was lost, a random one of the head's priority (claimers spread out)."""
    if not spread:
        return items.pop(0)
    top = items[0].state.priority
    width = 1
    while width < len(items) and items[width].state.priority == top:
        width += 1
    return items.pop(random.randrange(width))


def _actual_seq(exc: WrongLastSequence) -> int:
    """JetStream says `wrong last sequence: N`: the view must fold N to stop proposing this run."""
    text = str(exc).rsplit(":", 1)[-1].strip()
    return int(text) if text.isdigit() else 0
