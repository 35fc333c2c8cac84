"""Claiming runs: the view proposes, JetStream decides (DESIGN §3.2).

`Claimer.claim_next` asks the view for a short list of claimable runs, best first, and
publishes a claim guarded by the proposed run's lifecycle sequence: a stale proposal can
only lose its publish. Proposals are cached briefly per filter and reflect at least this
client's own writes. A claimer that has lost a race to a rival asks for *striped*
proposals for a while: the oldest candidates are cut into `STRIPES` stripes by a hash of
the run id and the claimer's own stripe comes first, so racing claimers work on different
runs instead of all reading the same head, and no claimer needs to watch the others.
docs/architecture.md has the measurements behind each choice.
"""

from __future__ import annotations

import random
import secrets
import time
from collections.abc import Callable
from typing import Any, Protocol

import msgspec
from fleetlog.schemas import RunCancelRequested, RunClaimed, RunState
from fleetlog.schemas.runs import CandidatesQuery, ClaimedRun, Proposal, Proposals, RunLifecycle, claimed_run
from fleetlog.services.backbone.errors import StaleError
from fleetlog.services.backbone.guarded import Guarded, WrongLastSequence
from fleetlog.services.client import activity
from fleetlog.services.client.runs import rules
from fleetlog.services.client.seam import FleetClient

__all__ = ["ClaimCounters", "Claimer"]

STREAM = "FLEET_RUNS"
# A claimer gives up after this many proposal lists in one call were all taken by rivals.
MAX_ROUNDS = 64
CANDIDATES_TTL_S = 0.25
# Proposals per list: a claimer takes ~30 claims from one list in its 0.25 s at 1,000 claims/s
# shared by 8 claimers.
CANDIDATES = 64
# Stripes of the oldest candidates once contended; a lost race moves the claimer to another one.
STRIPES = 64
# How long a lost race keeps a claimer striped (it goes back to the exact head after that).
CONTENDED_S = 5.0
# How long a stripe where a rival was met is avoided.
BUSY_S = 2.0
# Picks among this many of the head of its stripe, so two claimers on one stripe rarely collide.
SPREAD = 8
# Bound on the remembered run sequences (forgetting only costs a lost race).
MAX_REMEMBERED = 100_000

_state = msgspec.json.Decoder(RunState).decode


class ClaimCounters(msgspec.Struct):
    """How claiming went for this client: for benches, tests and dashboards."""

    claims: int = 0
    conflicts: int = 0  # guarded publishes that lost the race
    fetches: int = 0  # proposal lists asked of the view
    stale_candidates: int = 0  # proposals skipped because a newer lifecycle message was known


class RunLedger(Protocol):
    """What a claimer needs of the runs API (`RunsAPI`): its clock, client and guarded lifecycle I/O."""

    _fleet: FleetClient
    clock: Callable[[], float]

    async def _guarded(self) -> Guarded: ...

    async def _read(self, g: Guarded, run_id: str) -> tuple[RunState, int] | None: ...

    async def _write(
        self, g: Guarded, cls: type[RunLifecycle], state: RunState, expected: int, *,
        runtime_id: str | None = None, reason: str | None = None,
    ) -> int: ...


class _ProposalCache(msgspec.Struct):
    items: list[Proposal]
    stripe: int | None
    fetched_at: float  # time.monotonic()
    fetched_now: float  # the API's clock: leases may have expired since

    def expired(self, now: float) -> bool:
        return max(time.monotonic() - self.fetched_at, now - self.fetched_now) > CANDIDATES_TTL_S


