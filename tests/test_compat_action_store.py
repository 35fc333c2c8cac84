"""fleetlog.compat.action_store exercised the way scitex's own attempt-log tests do: a real
broker and server, the store's module-level functions called synchronously from a thread."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fleetlog.services.node.server import Server

import fleetlog.compat as compat
from fleetlog import FleetSettings
from fleetlog.compat import action_store as store

from .helpers import in_compat_thread


def _rec(agent: str, action: str, outcome: str, elapsed: float, **extra: Any) -> dict[str, Any]:
    return {"agent": agent, "action": action, "outcome": outcome, "elapsed_s": elapsed, **extra}


async def test_append_then_query_reads_its_writes(settings: FleetSettings, server: Server, tmp_path: Path) -> None:
    def work() -> list[dict[str, Any]]:
        store.append_attempt(_rec("alpha", "nonce-probe", "success", 1.5, pane_before="before",
                                  pane_after={"format": "full", "text": "x" * 5000}, extras={"polls": 4}),
                             root=tmp_path)
        return store.query(agent="alpha", root=tmp_path)

    rows = await in_compat_thread(settings, work)
    assert len(rows) == 1
    row = rows[0]
    assert set(row) == {"id", "ts", "agent", "action", "outcome", "elapsed_s", "pane_before", "pane_after", "extras"}
    assert (row["agent"], row["action"], row["outcome"], row["elapsed_s"]) == ("alpha", "nonce-probe", "success", 1.5)
    assert row["pane_before"] == {"format": "full", "text": "before"}
    assert row["pane_after"]["truncated"] is True and len(row["pane_after"]["text"]) == store.DEFAULT_SNAPSHOT_MAX_CHARS
    assert row["extras"] == {"polls": 4}


async def test_bad_records_never_raise_and_are_counted(settings: FleetSettings, server: Server,
                                                       tmp_path: Path) -> None:
    def work() -> tuple[list[dict[str, Any]], dict[str, int]]:
        before = compat.error_counts().get("action_store.append_attempt", 0)
        store.append_attempt({"agent": "a"}, root=tmp_path)                          # missing keys
        store.append_attempt(_rec("a", "x", "success", "not-a-number"), root=tmp_path)  # bad elapsed
        store.append_attempt(_rec("a", "x", "success", -1.0), root=tmp_path)          # fleetlog's rule
        store.append_attempt(_rec("a", "x", "success", 1.0), root=tmp_path)
        after = compat.error_counts().get("action_store.append_attempt", 0)
        return store.query(root=tmp_path), {"swallowed": after - before}

    rows, counts = await in_compat_thread(settings, work)
    assert [r["elapsed_s"] for r in rows] == [1.0]
    assert counts == {"swallowed": 3}


async def test_roots_are_separate_fleets(settings: FleetSettings, server: Server, tmp_path: Path) -> None:
    r1, r2 = tmp_path / "one", tmp_path / "two"

    def work() -> tuple[Any, ...]:
        store.append_attempt(_rec("alpha", "probe", "success", 1.0), root=r1)
        store.append_attempt(_rec("alpha", "probe", "send_error", 2.0), root=r2)
        store.append_attempt(_rec("beta", "probe", "success", 3.0), root=r2)
        return (store.query(root=r1), store.query(root=r2), store.query(agent="alpha", root=r2),
                store.stats(root=r1), store.summarize("beta", root=r1)["counts"])

    q1, q2, q2a, s1, sum1 = await in_compat_thread(settings, work)
    assert [(r["agent"], r["outcome"]) for r in q1] == [("alpha", "success")]
    assert sorted((r["agent"], r["outcome"]) for r in q2) == [("alpha", "send_error"), ("beta", "success")]
    assert [r["elapsed_s"] for r in q2a] == [2.0]
    assert s1 == [{"action": "probe", "outcome": "success", "count": 1, "mean_elapsed_s": 1.0, "p95_elapsed_s": 1.0}]
    assert sum1 == {}


async def test_filters_order_paging_stats_and_summary(settings: FleetSettings, server: Server,
                                                      tmp_path: Path) -> None:
    now = datetime.now(UTC)

    def work() -> tuple[Any, ...]:
        for i in range(1, 11):
            ts = (now - timedelta(minutes=20 - i)).isoformat()
            store.append_attempt(_rec("a", "probe", "success", float(i), ts=ts), root=tmp_path)
        store.append_attempt(_rec("a", "send", "send_error", 0.5, ts=(now - timedelta(hours=3)).isoformat()),
                             root=tmp_path)
        return (store.query(agent="a", limit=3, offset=1, root=tmp_path),
                store.query(agent="a", since="1h", root=tmp_path),
                store.query(outcome="send_error", root=tmp_path),
                store.stats(agent="a", root=tmp_path),
                store.stats(root=tmp_path),
                store.summarize("a", root=tmp_path),
                store.summarize("nobody", root=tmp_path))

    page, recent, errors, st_agent, st_root, summary, empty = await in_compat_thread(settings, work)
    assert [r["elapsed_s"] for r in page] == [9.0, 8.0, 7.0]          # newest first, offset 1
    assert len(recent) == 10 and all(r["action"] == "probe" for r in recent)
    assert [r["outcome"] for r in errors] == ["send_error"]
    expected = [
        {"action": "probe", "outcome": "success", "count": 10, "mean_elapsed_s": 5.5, "p95_elapsed_s": 9.0},
        {"action": "send", "outcome": "send_error", "count": 1, "mean_elapsed_s": 0.5, "p95_elapsed_s": 0.5},
    ]
    assert st_agent == expected and st_root == expected
    assert summary["last_action_name"] == "probe" and summary["last_action_elapsed_s"] == 10.0
    assert summary["counts"] == {"probe:success": 10, "send:send_error": 1}
    assert summary["p95_elapsed_s_by_action"] == {"probe": 9.0, "send": 0.5}
    assert empty == {"last_action_at": "", "last_action_name": "", "last_action_outcome": "",
                     "last_action_elapsed_s": None, "counts": {}, "p95_elapsed_s_by_action": {}}


async def test_purge_old(settings: FleetSettings, server: Server, tmp_path: Path) -> None:
    old = (datetime.now(UTC) - timedelta(days=40)).isoformat()

    def work() -> tuple[int, list[dict[str, Any]]]:
        store.append_attempt(_rec("a", "probe", "success", 1.0, ts=old), root=tmp_path)
        store.append_attempt(_rec("a", "probe", "success", 2.0), root=tmp_path)
        return store.purge_old(root=tmp_path), store.query(root=tmp_path)

    deleted, rows = await in_compat_thread(settings, work)
    assert deleted == 1 and [r["elapsed_s"] for r in rows] == [2.0]


def test_helpers_keep_the_originals_rules() -> None:
    assert store.OUTCOMES == ("success", "precondition_fail", "send_error", "completion_timeout", "skipped_by_policy")
    assert store._truncate_snapshot(None) is None
    assert store._truncate_snapshot("abcdef", 3) == {"format": "full", "text": "def", "truncated": True}
    assert store._truncate_snapshot({"k": 1}) == {"format": "json-dump", "text": '{"k": 1}'}
    assert store._truncate_snapshot({"format": "diff", "text": "abcd"}, 2) == {"format": "diff", "text": "cd",
                                                                               "truncated": True}
    assert store._parse_since("2024-01-01T00:00:00+00:00") == "2024-01-01T00:00:00+00:00"
    assert store._parse_since("") is None
    parsed = store._parse_since("1.5h")
    assert parsed is not None
    delta = datetime.now(UTC) - datetime.fromisoformat(parsed)
    assert timedelta(hours=1.4) < delta < timedelta(hours=1.6)
    with pytest.raises(TypeError, match="Unsupported 'since' type: int"):
        store._parse_since(5)  # type: ignore[arg-type]


async def test_threads_share_one_connection(settings: FleetSettings, server: Server, tmp_path: Path) -> None:
    """Thread-safe like the original: eight threads append at once through the one shared FleetSync."""
    import threading

    def work() -> tuple[int, int]:
        sync = compat.shared()

        def burst(n: int) -> None:
            for i in range(50):
                store.append_attempt(_rec(f"t{n}", "probe", "success", float(i)), root=tmp_path)

        threads = [threading.Thread(target=burst, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rows = store.stats(root=tmp_path)
        return sum(r["count"] for r in rows), int(compat.shared() is sync)

    total, same = await in_compat_thread(settings, work)
    assert (total, same) == (400, 1)
