"""Stateful property test: random interleavings of run commands against a pure in-memory model.

Every command's answer is checked against the model as it happens; the view (list + events)
is compared with the model at the end of each example; finally a second projector, folding
the same stream from sequence 1, must produce tables identical to the live ones.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
from fleetlog.services.backbone.errors import StaleHolderError
from fleetlog.services.node.server import Server
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from fleetlog import FleetSettings, FleetSync

TERMINAL = {"completed", "failed", "cancelled", "timeout"}
RUN_IDS = ("a", "b", "c", "d")
RUNTIMES = ("rt1", "rt2", "rt3")
_examples = itertools.count()


class Clock:
    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class MRun:
    """The model of one run: only what the rules say, nothing borrowed from the implementation."""

    status: str
    priority: int
    order: int
    created_at: int
    started_at: int | None = None
    finished_at: int | None = None
    holder: str | None = None
    token: str | None = None
    fence: int | None = None
    lease_until: float | None = None
    attempts: int = 0
    cancel_at: int | None = None
    reason: str | None = None
    stale_tokens: list[tuple[str, int]] = field(default_factory=list)
    events: dict[int, tuple[str, dict[str, Any], str]] = field(default_factory=dict)


class RunLedgerMachine(RuleBasedStateMachine):
    fleet: FleetSync
    clock: Clock

    def __init__(self) -> None:
        super().__init__()
        self.ex = f"ex{next(_examples)}"
        self.model: dict[str, MRun] = {}
        self.order = itertools.count()
        self.clock.now += 10_000  # examples never see each other's leases

    def rid(self, name: str) -> str:
        return f"{self.ex}-{name}"

    @property
    def now(self) -> float:
        return self.clock.now

    # -- commands --------------------------------------------------------------
    @initialize(priorities=st.lists(st.integers(0, 2), min_size=len(RUN_IDS), max_size=len(RUN_IDS)))
    def start_with_queued_runs(self, priorities: list[int]) -> None:
        for name, priority in zip(RUN_IDS[:3], priorities, strict=False):
            self.create(name, "queued", priority)

    @rule(name=st.sampled_from(RUN_IDS), status=st.sampled_from(["queued", "queued", "running"]),
          priority=st.integers(0, 2))
    def create(self, name: str, status: str, priority: int) -> None:
        view = self.fleet.runs.create(self.rid(name), "runner", status=status, priority=priority,
                                      conversation_id=self.ex)
        if name not in self.model:
            t = int(self.now)
            self.model[name] = MRun(status, priority, next(self.order), t, t if status == "running" else None)
        m = self.model[name]
        assert view.status == m.status and view.priority == m.priority

    def _eligible(self) -> list[str]:
        names = [n for n, m in self.model.items()
                 if m.status == "queued" or (m.token is not None and self.now >= (m.lease_until or 0))]
        return sorted(names, key=lambda n: (-self.model[n].priority, self.model[n].order))

    @rule(runtime=st.sampled_from(RUNTIMES), lease=st.sampled_from([1, 5, 30]))
    def claim(self, runtime: str, lease: int) -> None:
        expected = self._eligible()
        claim = self.fleet.runs.claim_next(runtime, lease_s=lease, conversation_id=self.ex)
        if not expected:
            assert claim is None
            return
        assert claim is not None and claim.run_id == self.rid(expected[0])
        m = self.model[expected[0]]
        if m.token is not None:
            m.stale_tokens.append((m.token, m.fence or 0))
        assert m.fence is None or claim.fence > m.fence  # fencing tokens only grow
        m.status, m.holder, m.token, m.fence = "claimed", runtime, claim.claim_token, claim.fence
        m.lease_until, m.attempts = self.now + lease, m.attempts + 1

    def _creds(self, m: MRun | None, which: str) -> tuple[str | None, int | None]:
        if m is None or which == "none":
            return None, None
        if which == "holder":
            return m.token, None
        if which == "fence":
            return None, m.fence
        return (m.stale_tokens[-1][0], None) if m.stale_tokens else ("not-a-token", None)

    def _holds(self, m: MRun, token: str | None, fence: int | None) -> bool:
        if m.token is None:
            return False
        return token == m.token if token is not None else fence is not None and fence == m.fence

    def _check_holder(self, m: MRun, token: str | None, fence: int | None) -> bool:
        if token is None and fence is None:
            return m.token is None
        return self._holds(m, token, fence)

    @rule(name=st.sampled_from(RUN_IDS), which=st.sampled_from(["holder", "stale"]), lease=st.sampled_from([1, 30]))
    def renew(self, name: str, which: str, lease: int) -> None:
        m = self.model.get(name)
        token = self._creds(m, which)[0] or "not-a-token"
        view = self.fleet.runs.renew(self.rid(name), token, lease)
        ok = m is not None and self._holds(m, token, None) and self.now < (m.lease_until or 0)
        assert (view is not None) == ok
        if ok:
            assert m is not None
            m.lease_until = self.now + lease

    def _unclaim(self, m: MRun) -> None:
        if m.token is not None:
            m.stale_tokens.append((m.token, m.fence or 0))
        m.holder = m.token = None
        m.lease_until = None

    def _set_status(self, m: MRun, status: str) -> None:
        m.status = status
        if status == "running" and m.started_at is None:
            m.started_at = int(self.now)
        if status in TERMINAL and m.finished_at is None:
            m.finished_at = int(self.now)

    @rule(name=st.sampled_from(RUN_IDS), which=st.sampled_from(["holder", "stale"]),
          status=st.sampled_from(["queued", "failed", "running"]))
    def release(self, name: str, which: str, status: str) -> None:
        m = self.model.get(name)
        token = self._creds(m, which)[0] or "not-a-token"
        view = self.fleet.runs.release(self.rid(name), token, status=status)
        ok = m is not None and self._holds(m, token, None) and self.now < (m.lease_until or 0)
        assert (view is not None) == ok
        if ok:
            assert m is not None
            self._unclaim(m)
            self._set_status(m, status)
            m.reason = None  # release replaces status_reason: none given clears it

    @rule(dt=st.sampled_from([0.5, 1, 4, 40]))
    def advance(self, dt: float) -> None:
        self.clock.now += dt

    @rule()
    def sweep(self) -> None:
        released = {v.run_id for v in self.fleet.runs.release_expired(limit=500) if v.run_id.startswith(self.ex)}
        expected = {self.rid(n) for n, m in self.model.items()
                    if m.token is not None and self.now >= (m.lease_until or 0)}
        assert released == expected
        for n in expected:
            m = self.model[n.split("-", 1)[1]]
            self._unclaim(m)
            m.status, m.reason = "queued", "claim lease expired"

    @rule(name=st.sampled_from(RUN_IDS), seq=st.integers(0, 3),
          which=st.sampled_from(["holder", "fence", "stale", "none"]))
    def append(self, name: str, seq: int, which: str) -> None:
        m = self.model.get(name)
        token, fence = self._creds(m, which)
        data = {"n": int(self.now * 10) % 1000, "which": which}
        try:
            view = self.fleet.runs.append_event(self.rid(name), seq, "step", data, claim_token=token, fence=fence)
        except StaleHolderError:
            assert m is not None and not self._check_holder(m, token, fence)
            return
        if m is None:
            assert view is None
            return
        assert self._check_holder(m, token, fence) and view is not None
        stored = m.events.setdefault(seq, ("step", data, "runner"))
        assert (view.type, view.data, view.source) == stored  # first write wins

    @rule(name=st.sampled_from(RUN_IDS), status=st.sampled_from(["completed", "failed", "running", "queued"]),
          which=st.sampled_from(["holder", "stale", "none"]))
    def finalize(self, name: str, status: str, which: str) -> None:
        m = self.model.get(name)
        token, fence = self._creds(m, which)
        try:
            view = self.fleet.runs.finalize(self.rid(name), status, claim_token=token, fence=fence)
        except StaleHolderError:
            assert m is not None and not self._check_holder(m, token, fence)
            return
        except ValueError as exc:
            assert "Cannot transition terminal run" in str(exc)
            assert m is not None and m.status in TERMINAL and status != m.status
            return
        if m is None:
            assert view is None
            return
        assert self._check_holder(m, token, fence)
        assert not (m.status in TERMINAL and status != m.status)
        if status in TERMINAL or status == "queued":
            self._unclaim(m)
        self._set_status(m, status)
        assert view is not None and view.status == m.status

    @rule(name=st.sampled_from(RUN_IDS))
    def cancel(self, name: str) -> None:
        view = self.fleet.runs.request_cancel(self.rid(name), status_reason="stop")
        m = self.model.get(name)
        if m is None:
            assert view is None
            return
        m.cancel_at, m.reason = int(self.now), "stop"  # every request stamps the time anew
        seq = max(m.events, default=0) + 1  # the store's max + 1 (1 for a run without events)
        m.events[seq] = ("admin.run_cancel", {"status_reason": "stop"}, "host")
        assert view is not None and view.cancel_requested_at == m.cancel_at

    # -- the view equals the model ------------------------------------------------
    @invariant()
    def view_matches_model(self) -> None:
        if next(self._tick) % 6:
            return  # every 6th step: reading the view waits for the fold
        self.check_view()

    _tick = itertools.count()

    def check_view(self) -> None:
        page = self.fleet.runs.list(conversation_id=self.ex, limit=100)
        views = {v.run_id: v for v in page.items}
        assert set(views) == {self.rid(n) for n in self.model}
        for name, m in self.model.items():
            v = views[self.rid(name)]
            lease = None if m.lease_until is None else math.ceil(m.lease_until)
            got = (v.status, v.priority, v.claimed_by_runtime_id, v.dispatch_attempts, v.claim_lease_expires_at,
                   v.started_at, v.finished_at, v.cancel_requested_at, v.status_reason)
            assert got == (m.status, m.priority, m.holder, m.attempts, lease, m.started_at, m.finished_at,
                           m.cancel_at, m.reason), name
            if m.token is not None:
                assert v.fence == m.fence
            events = self.fleet.runs.events(self.rid(name), limit=100).items
            assert [(e.sequence, e.type, e.data, e.source) for e in events] == [
                (s, *m.events[s]) for s in sorted(m.events)
            ], name

    def teardown(self) -> None:
        self.check_view()


async def test_run_ledger_matches_model_and_rebuild(settings: FleetSettings, server: Server, tmp_path: Path) -> None:
    clock = Clock()
    fleet = await asyncio.to_thread(FleetSync.connect, settings=settings)
    fleet._fleet.runs.clock = clock
    RunLedgerMachine.fleet = fleet
    RunLedgerMachine.clock = clock
    runner = settings_for_ci(RunLedgerMachine)
    try:
        await asyncio.to_thread(runner)
    finally:
        await asyncio.to_thread(fleet.close)

    # A rebuild from sequence 1 equals the live view.
    status = await asyncio.to_thread(_last_seq, settings)
    live = server.projector.live("runs")
    await server.projector.wait_for("runs", {"FLEET_RUNS": status}, 30)
    live_digest = server.store.table_digest(live.gen.schema, live.projection.tables)
    other = Server(settings.model_copy(update={"data_dir": tmp_path / "rebuild"}))
    await other.start()
    try:
        await other.projector.wait_for("runs", {"FLEET_RUNS": status}, 60)
        gen = other.projector.live("runs").gen
        assert other.store.table_digest(gen.schema, live.projection.tables) == live_digest
    finally:
        await other.stop()
    assert live_digest["runs"][0] > 0 and live_digest["run_events"][0] > 0


def settings_for_ci(machine: type[RuleBasedStateMachine]) -> Any:
    run = machine.TestCase
    run.settings = settings(max_examples=20, stateful_step_count=40, deadline=None,
                            suppress_health_check=list(HealthCheck))
    return lambda: run().runTest()


def _last_seq(settings: FleetSettings) -> int:
    import nats

    async def go() -> int:
        nc = await nats.connect(settings.nats_url)
        try:
            info = await nc.jetstream().stream_info("FLEET_RUNS")
            return int(info.state.last_seq)
        finally:
            await nc.close()

    return asyncio.run(go())


pytestmark = pytest.mark.timeout(600)