class Claimer:
    """One client's claiming: its proposal cache, the run sequences it knows, its counters."""

    def __init__(self, api: RunLedger) -> None:
        self._api = api
        # Highest sequence of this client's writes that can make a run claimable (create, release,
        # finalize, expire, renew): proposals must reflect it.
        self._proposals_seq = 0
        # Highest sequence of any of its writes, claims included: proposals wait for it unless
        # the view is far behind (a list that has the client's own claims also has every rival
        # claim stored before them).
        self._last_write = 0
        self._cache: dict[tuple[Any, ...], _ProposalCache] = {}
        self.counters = ClaimCounters()
        self._stripe: int | None = None  # set while contended
        self._contended_until = 0.0  # time.monotonic()
        self._salt = 0  # orders the other stripes after the own one (CandidatesQuery.stripe)
        self._busy: dict[int, float] = {}  # stripe -> when a rival was last met there
        # run_id -> the latest lifecycle sequence this client wrote or was told of by JetStream:
        # a proposal older than that is stale: the run is re-read rather than trusted.
        self._known: dict[str, int] = {}
        self._my_claims: set[str] = set()  # token hashes of this client's claims (bounded)

    def wrote(self, cls: type[RunLifecycle], run_id: str, seq: int) -> None:
        """This client stored a lifecycle event. Unless it was a claim or a cancel request it may
        have made a run claimable (a renew may shorten a lease), so propose afresh."""
        self._remember(run_id, seq)
        self._last_write = max(self._last_write, seq)
        if cls not in (RunClaimed, RunCancelRequested):
            self._cache.clear()
            self._proposals_seq = seq

    def _remember(self, run_id: str, seq: int) -> None:
        if len(self._known) > MAX_REMEMBERED:
            self._known.clear()
        if seq > self._known.get(run_id, 0):
            self._known[run_id] = seq

    def _lost_to_rival(self, lost: Proposal) -> None:
        """A rival claimed what this client tried: work on another stripe, one where no rival
        was met lately (the rival works in the stripe of the run it took)."""
        now = time.monotonic()
        self._contended_until = now + CONTENDED_S
        if self._stripe is not None:
            self._busy[lost.stripe] = now
        free = [k for k in range(STRIPES) if now - self._busy.get(k, -BUSY_S) >= BUSY_S]
        self._stripe = random.choice(free) if free else random.randrange(STRIPES)
        self._salt = random.randrange(2**31)

    async def claim_next(self, runtime_id: str, flt: rules.ClaimFilter, lease_s: float) -> ClaimedRun | None:
        """Claim the best eligible run (priority desc, then creation order), or None if there is none."""
        api = self._api
        key = (runtime_id, flt)
        g = await api._guarded()
        need_seq = 0  # stream sequences this call learnt of (lost races, skipped proposals)
        fetches = 0
        while True:
            if self._stripe is not None and time.monotonic() > self._contended_until:
                self._stripe = None  # uncontended again: back to the exact order
            cache = self._cache.get(key)
            if cache is None or not cache.items or cache.stripe != self._stripe or cache.expired(api.clock()):
                if fetches == MAX_ROUNDS:
                    break
                fetches += 1
                cache = await self._fetch(key, flt, need_seq)
                if not cache.items:
                    return None
            pick = _pick(cache.items, spread=self._stripe is not None)
            known = self._known.get(pick.run_id, 0)
            state_now: RunState | None = None
            seq_now = pick.state_seq
            if known > pick.state_seq:
                # Its lifecycle moved since it was proposed (our own claim or cancel request, or a
                # race we lost): the next proposals wait until the view has folded that far, and
                # this one is re-read below, not skipped: it may still be the best claimable run
                # (skipping it claimed a younger run first: a priority inversion the model test found).
                self.counters.stale_candidates += 1
                need_seq = max(need_seq, known)
            else:
                state_now = _state(pick.state)  # decoded only now: most lists are not used up
            for _attempt in range(MAX_ROUNDS):
                if state_now is None:  # re-read it: it may still be the best claimable run
                    fresh = await api._read(g, pick.run_id)
                    if fresh is None:
                        break
                    state_now, seq_now = fresh
                    self._remember(pick.run_id, seq_now)
                    rival = state_now.claim_token_sha256
                    if rival is not None and rival not in self._my_claims:
                        self._lost_to_rival(pick)  # a rival claimer, not just our own stale proposal
                now = api.clock()
                if not rules.claimable(state_now, runtime_id, now, flt):
                    break
                token = secrets.token_urlsafe(32)
                state = rules.claim(state_now, runtime_id, lease_s, now, token)
                if len(self._my_claims) > MAX_REMEMBERED:
                    self._my_claims.clear()
                self._my_claims.add(state.claim_token_sha256 or "")
                try:
                    fence = await api._write(g, RunClaimed, state, seq_now, runtime_id=runtime_id)
                except WrongLastSequence as exc:
                    self.counters.conflicts += 1
                    activity.count(activity.LOST_RACES, "claim")
                    need_seq = max(need_seq, _actual_seq(exc))
                    state_now = None
                    continue
                self.counters.claims += 1
                activity.count(activity.CLAIMS)
                return claimed_run(msgspec.structs.replace(state, fence=fence), token)
        raise TimeoutError(f"claim_next: rivals took every proposal in {MAX_ROUNDS} rounds (heavy contention)")

    async def _fetch(self, key: tuple[Any, ...], flt: rules.ClaimFilter, need_seq: int) -> _ProposalCache:
        """Proposals that reflect this client's writes and what it learnt from lost races (a list
        that lacks them only wastes picks and races); if the view is too far behind for that,
        ones that reflect at least the writes that can have made runs claimable."""
        api = self._api
        runtime_id = key[0]
        wanted = max(need_seq, self._proposals_seq, self._last_write)
        req = CandidatesQuery(
            runtime_id=runtime_id, now=api.clock(), queue=flt.queue, runner_ids=sorted(flt.runner_ids) or None,
            conversation_id=flt.conversation_id, bot_id=flt.bot_id, workspace_id=flt.workspace_id,
            thread_id=flt.thread_id, strict_thread=flt.strict_thread, limit=CANDIDATES,
            min_seq={STREAM: wanted} if wanted else None,
            stripe=None if self._stripe is None else (self._stripe, STRIPES, self._salt),
        )
        try:
            answer = await api._fleet.request("fleetlog.runs.candidates", req, Proposals)
        except StaleError:
            if wanted <= self._proposals_seq:
                raise
            needed = self._proposals_seq
            req = msgspec.structs.replace(req, min_seq={STREAM: needed} if needed else None)
            answer = await api._fleet.request("fleetlog.runs.candidates", req, Proposals)
        self.counters.fetches += 1
        if self._stripe is not None and answer.items:
            self._stripe = answer.items[0].stripe  # own stripe used up: adopt the one it spilled into
        cache = self._cache[key] = _ProposalCache(answer.items, self._stripe, time.monotonic(), req.now)
        return cache


def _pick(items: list[Proposal], spread: bool) -> Proposal:
    """Take the head; while contended, one of the first few of the head's priority (so two
    claimers given the same stripe rarely pick the same run)."""
    if not spread:
        return items.pop(0)
    top = items[0].priority
    width = 1
    while width < min(len(items), SPREAD) and items[width].priority == top:
        width += 1
    return items.pop(random.randrange(width))


def _actual_seq(exc: WrongLastSequence) -> int:
    """JetStream says `wrong last sequence: N`: the view must fold N to stop proposing this run."""
    text = str(exc).rsplit(":", 1)[-1].strip()
    return int(text) if text.isdigit() else 0
