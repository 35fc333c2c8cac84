"""The scheduler against a real broker: the in-flight guard with a slow fake processor, two
instances running a due job once per slot (decided by JetStream), last_run advanced on
failure and kept across a restart, a real processor run through processors.run, and the
tick guard."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from fleetlog.schemas.scheduler import STREAM, JobState, SchedulerStatus, job_subject
from fleetlog.services.backbone.guarded import Guarded
from fleetlog.services.backbone.streams import ensure_streams
from fleetlog.services.reactors.scheduler import STATUS_SUBJECT, Scheduler
from fleetlog.services.reactors.scheduler_jobs import Job, JobsConfig
from nats.aio.client import Client
from nats.aio.msg import Msg

from fleetlog import Fleet, FleetSettings, ProcessorResult
from fleetlog.processors import register, unregister

T0 = datetime(2026, 3, 4, 12, 0, 0, tzinfo=UTC)


class SlowFake:
    """A fake processors.run endpoint: each request takes `seconds`; it counts launches and the
    most that ran at once (across every scheduler instance)."""

    def __init__(self, seconds: float, *, error: str | None = None) -> None:
        self.seconds = seconds
        self.error = error
        self.calls: list[dict[str, Any]] = []
        self.active = 0
        self.max_active = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.nc: Client | None = None

    async def handle(self, msg: Msg) -> None:
        task = asyncio.create_task(self._answer(msg))  # requests overlap, as the real endpoint's do
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, msg: Msg) -> None:
        self.calls.append(msgspec.json.decode(msg.data))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await asyncio.sleep(self.seconds)
        finally:
            self.active -= 1
        if self.error is not None:
            headers = {"Nats-Service-Error-Code": "500", "Nats-Service-Error": self.error}
            await self.nc.publish(msg.reply, b"{}", headers=headers)
        else:
            await msg.respond(msgspec.json.encode({"processor": "slow", "errors": 0}))


@pytest.fixture
async def nc(settings: FleetSettings) -> AsyncIterator[Client]:
    conn = await nats.connect(settings.nats_url)
    await ensure_streams(conn, settings)
    try:
        yield conn
    finally:
        await conn.drain()


async def _serve_fake(nc: Client, fake: SlowFake) -> None:
    fake.nc = nc
    await nc.subscribe("fleetlog.processors.run", cb=fake.handle)
    await nc.flush()


async def _state(nc: Client, job: str) -> JobState | None:
    stored = await Guarded(nc).last(STREAM, job_subject(job))
    return None if stored is None else msgspec.json.decode(stored.data, type=JobState)


async def _finish(*schedulers: Scheduler) -> None:
    await asyncio.gather(*(t for s in schedulers for t in s.running.values()), return_exceptions=True)


def _config(*jobs: Job, tick: float = 0.1, grace: float = 0.0) -> JobsConfig:
    return JobsConfig(jobs=list(jobs), tick_seconds=tick, startup_grace_seconds=grace)


HELD = 3600.0  # a startup grace that keeps a started scheduler's own loop from ticking: the test ticks


async def test_a_job_still_in_flight_is_not_launched_again(nc: Client) -> None:
    fake = SlowFake(0.3)
    await _serve_fake(nc, fake)
    sched = Scheduler(nc, _config(Job(name="slow", schedule="every 0m", processor="slow")))
    launched = 0
    start = time.monotonic()
    while time.monotonic() - start < 0.4:  # 0.4 s of ticks, 0.1 s apart, of an always-due 0.3 s job
        launched += len(await sched.tick())
        await asyncio.sleep(0.1)
    await _finish(sched)
    assert 1 <= launched <= 2
    assert len(fake.calls) == launched and fake.max_active == 1
    assert fake.calls[0] == {"processor": "slow", "max_sessions_per_run": None, "time_budget_seconds": 150.0}


async def test_two_instances_run_a_due_job_once_per_slot(nc: Client, settings: FleetSettings) -> None:
    fake = SlowFake(0.05)
    await _serve_fake(nc, fake)
    other = await nats.connect(settings.nats_url)
    try:
        job = Job(name="extract", schedule="every 15m", processor="slow")
        a, b = Scheduler(nc, _config(job)), Scheduler(other, _config(job))
        for slot in range(5):  # every slot: both see it due at once; JetStream keeps one claim
            now = T0 + timedelta(minutes=15 * slot)
            got = await asyncio.gather(a.tick(now), b.tick(now), a.tick(now), b.tick(now))
            assert sum(len(x) for x in got) == 1, slot
            await _finish(a, b)
            off_slot = await asyncio.gather(a.tick(now + timedelta(minutes=10)), b.tick(now + timedelta(minutes=10)))
            assert off_slot == [[], []]
            state = await _state(nc, "extract")
            assert state is not None and state.last_run == now.isoformat() and state.ok and not state.in_flight
        assert len(fake.calls) == 5 and a.launched["extract"] + b.launched["extract"] == 5
    finally:
        await other.drain()


async def test_two_instances_never_overlap_a_slow_job(nc: Client, settings: FleetSettings) -> None:
    fake = SlowFake(0.3)
    await _serve_fake(nc, fake)
    other = await nats.connect(settings.nats_url)
    try:
        job = Job(name="slow", schedule="every 0m", processor="slow")
        a, b = Scheduler(nc, _config(job)), Scheduler(other, _config(job))
        for _ in range(8):
            await asyncio.gather(a.tick(), b.tick())
            await asyncio.sleep(0.1)
        await _finish(a, b)
        assert fake.max_active == 1  # the other instance saw the claim in flight
        assert len(fake.calls) == a.launched["slow"] + b.launched["slow"] >= 1
    finally:
        await other.drain()


async def test_last_run_advances_on_failure_and_on_a_raise(nc: Client, caplog: pytest.LogCaptureFixture) -> None:
    fake = SlowFake(0.0, error="the runner broke")
    await _serve_fake(nc, fake)
    failing = Job(name="failing", schedule="every 15m", processor="slow")
    raising = Job(name="raising", schedule="every 15m", request="fleetlog.nobody.here", timeout_seconds=2)
    sched = Scheduler(nc, _config(failing, raising))
    with caplog.at_level(logging.WARNING, logger="fleetlog.scheduler"):
        assert sorted(await sched.tick(T0)) == ["failing", "raising"]
        await _finish(sched)
    f, r = await _state(nc, "failing"), await _state(nc, "raising")
    assert f is not None and f.last_run == T0.isoformat() and f.ok is False and f.error == "500 the runner broke"
    assert r is not None and r.last_run == T0.isoformat() and r.ok is False and "NoRespondersError" in str(r.error)
    assert "job raising raised" in caplog.text  # the raise is logged
    assert await sched.tick(T0 + timedelta(minutes=5)) == []  # not retried every tick
    assert sorted(await sched.tick(T0 + timedelta(minutes=15))) == ["failing", "raising"]
    await _finish(sched)


async def test_last_run_survives_a_restart_stale_names_ignored_new_jobs_never_run(
        nc: Client, settings: FleetSettings) -> None:
    fake = SlowFake(0.0)
    await _serve_fake(nc, fake)
    first = await nats.connect(settings.nats_url)
    sched = Scheduler(first, _config(Job(name="kept", schedule="every 15m", processor="slow"),
                                     Job(name="retired", schedule="every 1m", processor="slow"), grace=HELD))
    await sched.start()
    assert sorted(await sched.tick(T0)) == ["kept", "retired"]
    await _finish(sched)
    await sched.stop()
    await first.close()  # the first instance is gone: only JetStream remembers

    again = Scheduler(nc, _config(Job(name="kept", schedule="every 15m", processor="slow"),
                                  Job(name="fresh", schedule="every 15m", processor="slow"), grace=HELD))
    await again.start()
    try:
        assert await again.tick(T0 + timedelta(minutes=5)) == ["fresh"]  # kept ran 5 min ago; fresh never did
        await _finish(again)
        reply = await nc.request(STATUS_SUBJECT, b"{}", timeout=5)
        status = msgspec.json.decode(reply.data, type=SchedulerStatus)
        by_name = {j.job: j for j in status.jobs}
        assert set(by_name) == {"kept", "fresh"}  # the stored "retired" is ignored
        assert by_name["kept"].last_run == T0.isoformat() and by_name["kept"].action == "processor slow"
        assert by_name["fresh"].last_run == (T0 + timedelta(minutes=5)).isoformat()
        assert not by_name["kept"].in_flight and by_name["kept"].ok is True
        assert await again.tick(T0 + timedelta(minutes=15)) == ["kept"]
        await _finish(again)
    finally:
        await again.stop()


async def test_status_shows_a_launch_in_flight(nc: Client) -> None:
    fake = SlowFake(30.0)
    await _serve_fake(nc, fake)
    sched = Scheduler(nc, _config(Job(name="long", schedule="daily 11:00", processor="slow"), grace=HELD),
                      clock=lambda: T0)
    await sched.start()
    try:
        assert await sched.tick() == ["long"]
        status = await sched.status()
        (job,) = status.jobs
        assert job.in_flight and job.last_run == T0.isoformat()
        assert job.next_due == (T0 + timedelta(hours=23)).isoformat()
    finally:
        await sched.stop()  # cancels the launch: its outcome says so
    state = await _state(nc, "long")
    assert state is not None and not state.in_flight and state.error == "cancelled: the scheduler stopped"


async def test_a_tick_longer_than_the_smallest_interval_is_refused(nc: Client) -> None:
    jobs = (Job(name="a", schedule="every 1h", processor="x"), Job(name="b", schedule="every 2m", processor="x"),
            Job(name="c", schedule="every 0m", processor="x"))
    with pytest.raises(ValueError, match="tick"):
        Scheduler(nc, _config(*jobs, tick=121))
    Scheduler(nc, _config(*jobs, tick=120))  # equal is fine; `every 0m` sets no bound


class Lines:
    cadence_minutes = 1

    def __init__(self) -> None:
        self.name = "sched-lines"
        self.keys: list[str] = []

    def process_session(self, session_path: Path, username: str, session_key: str,
                        **kwargs: Any) -> ProcessorResult:
        self.keys.append(session_key)
        return ProcessorResult(items_count=len(session_path.read_text().splitlines()))


async def test_a_processor_job_runs_through_the_real_processors_run_endpoint(fleet: Fleet, tmp_path: Path) -> None:
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "s.jsonl").write_text('{"a": 1}\n{"a": 2}\n')
    proc = Lines()
    register(proc)
    ready = asyncio.Event()
    serving = asyncio.create_task(fleet.processors.serve_runs(tmp_path, ready=ready))
    nc = await fleet.nats()
    try:
        await ready.wait()
        sched = Scheduler(nc, _config(Job(name="lines", schedule="every 1m", processor="sched-lines")))
        assert await sched.tick(T0) == ["lines"]
        await _finish(sched)
        state = await _state(nc, "lines")
        assert state is not None and state.ok is True and state.error is None
        assert proc.keys == ["ann/s.jsonl"]
        assert await fleet.processors.is_processed("sched-lines", "ann/s.jsonl",
                                                   fleet.processors.compute_file_hash(tmp_path / "ann" / "s.jsonl"))
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        unregister("sched-lines")


async def test_a_naive_tick_time_is_utc_and_each_claim_is_its_own_message(nc: Client) -> None:
    fake = SlowFake(0.0)
    await _serve_fake(nc, fake)
    sched = Scheduler(nc, _config(Job(name="often", schedule="every 0m", processor="slow")))
    seqs = []
    for _ in range(2):  # the same tick time twice: two claims, neither deduplicated into the other
        assert await sched.tick(T0.replace(tzinfo=None)) == ["often"]
        await _finish(sched)
        stored = await Guarded(nc).last(STREAM, job_subject("often"))
        assert stored is not None
        seqs.append(stored.seq)
        state = msgspec.json.decode(stored.data, type=JobState)
        assert state.last_run == T0.isoformat() and state.ok is True and not state.in_flight
    assert len(fake.calls) == 2 and seqs[1] == seqs[0] + 2  # claim + outcome each time
