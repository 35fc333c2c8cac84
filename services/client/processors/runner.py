"""The session-processor runner: `fleet.processors.run(...)` and the `processors.run` endpoint.

A run holds the processor's lock (lock.py: JetStream decides; non-blocking, a
held lock fails at once with "already running") for its whole length, walks the
candidates `scan_unprocessed_for` surfaces, and marks each processed session under
the lock's fence. The rules are the store's (see `run`). Every run ends with one
audit record on the processor's run subject, the runner's own failure included.

`serve_runs` answers `fleetlog.processors.run` requests with the same runner: a small
nats.micro service on the machine that holds the sessions (`fleetlog processors serve`). It
answers `fleetlog.processors.health` there too (health.py: it reads the files' mtimes).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import msgspec
from fleetlog.schemas import new_event_id, now_iso
from fleetlog.schemas.processors import ProcessorRunRecorded, ProcRunRequest, ProcRunStats
from fleetlog.services.backbone.errors import FleetError, FleetValidationError
from fleetlog.services.backbone.replies import GuardedService
from fleetlog.services.client.processors.files import SessionFile, utcnow
from fleetlog.services.client.processors.health import HEALTH_SUBJECT, HealthRequest, pipeline_health
from fleetlog.services.client.processors.lock import ProcessorLock, ProcessorLockBusy
from fleetlog.services.client.processors.registry import (
    Processor,
    ProcessorResult,
    check_processor,
    get_processor,
    list_processor_names,
)
from nats.aio.client import Client
from nats.micro.request import Request
from nats.micro.service import ServiceConfig

__all__ = ["DEFAULT_MAX_PER_RUN", "LEASE_S", "RUN_SUBJECT", "UnknownProcessor", "default_max_per_run", "run",
           "serve_runs"]

log = logging.getLogger("fleetlog.processors")

DEFAULT_MAX_PER_RUN = 50
MAX_PER_RUN_ENV = "FLEETLOG_PROCESSOR_MAX_PER_RUN"
LEASE_S = 60.0  # renewed every 20 s while the run goes on (a sync processor runs in a thread)
RUN_SUBJECT = "fleetlog.processors.run"
SERVICE_NAME = "fleetlog-processor-runner"

UserResolver = Callable[[str], Any]  # dir name -> (user_id, email) | None (or an awaitable of it)


class ProcessorsAPI(Protocol):
    """What the runner uses of `fleet.processors` (processors.ProcessorsAPI; a Protocol: no cycle)."""

    compute_file_hash: Callable[[Path], str]

    def locked(self, processor: str, holder: str | None = None, lease_s: float = 60,
               renew_every_s: float | None = None) -> AbstractAsyncContextManager[ProcessorLock]: ...

    async def scan_rows(self, processor: str, session_dir: str | Path,
                        ) -> tuple[list[SessionFile], dict[str, dict[str, Any]]]: ...

    async def mark_locked(self, lock: ProcessorLock, session_file: str, username: str, items_count: int,
                          file_hash: str, read_at: datetime | None = None) -> int: ...

    async def record_run(self, event: ProcessorRunRecorded) -> Any: ...

    async def get_states_for_session_files(self, processor: str, session_files: Iterable[str],
                                           ) -> dict[str, dict[str, Any]]: ...

    async def max_processed_at(self, processor: str) -> datetime | None: ...


class UnknownProcessor(FleetError, LookupError):
    """No processor is registered under the name (the message lists the known ones)."""

    def __init__(self, name: str, message: str | None = None) -> None:
        super().__init__(message or f"Unknown processor {name!r}. Known: {', '.join(list_processor_names())}")
        self.name = name


def default_max_per_run(env: Mapping[str, str] | None = None) -> int | None:
    """FLEETLOG_PROCESSOR_MAX_PER_RUN (default 50); empty, not an integer or <= 0: no cap (the
    store's lenient rule, kept: a typo there means "no cap", not a failed scheduler)."""
    raw = (os.environ if env is None else env).get(MAX_PER_RUN_ENV)
    if raw is None:
        return DEFAULT_MAX_PER_RUN
    try:
        value = int(raw.strip())
    except ValueError:
        return None
    return value if value > 0 else None


def _resolve(processor: Processor | str) -> Processor:
    if isinstance(processor, str):
        found = get_processor(processor)
        if found is None:
            raise UnknownProcessor(processor)
        return found
    return check_processor(processor)


def _cap(max_sessions_per_run: int | None) -> int | None:
    if max_sessions_per_run is None:
        return default_max_per_run()
    if isinstance(max_sessions_per_run, bool) or not isinstance(max_sessions_per_run, int):
        raise FleetValidationError("max_sessions_per_run", f"must be an integer or None, got {max_sessions_per_run!r}")
    return max_sessions_per_run if max_sessions_per_run > 0 else None


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A coroutine function on the loop; a plain one in a worker thread (the loop keeps renewing
    the lock and answering requests meanwhile)."""
    if inspect.iscoroutinefunction(fn):
        return await fn(*args, **kwargs)
    return await _maybe_await(await asyncio.to_thread(fn, *args, **kwargs))


def _items(result: Any) -> int:
    if result is None:
        return 0
    items = getattr(result, "items_count", None)
    if not isinstance(result, ProcessorResult) and items is None:
        raise TypeError(f"process_session returned {type(result).__name__}, not a ProcessorResult or None")
    if isinstance(items, bool) or not isinstance(items, int) or items < 0:
        raise ValueError(f"items_count must be an integer >= 0, got {items!r}")
    return items


async def run(api: ProcessorsAPI, processor: Processor | str, session_dir: str | Path, *,
              max_sessions_per_run: int | None = None, time_budget_seconds: float = 150.0,
              user_resolver: UserResolver | None = None,
              clock: Callable[[], float] | None = None) -> dict[str, Any]:
    """One run of `processor` over session_dir, under the processor's lock.

    Candidates come from the scan (`scanned`). For each, in order: stop when the time budget
    is spent (checked before each candidate, on `clock`, default time.monotonic) or the cap
    of attempts is reached (`capped` = candidates left); read_at = now, taken BEFORE hashing
    (so an append during processing is newer than the mark and is picked up next run); the
    stored hash equal to the file's -> `skipped` (no attempt); else the processor is called:
    a raise -> `errors` + an errors_detail entry, nothing marked (retried next run) — an
    attempt; a return (None = 0 items) -> marked with read_at and that hash, `processed`,
    items added. A file that vanishes before hashing -> an error entry (no attempt).
    Raises ProcessorLockBusy ("already running") at once when the lock is held, and
    UnknownProcessor for an unregistered name.
    """
    p = _resolve(processor)
    cap = _cap(max_sessions_per_run)
    if isinstance(time_budget_seconds, bool) or not isinstance(time_budget_seconds, int | float) \
            or time_budget_seconds < 0:
        raise FleetValidationError("time_budget_seconds", f"must be a number >= 0, got {time_budget_seconds!r}")
    tick = time.monotonic if clock is None else clock
    stats: dict[str, Any] = {"processor": p.name, "scanned": 0, "processed": 0, "skipped": 0, "capped": 0,
                             "errors": 0, "items_extracted": 0, "errors_detail": []}
    async with api.locked(p.name, lease_s=LEASE_S) as lock:
        started = time.time()
        unhandled: str | None = None
        try:
            await _walk(api, p, Path(session_dir), stats, lock, cap, float(time_budget_seconds), tick, user_resolver)
        except BaseException as exc:
            unhandled = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            await _record(api, p.name, str(session_dir), stats, started, unhandled, lock.holder)
    return stats


async def _walk(api: ProcessorsAPI, p: Processor, session_dir: Path, stats: dict[str, Any], lock: ProcessorLock,
                cap: int | None, budget: float, tick: Callable[[], float], user_resolver: UserResolver | None) -> None:
    start = tick()
    files, rows = await api.scan_rows(p.name, session_dir)
    stats["scanned"] = len(files)
    users: dict[str, tuple[Any, str]] = {}
    attempts = 0
    for i, f in enumerate(files):
        if tick() - start >= budget or (cap is not None and attempts >= cap):
            stats["capped"] = len(files) - i
            return
        read_at = utcnow()  # before hashing: a write during processing is newer than the mark
        try:
            file_hash = await asyncio.to_thread(api.compute_file_hash, f.path)
        except OSError as exc:
            stats["errors"] += 1
            stats["errors_detail"].append({"session": f.key, "error": f"{type(exc).__name__}: {exc}"})
            continue
        row = rows.get(f.key)
        if row is not None and row["file_hash"] == file_hash:
            stats["skipped"] += 1
            continue
        if f.username not in users:
            resolved = await _call(user_resolver, f.username) if user_resolver is not None else None
            users[f.username] = (resolved[0], resolved[1] or f.username) if resolved else (None, f.username)
        user_id, username = users[f.username]
        attempts += 1
        try:
            items = _items(await _call(p.process_session, f.path, username, f.key, user_id=user_id))
        except Exception as exc:  # the processor's failure is this session's, not the run's
            stats["errors"] += 1
            stats["errors_detail"].append({"session": f.key, "error": f"{type(exc).__name__}: {exc}"})
            continue
        await api.mark_locked(lock, f.key, username, items, file_hash, read_at)
        stats["processed"] += 1
        stats["items_extracted"] += items


async def _record(api: ProcessorsAPI, processor: str, session_dir: str, stats: dict[str, Any], started: float,
                  unhandled: str | None, holder: str) -> None:
    """The run's audit record. Not fenced: a run that lost its lock still leaves its record.
    Its own failure is logged, never raised over the run's outcome."""
    event = ProcessorRunRecorded(
        id=new_event_id(), ts=now_iso(), processor=processor, run_id=new_event_id(), session_dir=session_dir,
        started_at=started, finished_at=time.time(), holder=holder,
        ok=stats["errors"] == 0 and unhandled is None, unhandled_error=unhandled,
        errors_detail=[dict(d) for d in stats["errors_detail"]],
        **{k: stats[k] for k in ("scanned", "processed", "skipped", "capped", "errors", "items_extracted")},
    )
    try:
        await api.record_run(event)
    except Exception as exc:
        log.warning("processor %s: the run's audit record was not stored: %s", processor, exc)


# ---- the request endpoint --------------------------------------------------------------------

_req_decoder = msgspec.json.Decoder(ProcRunRequest)
_health_decoder = msgspec.json.Decoder(HealthRequest)
_encode = msgspec.json.Encoder().encode


async def _error(req: Request, code: str, message: str) -> None:
    with contextlib.suppress(Exception):
        await req.respond_error(code, " ".join(message.split())[:1000],
                                data=_encode({"error": {"code": code, "message": message}}))


async def serve_runs(api: ProcessorsAPI, nc: Client, session_dir: str | Path, *,
                     ready: asyncio.Event | None = None) -> None:
    """Serve `fleetlog.processors.run` for session_dir until cancelled.

    Answers: the run's stats; errors (micro error headers and a JSON body, as the query
    service): 400 bad request, 404 unknown processor, 409 already running, 500 the runner failed."""
    tasks: set[asyncio.Task[None]] = set()

    async def handle(req: Request) -> None:
        try:
            body = _req_decoder.decode(req.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await _error(req, "400", f"bad processors.run request: {exc}")
            return
        try:
            stats = await run(api, body.processor, session_dir, max_sessions_per_run=body.max_sessions_per_run,
                              time_budget_seconds=body.time_budget_seconds)
        except UnknownProcessor as exc:
            await _error(req, "404", str(exc))
        except ProcessorLockBusy as exc:
            await _error(req, "409", str(exc))
        except FleetValidationError as exc:
            await _error(req, "400", str(exc))
        except Exception as exc:
            log.exception("processors.run %s failed", body.processor)
            await _error(req, "500", f"{type(exc).__name__}: {exc}")
        else:
            with contextlib.suppress(Exception):
                await req.respond(_encode(ProcRunStats(**stats)))

    async def spawn(req: Request) -> None:
        if svc.refuse_reply(req._msg):
            return
        # Each request in its own task: a second request during a long run answers 409 at once.
        task = asyncio.create_task(handle(req))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def health(req: Request) -> None:
        if svc.refuse_reply(req._msg):
            return
        try:
            body = _health_decoder.decode(req.data or b"{}")
            for name in body.processors or []:
                _resolve(name)  # an unknown name is 404, as processors.run says it
            answer = await pipeline_health(api, session_dir, processors=body.processors,
                                           stuck_file_grace_seconds=body.stuck_file_grace_seconds)
        except (msgspec.DecodeError, msgspec.ValidationError, FleetValidationError) as exc:
            await _error(req, "400", f"bad processors.health request: {exc}")
        except UnknownProcessor as exc:
            await _error(req, "404", str(exc))
        except Exception as exc:
            log.exception("processors.health failed")
            await _error(req, "500", f"{type(exc).__name__}: {exc}")
        else:
            with contextlib.suppress(Exception):
                await req.respond(_encode(answer))

    # Answers only inbox and import replies, as the query service (backbone/replies.py): on a
    # NATS run as one account, any role may ask `processors.health`, and an answer to a reply
    # it named could otherwise be stored on a stream subject.
    svc = GuardedService(nc, ServiceConfig(name=SERVICE_NAME, version="1.0.0",
                                           description=f"runs session processors over {session_dir}"))
    await svc.start()
    try:
        await svc.add_endpoint(name="processors-run", subject=RUN_SUBJECT, handler=spawn)
        await svc.add_endpoint(name="processors-health", subject=HEALTH_SUBJECT, handler=health)
        await nc.flush()  # subscribed before `ready`: a request right after must find a responder
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()
    finally:
        with contextlib.suppress(Exception):
            await svc.stop()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
