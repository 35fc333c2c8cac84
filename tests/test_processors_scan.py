"""`scan_unprocessed_for`, rule by rule, against the real broker and real files in tmp dirs
(mtimes set with os.utime): no row, no processed_at, stat failing, mtime at or after
processed_at, the 50 ms window (10 ms inside, its inclusive edge, 1 s outside), a hash
read error, stray files, a missing dir; and which files were hashed."""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

from fleetlog.schemas import new_event_id, now_iso
from fleetlog.schemas.processors import ProcessorSessionMarked
from fleetlog.services.client.processors.files import compute_file_hash

from fleetlog import Fleet

T = datetime(2026, 3, 1, 12, 0, 0, 500_000)  # processed_at of every row here (naive UTC)
EPOCH = datetime(1970, 1, 1)


def _ns(at: datetime) -> int:
    d = at - EPOCH
    return (d.days * 86_400 + d.seconds) * 1_000_000_000 + d.microseconds * 1_000


def _session(root: Path, key: str, text: str = '{"a": 1}\n', mtime: datetime | None = None) -> Path:
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if mtime is not None:
        os.utime(path, ns=(_ns(mtime), _ns(mtime)))
    return path


class Counting:
    """compute_file_hash, counting the files it hashed."""

    def __init__(self) -> None:
        self.hashed: list[str] = []

    def __call__(self, path: Path) -> str:
        self.hashed.append(f"{path.parent.name}/{path.name}")
        return compute_file_hash(path)


async def _scan(fleet: Fleet, root: Path, processor: str = "p") -> tuple[list[str], list[str]]:
    counting = Counting()
    fleet.processors.compute_file_hash = counting
    found = await fleet.processors.scan_unprocessed_for(processor, root)
    for username, path in found:
        assert username == path.parent.name
    return sorted(f"{p.parent.name}/{p.name}" for _, p in found), sorted(counting.hashed)


async def test_each_scan_rule(fleet: Fleet, tmp_path: Path) -> None:
    root = tmp_path / "sessions"
    ms = timedelta(milliseconds=1)
    cases = {
        # key: (mtime, content differs from the row's hash?, surfaced?, hashed?)
        "a/no-row.jsonl": None,
        "a/mtime-equal.jsonl": (T, False, True, False),
        "a/mtime-after.jsonl": (T + 5 * ms, False, True, False),
        "b/inside-10ms-same.jsonl": (T - 10 * ms, False, False, True),
        "b/inside-10ms-changed.jsonl": (T - 10 * ms, True, True, True),
        "b/edge-50ms-changed.jsonl": (T - 50 * ms, True, True, True),  # inclusive
        "b/edge-50ms-same.jsonl": (T - 50 * ms, False, False, True),
        "c/outside-1s-changed.jsonl": (T - 1000 * ms, True, False, False),  # the documented residual gap
        "c/outside-51ms-changed.jsonl": (T - 51 * ms, True, False, False),
    }
    for key, case in cases.items():
        path = _session(root, key, mtime=None if case is None else case[0])
        if case is not None:
            stored = "not-the-hash" if case[1] else compute_file_hash(path)
            await fleet.processors.mark_processed("p", key, "u", 1, stored, read_at=T)
    surfaced, hashed = await _scan(fleet, root)
    assert surfaced == sorted(k for k, c in cases.items() if c is None or c[2])
    assert hashed == sorted(k for k, c in cases.items() if c is not None and c[3])
    # another processor has no rows: everything is surfaced, nothing hashed
    assert await _scan(fleet, root, "other") == (sorted(cases), [])


async def test_no_processed_at_stat_failure_and_hash_read_error_surface(fleet: Fleet, tmp_path: Path) -> None:
    root = tmp_path / "s"
    _session(root, "u/no-time.jsonl", mtime=T - timedelta(hours=1))
    fleet.emit(ProcessorSessionMarked(id=new_event_id(), ts=now_iso(), processor="p", session_file="u/no-time.jsonl",
                                      username="u", items_extracted=0, file_hash="x", processed_at=None))
    (root / "u" / "dangling.jsonl").symlink_to(root / "u" / "gone")  # listed, but stat fails
    # a directory named like a session: stat works (its mtime inside the window), reading it does not
    unreadable = root / "u" / "dir.jsonl"
    unreadable.mkdir()
    os.utime(unreadable, ns=(_ns(T - timedelta(milliseconds=10)),) * 2)
    _session(root, "u/fine.jsonl", mtime=T - timedelta(hours=1))
    for key in ("u/dangling.jsonl", "u/dir.jsonl", "u/fine.jsonl"):  # their tokens cover the raw emit above
        await fleet.processors.mark_processed("p", key, "u", 0, "x", read_at=T)
    surfaced, hashed = await _scan(fleet, root)
    assert surfaced == ["u/dangling.jsonl", "u/dir.jsonl", "u/no-time.jsonl"]
    assert hashed == ["u/dir.jsonl"]


async def test_layout_stray_files_order_and_a_missing_dir(fleet: Fleet, tmp_path: Path) -> None:
    root = tmp_path / "s"
    for key in ("zed/b.jsonl", "zed/a.jsonl", "zed/c.jsonl", "amy/x.jsonl"):
        _session(root, key)
    (root / "stray.jsonl").write_text("{}\n")  # not in a user dir: skipped
    (root / "zed" / "notes.txt").write_text("x")  # not *.jsonl
    _session(root, "zed/deeper/d.jsonl")  # not directly inside the user dir
    found = await fleet.processors.scan_unprocessed_for("p", root)
    by_dir: dict[str, list[str]] = {}
    for username, path in found:
        by_dir.setdefault(username, []).append(path.name)
    assert by_dir == {"zed": ["a.jsonl", "b.jsonl", "c.jsonl"], "amy": ["x.jsonl"]}  # sorted within a dir
    assert all(path.is_absolute() == root.is_absolute() for _, path in found)
    assert await fleet.processors.scan_unprocessed_for("p", tmp_path / "missing") == []
    assert await fleet.processors.scan_unprocessed_for("p", root / "stray.jsonl") == []


async def test_a_scan_right_after_a_mark_sees_it(fleet: Fleet, tmp_path: Path) -> None:
    root = tmp_path / "s"
    path = _session(root, "u/s.jsonl", mtime=T - timedelta(minutes=1))
    assert [p for _, p in await fleet.processors.scan_unprocessed_for("p", root)] == [path]
    await fleet.processors.mark_processed("p", "u/s.jsonl", "u", 1, compute_file_hash(path), read_at=T)
    assert await fleet.processors.scan_unprocessed_for("p", root) == []  # no wait, no token: the client's own
    other = await Fleet.connect(settings=fleet.settings, name="other")
    try:  # another client with the writer's token sees a new row too
        new = _session(root, "u/t.jsonl", mtime=T - timedelta(minutes=1))
        assert [p for _, p in await other.processors.scan_unprocessed_for("p", root)] == [new]
        token = await fleet.processors.mark_processed("p", "u/t.jsonl", "u", 1, compute_file_hash(new), read_at=T)
        assert await other.processors.scan_unprocessed_for("p", root, min_seq=token) == []
    finally:
        await other.close()
