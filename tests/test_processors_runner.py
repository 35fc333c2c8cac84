"""The session-processor runner against the real broker and real session files: its stats in
every branch (cap, budget on an injected clock, skipped, a raising processor retried next
run, a vanished file, an append during processing, two processors on one session), the user
resolver, the lock (busy at once, released when the runner raises), the audit records, the
registry, and the `processors.run` request endpoint."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fleetlog.services.backbone.errors import FleetUnavailable, FleetValidationError
from fleetlog.services.client.processors.runner import default_max_per_run
from fleetlog.services.node.server import Server

from fleetlog import Fleet, FleetSettings, ProcessorLockBusy, ProcessorResult
from fleetlog.processors import UnknownProcessor, get_processor, list_processor_names, register, unregister

from .helpers import wait_until

STATS_KEYS = {"processor", "scanned", "processed", "skipped", "capped", "errors", "items_extracted", "errors_detail"}


class Lines:
    """Counts a session's JSON lines; `fail_on` raises for those keys; `hook` runs inside."""

    cadence_minutes = 5

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[tuple[str, str, str, Any]] = []
        self.fail_on: set[str] = set()
        self.hook: Any = None
        self.threads: set[str] = set()

    def process_session(self, session_path: Path, username: str, session_key: str,
                        **kwargs: Any) -> ProcessorResult | None:
        self.threads.add(threading.current_thread().name)
        self.calls.append((session_key, username, session_path.name, kwargs.get("user_id")))
        if self.hook is not None:
            self.hook(session_path, session_key)
        if session_key in self.fail_on:
            raise RuntimeError(f"cannot read {session_key}")
        n = len(session_path.read_text().splitlines())
        return None if n == 0 else ProcessorResult(items_count=n)


@pytest.fixture
def lines() -> Iterator[Lines]:
    p = Lines("lines")
    register(p)
    yield p
    unregister("lines")


def _sessions(root: Path, spec: dict[str, int]) -> None:
    for key, n in spec.items():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f'{{"i": {i}}}\n' for i in range(n)))


async def test_a_run_then_nothing_left(fleet: Fleet, lines: Lines, tmp_path: Path) -> None:
    _sessions(tmp_path, {"ann/a.jsonl": 2, "ann/b.jsonl": 0, "bob/c.jsonl": 3})
    stats = await fleet.processors.run("lines", tmp_path)
    assert set(stats) == STATS_KEYS
    assert stats == {"processor": "lines", "scanned": 3, "processed": 3, "skipped": 0, "capped": 0, "errors": 0,
                     "items_extracted": 5, "errors_detail": []}
    assert threading.current_thread().name not in lines.threads  # a plain function runs in a worker thread
    states = await fleet.processors.get_states_for_session_files("lines", ["ann/a.jsonl", "ann/b.jsonl"])
    assert states["ann/b.jsonl"]["items_extracted"] == 0  # None counts as 0 items, and is marked
    assert states["ann/a.jsonl"]["items_extracted"] == 2 and states["ann/a.jsonl"]["username"] == "ann"
    again = await fleet.processors.run(lines, tmp_path)  # by object as well as by name
    assert (again["scanned"], again["processed"]) == (0, 0)
    (record, first) = (await fleet.processors.runs("lines")).items
    assert (record.scanned, record.ok, record.unhandled_error) == (0, True, None)
    assert (first.processed, first.items_extracted, first.ok, first.session_dir) == (3, 5, True, str(tmp_path))
    assert first.holder and first.finished_at is not None and first.started_at is not None


async def test_the_cap_counts_attempts_not_skips(fleet: Fleet, lines: Lines, tmp_path: Path) -> None:
    _sessions(tmp_path, {f"u/{i}.jsonl": 1 for i in range(5)})
    first = await fleet.processors.run("lines", tmp_path, max_sessions_per_run=2)
    assert (first["scanned"], first["processed"], first["capped"]) == (5, 2, 3)
    # touch the two done ones (same content, newer mtime): surfaced again, skipped by hash. The
    # mtime is set past the scan's window edge: a rewrite within milliseconds of the run's marks
    # may not be newer than them on a fast machine (the store's rule, not a fleetlog choice).
    for i in (0, 1):
        p = tmp_path / "u" / f"{i}.jsonl"
        p.write_text(p.read_text())
        later = time.time() + 5
        os.utime(p, (later, later))
    second = await fleet.processors.run("lines", tmp_path, max_sessions_per_run=2)
    assert (second["scanned"], second["skipped"], second["processed"], second["capped"]) == (5, 2, 2, 1)
    # a raising processor uses the cap (a skip marks nothing: the touched two are surfaced again)
    lines.fail_on = {"u/4.jsonl"}
    third = await fleet.processors.run("lines", tmp_path, max_sessions_per_run=1)
    assert (third["scanned"], third["skipped"], third["errors"], third["processed"], third["capped"]) == \
        (3, 2, 1, 0, 0)
    # <= 0: no cap
    lines.fail_on = set()
    _sessions(tmp_path, {f"v/{i}.jsonl": 1 for i in range(60)})
    fourth = await fleet.processors.run("lines", tmp_path, max_sessions_per_run=0)
    assert (fourth["processed"], fourth["capped"]) == (61, 0)


