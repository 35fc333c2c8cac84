"""The query service's own behaviour (real nats-server, real DuckDB)."""

from __future__ import annotations

import asyncio
import math
import random
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
from fleetlog.projections import ATTEMPTS
from fleetlog.projections.attempts import _stats_rows, _where
from fleetlog.services.node.server import Server

from fleetlog import Fleet, FleetSettings, StaleError

STREAM = "FLEET_ATTEMPTS"


async def test_requests_waiting_for_min_seq_hold_no_query_slot(settings: FleetSettings, tmp_path: Path) -> None:
    """More requests than there are query slots (64) wait for a position the view has not
    folded; a query that needs no wait, and status, are answered while they all still wait."""
    quick = settings.model_copy(update={"query_wait_max_s": 3.0, "data_dir": tmp_path / "q"})
    srv = Server(quick)
    await srv.start()
    try:
        async with await Fleet.connect(settings=quick) as fleet:
            fleet.attempts.record(agent="slots", action="a", outcome="success", elapsed_s=1)
            token = await fleet.flush()
            beyond = {STREAM: token[STREAM] + 1000}
            waiting = [asyncio.create_task(fleet.attempts.stats(min_seq=beyond)) for _ in range(80)]
            page = await fleet.attempts.query(agent="slots", min_seq=token)
            status = await fleet.status()
            assert [r.agent for r in page.items] == ["slots"]
            assert status.projections
            assert not any(t.done() for t in waiting)
            results = await asyncio.gather(*waiting, return_exceptions=True)
            assert all(isinstance(r, StaleError) for r in results), {type(r).__name__ for r in results}
            with pytest.raises(StaleError):
                await fleet.attempts.query(min_seq=beyond)
    finally:
        await srv.stop()


def _p95(values: list[float]) -> float:
    s = sorted(values)
    return s[max(0, math.floor(0.95 * (len(s) - 1)))]


def test_stats_p95_is_exact_whatever_the_tail_threshold() -> None:
    """stats sorts only each group's values >= t (t from a sample): the answer must be the sorted
    sample at index max(0, floor(0.95·(n−1))) for every t, including a t above some group's p95
    (the query notices and runs again over every value). Real DuckDB, 300k rows."""
    rng = random.Random(7)
    rows: list[tuple[str, str, str, float]] = []
    sizes = {"one": 1, "two": 2, "three": 3, "ten": 10, "twenty": 20, "twentyone": 21, "hundred-one": 101}
    for action, n in sizes.items():
        rows += [("a1", action, "success", float(i + 1)) for i in range(n)]
    for g in range(12):  # big groups, with ties (rounded) and different scales
        scale = 0.2 if g == 0 else 1.5 * (g + 1)
        rows += [(f"a{i % 3}", f"big-{g:02d}", "success" if i % 4 else "send_error",
                  round(rng.expovariate(1 / scale), 1 if g % 2 else 4)) for i in range(24_000)]
    rng.shuffle(rows)
    con = duckdb.connect()
    for ddl in ATTEMPTS.ddl():
        con.execute(ddl)
    table = pa.table({
        "id": [str(uuid.uuid4()) for _ in rows], "seq": list(range(1, len(rows) + 1)), "ts": ["t"] * len(rows),
        "ts_utc": [datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=i) for i in range(len(rows))],
        "agent": [r[0] for r in rows], "action": [r[1] for r in rows], "outcome": [r[2] for r in rows],
        "elapsed_s": [r[3] for r in rows], "extras": ["{}"] * len(rows),
    })
    con.register("src", table)
    con.execute("INSERT INTO attempts (id, seq, ts, ts_utc, agent, action, outcome, elapsed_s, extras) "
                "SELECT CAST(id AS UUID), seq, ts, ts_utc, agent, action, outcome, elapsed_s, extras FROM src")

    def expected(agent: str | None, since_i: int | None) -> list[tuple[str, str, int, float]]:
        groups: dict[tuple[str, str], list[float]] = {}
        for i, (ag, action, outcome, e) in enumerate(rows):
            if (agent is None or ag == agent) and (since_i is None or i >= since_i):
                groups.setdefault((action, outcome), []).append(e)
        out = [(a, o, len(v), _p95(v)) for (a, o), v in groups.items()]
        return sorted(out, key=lambda x: (x[0], -x[2], x[1]))

    for agent, since_i in ((None, None), ("a1", None), (None, 250_000), ("a2", 100_000)):
        since = None if since_i is None else (datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=since_i)).isoformat()
        where, params = _where(agent, since)
        want = expected(agent, since_i)
        for tail_from in (None, -math.inf, 0.0, 1.0, 5.0, 1e9):
            got = [(s.action, s.outcome, s.count, s.p95_elapsed_s) for s in _stats_rows(con, where, params, tail_from)]
            assert got == want, (agent, since_i, tail_from)
    # the mean is the plain average
    [one] = [s for s in _stats_rows(con, *_where(None, None)) if s.action == "ten"]
    assert one.mean_elapsed_s == pytest.approx(5.5)

    # Later queries start from the last answer (a hint per key); when the view moved below it
    # (a group's p95 drops under the hint's threshold), the answer is still exact.
    where, params = _where(None, None)
    key = ("test", "hint")
    for _ in range(2):
        got = [(s.action, s.outcome, s.count, s.p95_elapsed_s) for s in _stats_rows(con, where, params, hint_key=key)]
        assert got == expected(None, None)
    low = [("a0", "big-00", "success", 0.0)] * 30_000  # the group with the smallest p95, pushed lower
    rows += low
    con.execute("INSERT INTO attempts (id, seq, ts, ts_utc, agent, action, outcome, elapsed_s, extras) "
                "SELECT uuid(), 1000000 + i, 't', TIMESTAMPTZ '2027-01-01 00:00:00+00', 'a0', 'big-00', 'success',"
                " 0.0, '{}' FROM range(30000) r(i)")
    for _ in range(2):
        got = [(s.action, s.outcome, s.count, s.p95_elapsed_s) for s in _stats_rows(con, where, params, hint_key=key)]
        assert got == expected(None, None)


async def test_stats_and_summary_are_reused_until_the_view_moves(fleet: Fleet, server: Server) -> None:
    """Same request, same view state: the answer is computed once. Once the view folds more,
    the next answer includes it (and a different request is a different answer)."""
    for i in range(5):
        fleet.attempts.record(agent="cache", action="a", outcome="success", elapsed_s=float(i))
    token = await fleet.flush()
    first = await fleet.attempts.stats(min_seq=token)
    summary = await fleet.attempts.summarize("cache", min_seq=token)
    hits = server.query.cache_hits
    again = await fleet.attempts.stats(min_seq=token)
    plain = await fleet.attempts.stats()
    summary_again = await fleet.attempts.summarize("cache")
    assert server.query.cache_hits == hits + 3
    assert again.items == plain.items == first.items
    assert summary_again.counts == summary.counts == {"a:success": 5}
    assert again.as_of == first.as_of
    other = await fleet.attempts.stats(agent="nobody")
    assert other.items == [] and server.query.cache_hits == hits + 3

    for i in range(3):
        fleet.attempts.record(agent="cache", action="a", outcome="success", elapsed_s=10.0 + i)
    token = await fleet.flush()
    moved = await fleet.attempts.stats(min_seq=token)
    summary_moved = await fleet.attempts.summarize("cache", min_seq=token)
    assert [(s.count, s.p95_elapsed_s) for s in moved.items] == [(8, 11.0)]
    assert summary_moved.counts == {"a:success": 8}
    assert moved.as_of[STREAM] >= token[STREAM]
