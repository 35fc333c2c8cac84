"""The scheduler reactor: jobs on a cadence, decided once per due slot by JetStream.

Any number of instances may run (in `fleetlog up`/`serve`, or `fleetlog scheduler run`
alone). Every tick, for each job: read the job's state (one compacted subject per job,
schemas/scheduler.py) by direct get; skip it while a launch is in flight (this instance's
task still running, or another instance's claim not yet finished and not older than the
job's timeout); if the schedule says it is due against the stored last_run, *claim* it: write
the state with last_run = the tick's time and in_flight, expecting the subject's last seq to
be the one just read. Of two instances that both saw it due, JetStream stores one claim; the
other gets WrongLastSequence and does nothing. Only the winner launches (a request to
processors.run or another fleetlog endpoint). When the launch ends, whatever its outcome
(ok, failed, raised: the raise is logged), the outcome is written guarded on the claim's seq.
last_run was advanced by the claim, so a failing job does not run every tick, and a restarted
scheduler (or another instance) sees the same last_run.

Each instance also answers `fleetlog.scheduler.status` (a nats.micro endpoint in a queue
group): the jobs with last run, next due and in-flight, for `fleetlog status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import msgspec
from fleetlog.schemas.scheduler import STREAM, JobState, JobStatus, SchedulerStatus, job_subject
from fleetlog.services.backbone.guarded import Guarded, StoredMsg, WrongLastSequence
from fleetlog.services.backbone.tasks import stop_tasks
from fleetlog.services.reactors.scheduler_jobs import Job, JobsConfig, check_tick
from fleetlog.services.reactors.schedules import is_due, next_due
from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.request import Request

__all__ = ["STATUS_SUBJECT", "Scheduler"]

log = logging.getLogger("fleetlog.scheduler")

STATUS_SUBJECT = "fleetlog.scheduler.status"
SERVICE_NAME = "fleetlog-scheduler"
STALE_MARGIN_S = 30.0  # a claim unfinished this long past its timeout: its instance died
_state_decoder = msgspec.json.Decoder(JobState)
_encode = msgspec.json.Encoder().encode


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Scheduler:
    """Runs `config.jobs` on their schedules until stopped (see the module docstring)."""

    def __init__(self, nc: Client, config: JobsConfig, *, holder: str | None = None,
                 clock: Callable[[], datetime] = _utcnow) -> None:
        check_tick(config)
        self.nc = nc
        self.config = config
        self.jobs = {j.name: j for j in config.jobs}
        self.holder = holder or f"sched-{uuid.uuid4().hex[:12]}"
        self.clock = clock
        self.guarded = Guarded(nc)
        self.running: dict[str, asyncio.Task[None]] = {}
        self.launched: dict[str, int] = dict.fromkeys(self.jobs, 0)
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # -- the tick -------------------------------------------------------------------------------

    async def _read(self, job: str) -> tuple[StoredMsg | None, JobState | None]:
        stored = await self.guarded.last(STREAM, job_subject(job))
        if stored is None:
            return None, None
        try:
            return stored, _state_decoder.decode(stored.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("job %s: unreadable stored state (%s): treated as never run", job, exc)
            return stored, None

    def _in_flight(self, job: Job, state: JobState | None, now: float) -> bool:
        task = self.running.get(job.name)
        if task is not None and not task.done():
            return True
        if state is None or not state.in_flight or state.holder == self.holder:
            return False  # our own claim with no task of ours running: its outcome write was lost
        return now <= state.started_at + state.timeout_s + STALE_MARGIN_S

    async def tick(self, now: datetime | None = None) -> list[str]:
        """One look at every job; returns the names this instance launched."""
        when = self.clock() if now is None else now
        when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)  # naive is UTC
        launched = []
        for job in self.jobs.values():
            try:
                if await self._consider(job, when):
                    launched.append(job.name)
            except Exception as exc:  # one job's trouble (broker away) never stops the others
                log.warning("job %s: %s", job.name, exc)
        return launched

    async def _consider(self, job: Job, when: datetime) -> bool:
        stored, state = await self._read(job.name)
        if self._in_flight(job, state, time.time()):
            return False
        if not is_due(job.schedule, state.last_run if state is not None else None, when):
            return False
        claim = JobState(job=job.name, schedule=job.schedule, last_run=when.isoformat(), in_flight=True,
                         holder=self.holder, started_at=time.time(), timeout_s=job.timeout_s)
        try:
            # A fresh message id per claim: the expected sequence decides, and JetStream's dedup must
            # never hand a second claim the first one's ack.
            _, seq, duplicate = await self.guarded.publish(
                job_subject(job.name), _encode(claim), msg_id=f"sched:{job.name}:{uuid.uuid4().hex}",
                expected_last_seq=stored.seq if stored is not None else 0)
        except WrongLastSequence:
            return False  # another instance claimed this slot first
        if duplicate:
            return False
        self.launched[job.name] += 1
        self.running[job.name] = asyncio.create_task(self._launch(job, claim, seq), name=f"job {job.name}")
        return True

    async def _launch(self, job: Job, claim: JobState, seq: int) -> None:
        ok, error = False, None
        try:
            ok, error = await self._call(job)
            if not ok:
                log.warning("job %s failed: %s", job.name, error)
        except asyncio.CancelledError:
            error = "cancelled: the scheduler stopped"
            raise
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.exception("job %s raised", job.name)
        finally:
            # The outcome, whatever it was; last_run was already advanced by the claim.
            done = msgspec.structs.replace(claim, in_flight=False, finished_at=time.time(), ok=ok, error=error)
            try:
                await self.guarded.publish(job_subject(job.name), _encode(done),
                                           msg_id=f"sched:{job.name}:{uuid.uuid4().hex}:done",
                                           expected_last_seq=seq)
            except WrongLastSequence:
                log.info("job %s: its state moved on before this launch ended (outcome not stored)", job.name)
            except Exception as exc:
                log.warning("job %s: the outcome was not stored: %s", job.name, exc)

    async def _call(self, job: Job) -> tuple[bool, str | None]:
        reply = await self.nc.request(job.subject, job.body(), timeout=job.timeout_s)
        headers = reply.headers or {}
        code = headers.get("Nats-Service-Error-Code")
        if code:
            return False, f"{code} {headers.get('Nats-Service-Error', '')}".strip()
        if job.processor is not None:
            errors = msgspec.json.decode(reply.data).get("errors", 0)
            return errors == 0, (f"{errors} session(s) failed" if errors else None)
        return True, None

    # -- status ---------------------------------------------------------------------------------

    async def status(self) -> SchedulerStatus:
        now = self.clock()
        jobs = []
        for job in self.jobs.values():
            _, state = await self._read(job.name)
            last = state.last_run if state is not None else None
            nxt = next_due(job.schedule, last, now)
            jobs.append(JobStatus(
                job=job.name, schedule=job.schedule, action=job.action, last_run=last,
                next_due=nxt.isoformat() if nxt is not None else None,
                in_flight=self._in_flight(job, state, time.time()),
                ok=state.ok if state is not None else None, error=state.error if state is not None else None))
        return SchedulerStatus(holder=self.holder, tick_s=self.config.tick_seconds, jobs=jobs)

    async def _serve_status(self, ready: asyncio.Event) -> None:
        async def handle(req: Request) -> None:
            try:
                await req.respond(_encode(await self.status()))
            except Exception as exc:
                with contextlib.suppress(Exception):
                    await req.respond_error("500", f"{type(exc).__name__}: {exc}"[:1000])

        svc = await add_service(self.nc, name=SERVICE_NAME, version="1.0.0", queue_group=SERVICE_NAME,
                                description="fleetlog scheduler: jobs, last run, next due, in flight")
        try:
            await svc.add_endpoint(name="status", subject=STATUS_SUBJECT, handler=handle)
            await self.nc.flush()
            ready.set()
            await asyncio.Event().wait()
        finally:
            with contextlib.suppress(Exception):
                await svc.stop()

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Serve status and start ticking (after the startup grace) in background tasks."""
        ready = asyncio.Event()
        self._tasks = [asyncio.create_task(self._serve_status(ready), name="scheduler status"),
                       asyncio.create_task(self._loop(), name="scheduler ticks")]
        await ready.wait()
        log.info("scheduler %s: %d job(s), tick %gs", self.holder, len(self.jobs), self.config.tick_seconds)

    async def _loop(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), self.config.startup_grace_seconds)
        # The flag as well as the cancellation (services/backbone/tasks.py: 3.11's wait_for).
        while not self._stopping.is_set():
            await self.tick()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.config.tick_seconds)

    async def stop(self) -> None:
        """Stop ticking and answering; cancel launches still running (their outcome says so)."""
        self._stopping.set()
        await stop_tasks([*self._tasks, *self.running.values()])