async def test_the_default_cap_comes_from_the_environment(fleet: Fleet, lines: Lines, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_max_per_run({}) == 50
    assert [default_max_per_run({"FLEETLOG_PROCESSOR_MAX_PER_RUN": v}) for v in ("", "x", "0", "-3", " 7 ")] == \
        [None, None, None, None, 7]
    _sessions(tmp_path, {f"u/{i}.jsonl": 1 for i in range(4)})
    monkeypatch.setenv("FLEETLOG_PROCESSOR_MAX_PER_RUN", "3")
    stats = await fleet.processors.run("lines", tmp_path)
    assert (stats["processed"], stats["capped"]) == (3, 1)
    with pytest.raises(FleetValidationError, match="max_sessions_per_run"):
        await fleet.processors.run("lines", tmp_path, max_sessions_per_run="3")  # type: ignore[arg-type]


async def test_the_time_budget_is_checked_before_each_candidate(fleet: Fleet, lines: Lines, tmp_path: Path) -> None:
    _sessions(tmp_path, {f"u/{i}.jsonl": 1 for i in range(5)})
    ticks = iter(range(0, 1000, 10))  # each look at the clock: 10 s later
    stats = await fleet.processors.run("lines", tmp_path, time_budget_seconds=25, clock=lambda: next(ticks))
    # start 0; before #1: 10, #2: 20 (< 25) -> processed; before #3: 30 -> spent
    assert (stats["processed"], stats["capped"]) == (2, 3)
    assert [c[0] for c in lines.calls] == ["u/0.jsonl", "u/1.jsonl"]
    assert (await fleet.processors.run("lines", tmp_path, time_budget_seconds=0))["capped"] == 3


async def test_a_raising_processor_is_retried_next_run(fleet: Fleet, lines: Lines, tmp_path: Path) -> None:
    _sessions(tmp_path, {"u/a.jsonl": 1, "u/b.jsonl": 2, "u/c.jsonl": 3})
    lines.fail_on = {"u/b.jsonl"}
    stats = await fleet.processors.run("lines", tmp_path)
    assert (stats["processed"], stats["errors"], stats["items_extracted"]) == (2, 1, 4)
    assert stats["errors_detail"] == [{"session": "u/b.jsonl", "error": "RuntimeError: cannot read u/b.jsonl"}]
    assert not await fleet.processors.get_states_for_session_files("lines", ["u/b.jsonl"])  # nothing marked
    (record,) = (await fleet.processors.runs("lines")).items
    assert (record.ok, record.errors, record.errors_detail) == (False, 1, stats["errors_detail"])
    lines.fail_on = set()
    retry = await fleet.processors.run("lines", tmp_path)
    assert (retry["scanned"], retry["processed"], retry["errors"], retry["items_extracted"]) == (1, 1, 0, 2)


async def test_a_vanished_file_is_an_error_and_the_loop_goes_on(fleet: Fleet, lines: Lines, tmp_path: Path) -> None:
    _sessions(tmp_path, {"u/a.jsonl": 1, "u/b.jsonl": 1, "u/c.jsonl": 1})

    def remove_b(path: Path, key: str) -> None:
        if key == "u/a.jsonl":
            (tmp_path / "u" / "b.jsonl").unlink()

    lines.hook = remove_b
    stats = await fleet.processors.run("lines", tmp_path)
    assert (stats["scanned"], stats["processed"], stats["errors"]) == (3, 2, 1)
    assert stats["errors_detail"][0]["session"] == "u/b.jsonl"
    assert "FileNotFoundError" in stats["errors_detail"][0]["error"]


async def test_an_append_during_processing_is_picked_up_next_run(fleet: Fleet, lines: Lines, tmp_path: Path) -> None:
    """read_at is taken before hashing, so a line appended while the processor runs leaves the
    file newer than (or inside the window of) its mark, with another hash: surfaced again."""
    _sessions(tmp_path, {"u/live.jsonl": 2})

    def append(path: Path, key: str) -> None:
        if len(lines.calls) == 1:
            with path.open("a") as fh:
                fh.write('{"i": 2}\n')
            # Longer than the 50 ms window: had the mark's processed_at been taken after
            # processing, the append would lie outside the window and go unseen.
            time.sleep(0.2)

    lines.hook = append
    first = await fleet.processors.run("lines", tmp_path)
    assert (first["processed"], first["items_extracted"]) == (1, 3)  # it read the appended line too
    second = await fleet.processors.run("lines", tmp_path)
    assert (second["scanned"], second["processed"], second["items_extracted"]) == (1, 1, 3)
    assert (await fleet.processors.run("lines", tmp_path))["scanned"] == 0


async def test_two_processors_on_one_session(fleet: Fleet, lines: Lines, tmp_path: Path) -> None:
    other = register(Lines("other-lines"))
    try:
        _sessions(tmp_path, {"u/a.jsonl": 2})
        assert (await fleet.processors.run("lines", tmp_path))["processed"] == 1
        assert (await fleet.processors.run("other-lines", tmp_path))["processed"] == 1
        assert (await fleet.processors.run("lines", tmp_path))["scanned"] == 0
        assert await fleet.processors.processed_session_files("other-lines") == {"u/a.jsonl"}
        await fleet.processors.delete_for_processors(["lines"])
        assert (await fleet.processors.run("lines", tmp_path))["processed"] == 1
        assert (await fleet.processors.run("other-lines", tmp_path))["scanned"] == 0
        assert len(other.calls) == 1  # type: ignore[attr-defined]
    finally:
        unregister("other-lines")


async def test_the_user_resolver_is_cached_per_directory(fleet: Fleet, lines: Lines, tmp_path: Path) -> None:
    _sessions(tmp_path, {"d1/a.jsonl": 1, "d1/b.jsonl": 1, "d2/c.jsonl": 1, "d3/d.jsonl": 1})
    asked: list[str] = []

    def resolve(dir_name: str) -> tuple[Any, str | None] | None:
        asked.append(dir_name)
        return {"d1": (11, "one@x.io"), "d2": (22, None)}.get(dir_name)

    await fleet.processors.run("lines", tmp_path, user_resolver=resolve)
    assert sorted(asked) == ["d1", "d2", "d3"]
    assert sorted((c[0], c[1], c[3]) for c in lines.calls) == [
        ("d1/a.jsonl", "one@x.io", 11), ("d1/b.jsonl", "one@x.io", 11), ("d2/c.jsonl", "d2", 22),
        ("d3/d.jsonl", "d3", None)]
    states = await fleet.processors.get_states_for_session_files("lines", ["d1/a.jsonl"])
    assert states["d1/a.jsonl"]["username"] == "one@x.io"


async def test_a_coroutine_processor_runs_on_the_loop(fleet: Fleet, tmp_path: Path) -> None:
    class Async:
        name = "async-proc"
        cadence_minutes = 1.5

        async def process_session(self, session_path: Path, username: str, session_key: str,
                                  **kwargs: Any) -> ProcessorResult:
            await asyncio.sleep(0)
            return ProcessorResult(items_count=7)

    register(Async())
    try:
        _sessions(tmp_path, {"u/a.jsonl": 1})
        assert (await fleet.processors.run("async-proc", tmp_path))["items_extracted"] == 7
    finally:
        unregister("async-proc")


@pytest.fixture
async def gate(fleet: Fleet, tmp_path: Path) -> AsyncIterator[tuple[asyncio.Event, asyncio.Event]]:
    """A processor `gated` whose first session waits until released: a run that holds the lock."""
    entered, release = asyncio.Event(), asyncio.Event()

    class Gated:
        name = "gated"
        cadence_minutes = 1

        async def process_session(self, session_path: Path, username: str, session_key: str,
                                  **kwargs: Any) -> None:
            entered.set()
            await release.wait()

    register(Gated())
    yield entered, release
    release.set()
    unregister("gated")


async def test_the_lock_busy_at_once_and_released_when_the_runner_raises(
    fleet: Fleet, gate: tuple[asyncio.Event, asyncio.Event], tmp_path: Path
) -> None:
    entered, release = gate
    _sessions(tmp_path, {"u/a.jsonl": 1})
    running = asyncio.create_task(fleet.processors.run("gated", tmp_path))
    await entered.wait()
    other = await Fleet.connect(settings=fleet.settings, name="second")
    try:
        with pytest.raises(ProcessorLockBusy, match="already running"):
            await other.processors.run("gated", tmp_path)  # at once, not after the first run
    finally:
        await other.close()
    release.set()
    assert (await running)["processed"] == 1

    # the runner itself raises (the resolver fails): the lock is released, the record says why
    _sessions(tmp_path, {"u/b.jsonl": 1})

    def broken(dir_name: str) -> None:
        raise KeyError("directory service down")

    with pytest.raises(KeyError):
        await fleet.processors.run("gated", tmp_path, user_resolver=broken)
    (record, _) = (await fleet.processors.runs("gated")).items
    assert (record.ok, record.unhandled_error) == (False, "KeyError: 'directory service down'")
    lock = await fleet.processors.lock("gated")
    assert (lock.state, lock.held) == ("released", False)
    assert (await fleet.processors.run("gated", tmp_path))["processed"] == 1  # free again


async def test_registry(lines: Lines) -> None:
    assert get_processor("lines") is lines and get_processor("nope") is None
    assert "lines" in list_processor_names() and list_processor_names() == sorted(list_processor_names())

    class Bad:
        name = "bad"
        cadence_minutes = 0

        def process_session(self) -> None: ...

    with pytest.raises(FleetValidationError) as info:
        register(Bad())
    assert info.value.field == "cadence_minutes"
    with pytest.raises(FleetValidationError) as info:
        register(object())
    assert info.value.field == "name"


async def test_unknown_processor_names_the_known_ones(fleet: Fleet, lines: Lines, tmp_path: Path) -> None:
    with pytest.raises(UnknownProcessor) as info:
        await fleet.processors.run("x", tmp_path)
    assert str(info.value) == f"Unknown processor 'x'. Known: {', '.join(list_processor_names())}"
    assert "lines" in str(info.value)


async def test_the_request_endpoint(fleet: Fleet, lines: Lines, gate: tuple[asyncio.Event, asyncio.Event],
                                    tmp_path: Path) -> None:
    _sessions(tmp_path, {"u/a.jsonl": 2, "u/b.jsonl": 1, "v/c.jsonl": 1})
    ready = asyncio.Event()
    serving = asyncio.create_task(fleet.processors.serve_runs(tmp_path, ready=ready))
    caller = await Fleet.connect(settings=fleet.settings, name="scheduler")
    try:
        await ready.wait()
        stats = await caller.processors.request_run("lines", max_sessions_per_run=2)
        assert set(stats) == STATS_KEYS
        assert (stats["scanned"], stats["processed"], stats["capped"], stats["items_extracted"]) == (3, 2, 1, 3)
        with pytest.raises(UnknownProcessor, match=r"Unknown processor 'nope'\. Known: .*lines"):
            await caller.processors.request_run("nope")
        # while a run holds the lock, a request answers "already running" at once
        entered, release = gate
        running = asyncio.create_task(fleet.processors.run("gated", tmp_path))
        await entered.wait()
        with pytest.raises(ProcessorLockBusy, match="already running"):
            await caller.processors.request_run("gated")
        release.set()
        await running
        with pytest.raises(FleetValidationError):
            await caller.processors.request_run("lines", time_budget_seconds=-1)
        # A request naming a stream subject as its reply is dropped unanswered (the deputy guard,
        # backbone/replies.py): nothing is stored there, for health and run alike.
        nc = await caller.nats()
        js = nc.jetstream()
        target = "fleet.proc.lines.lock"  # compacted: the subject's last message is what counts
        before = (await js.get_last_msg("FLEET_PROCESSORS", target)).seq
        for subject, body in (("fleetlog.processors.health", b"{}"), ("fleetlog.processors.run", b'{"processor":"x"}')):
            await nc.publish(subject, body, reply=target)
        await nc.flush()
        # Answered in order on each endpoint's subscription: once these two inbox requests are
        # answered, the two above were handled (dropped, or answered onto `target`).
        health = await nc.request("fleetlog.processors.health", b"{}", timeout=10)
        assert "Nats-Service-Error-Code" not in (health.headers or {})
        with pytest.raises(UnknownProcessor):
            await caller.processors.request_run("x")
        assert (await js.get_last_msg("FLEET_PROCESSORS", target)).seq == before
    finally:
        await caller.close()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)


async def test_serve_answers_processor_runs_with_its_sessions(settings: FleetSettings, lines: Lines,
                                                               tmp_path: Path) -> None:
    """`fleetlog up|serve --sessions DIR` (FLEETLOG_PROCESSOR_SESSIONS): the node that holds the
    sessions answers processors.run beside its reactors."""
    sessions = tmp_path / "sessions"
    _sessions(sessions, {"u/a.jsonl": 2, "v/b.jsonl": 3})
    srv = Server(settings.model_copy(update={"reactors": True, "processor_sessions": sessions}))
    await srv.start()
    try:
        async with Fleet.connect(settings=settings, name="operator") as caller:
            async def answered() -> dict[str, Any] | None:
                try:
                    return await caller.processors.request_run("lines", timeout=5)
                except FleetUnavailable:
                    return None  # the reactors (and the runs service with them) start just after serving
            stats = await wait_until(answered, 30)
        assert (stats["scanned"], stats["processed"], stats["items_extracted"]) == (2, 2, 5)
    finally:
        await srv.stop()
