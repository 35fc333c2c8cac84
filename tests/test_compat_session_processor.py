"""fleetlog.compat.session_processor_state and .session_pipeline exercised the way agnes' own
tests do: real session files in tmp dirs (mtimes set with os.utime), a real broker and server,
the synchronous repository and runner called from a thread."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fleetlog.services.node.server import Server

from fleetlog import FleetSettings
from fleetlog.compat import session_pipeline as pipeline
from fleetlog.compat.session_processor_state import SessionProcessorStateRepository

from .helpers import in_compat_thread


def _session(root: Path, user: str, name: str, lines: int = 2, mtime: datetime | None = None) -> Path:
    path = root / user / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f'{{"n": {i}}}\n' for i in range(lines)))
    if mtime is not None:
        os.utime(path, (mtime.timestamp(), mtime.timestamp()))
    return path


class Recorder:
    """A processor with the original's positional call: (path, username, session_key, conn, user_id=...)."""

    def __init__(self, name: str = "usage", fail: set[str] | None = None) -> None:
        self.name = name
        self.cadence_minutes = 5
        self.calls: list[tuple[str, str, str, Any, Any]] = []
        self.fail = fail or set()

    def process_session(self, session_path: Path, username: str, session_key: str, conn: Any,
                        user_id: Any = None) -> pipeline.ProcessorResult:
        self.calls.append((session_path.name, username, session_key, conn, user_id))
        if session_key in self.fail:
            raise RuntimeError("boom")
        return pipeline.ProcessorResult(items_count=sum(1 for _ in pipeline.parse_jsonl(session_path)))


async def test_repository_round_trip(settings: FleetSettings, server: Server, tmp_path: Path) -> None:
    read_at = datetime(2026, 1, 2, 3, 4, 5, 678901)

    def work() -> tuple[Any, ...]:
        repo = SessionProcessorStateRepository()
        repo.mark_processed(processor_name="usage", session_file="alice/a.jsonl", username="alice", items_count=3,
                            file_hash="h1", read_at=read_at)
        repo.mark_processed("usage", "alice/b.jsonl", "alice", 2, "h2")
        repo.mark_processed("other", "alice/a.jsonl", "alice", 9, "h9")
        return (repo.is_processed("usage", "alice/a.jsonl", "h1"), repo.is_processed("usage", "alice/a.jsonl", "x"),
                repo.get_states_for_session_files("usage", ["alice/a.jsonl", "nobody/z.jsonl"]),
                repo.get_states_for_session_files("usage", []),
                repo.processed_session_files("usage"), repo.max_processed_at("usage"),
                repo.activity_since("usage", read_at - timedelta(seconds=1)),
                repo.delete_for_processors([]), repo.delete_for_processors(["usage"]),
                repo.processed_session_files("usage"), repo.processed_session_files("other"))

    (ok, bad, states, empty, files, latest, activity, none_deleted, deleted, after, other) = \
        await in_compat_thread(settings, work)
    assert (ok, bad) == (True, False)
    assert states == {"alice/a.jsonl": {"processed_at": read_at, "items_extracted": 3}}
    assert isinstance(states["alice/a.jsonl"]["processed_at"], datetime)
    assert empty == {} and files == {"alice/a.jsonl", "alice/b.jsonl"}
    assert latest is not None and latest > read_at  # b was marked now
    assert activity["items_extracted"] == 5 and activity["last_processed_at"] == latest
    assert (none_deleted, deleted, after, other) == (0, 2, set(), {"alice/a.jsonl"})


async def test_scan_rules(settings: FleetSettings, server: Server, tmp_path: Path) -> None:
    sessions = tmp_path / "sessions"
    processed_at = datetime.now(UTC).replace(tzinfo=None) - timedelta(hours=1)
    old = processed_at.replace(tzinfo=UTC) - timedelta(seconds=1)
    _session(sessions, "alice", "new.jsonl")
    stable = _session(sessions, "alice", "stable.jsonl", mtime=old)
    touched = _session(sessions, "bob", "touched.jsonl", mtime=processed_at.replace(tzinfo=UTC))  # mtime == p
    window = _session(sessions, "bob", "window.jsonl", mtime=processed_at.replace(tzinfo=UTC) - timedelta(
        milliseconds=10))
    (sessions / "stray.jsonl").write_text("{}\n")

    def work() -> list[tuple[str, Path]]:
        repo = SessionProcessorStateRepository()
        for path, digest in ((stable, pipeline.compute_file_hash(stable)), (touched, "t"), (window, "not-its-md5")):
            repo.mark_processed("usage", f"{path.parent.name}/{path.name}", path.parent.name, 1, digest,
                                read_at=processed_at)
        return repo.scan_unprocessed_for("usage", sessions)

    found = await in_compat_thread(settings, work)
    assert sorted((u, p.name) for u, p in found) == [("alice", "new.jsonl"), ("bob", "touched.jsonl"),
                                                     ("bob", "window.jsonl")]
    missing = await in_compat_thread(settings, lambda: SessionProcessorStateRepository().scan_unprocessed_for(
        "usage", tmp_path / "none"))
    assert missing == []


async def test_run_processor_passes_conn_and_marks(settings: FleetSettings, server: Server, tmp_path: Path) -> None:
    sessions = tmp_path / "sessions"
    _session(sessions, "alice", "a.jsonl", lines=3)
    _session(sessions, "bob", "b.jsonl", lines=1)
    conn = object()
    proc = Recorder(fail={"bob/b.jsonl"})

    def work() -> tuple[dict[str, Any], dict[str, Any], bool]:
        first = pipeline.run_processor(conn, proc, session_dir=sessions,
                                       user_resolver=lambda d: (f"id-{d}", f"{d}@x") if d == "alice" else None)
        second = pipeline.run_processor(proc, session_dir=sessions)  # the bare form; bob is retried
        repo = SessionProcessorStateRepository()
        return first, second, repo.is_processed("usage", "alice/a.jsonl", pipeline.compute_file_hash(
            sessions / "alice" / "a.jsonl"))

    first, second, marked = await in_compat_thread(settings, work)
    # user directories come in directory order (unsorted, as in the original): compare as a set
    assert set(proc.calls[:2]) == {("a.jsonl", "alice@x", "alice/a.jsonl", conn, "id-alice"),
                                   ("b.jsonl", "bob", "bob/b.jsonl", conn, None)}
    assert (first["scanned"], first["processed"], first["errors"], first["items_extracted"]) == (2, 1, 1, 3)
    assert first["errors_detail"] == [{"session": "bob/b.jsonl", "error": "RuntimeError: boom"}]
    assert (second["scanned"], second["processed"], second["errors"]) == (1, 0, 1) and proc.calls[2][3] is None
    assert marked is True


async def test_the_budget_clock_is_the_modules_own(settings: FleetSettings, server: Server, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    sessions = tmp_path / "sessions"
    for i in range(3):
        _session(sessions, "alice", f"{i}.jsonl")
    ticks = iter([0.0, 0.0, 5.0, 100.0, 100.0])  # loop start, then before each candidate
    monkeypatch.setattr(pipeline.time, "monotonic", lambda: next(ticks))
    assert pipeline.time is not __import__("time")
    proc = Recorder()

    stats = await in_compat_thread(settings, lambda: pipeline.run_processor(None, proc, session_dir=sessions,
                                                                      time_budget_seconds=10.0))
    assert (stats["processed"], stats["capped"]) == (2, 1)
    assert pipeline._DEFAULT_TIME_BUDGET_SECONDS == 150.0


def test_helpers(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text('{"a": 1}\n\nnot json\n{"b": 2}\n')
    assert list(pipeline.parse_jsonl(path)) == [{"a": 1}, {"b": 2}]
    assert pipeline.compute_file_hash(path) == __import__("hashlib").md5(path.read_bytes()).hexdigest()
    assert pipeline.get_processor("no-such-processor") is None
    assert pipeline.list_processor_names() == sorted(pipeline.list_processor_names())
