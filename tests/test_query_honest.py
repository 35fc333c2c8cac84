"""Honest answers (issue 9): lag computed when the answer is made, a node that answers only
once caught up, `$SRV.STATS` that count every error and the real time. Real nats-server,
real DuckDB, a second real `Server` on the same broker."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import nats
import pytest
from fleetlog.schemas.answers import StatusAnswer, node_status_subject
from fleetlog.services.backbone.errors import FleetValidationError, QueryError
from fleetlog.services.client.nodes import node_statuses
from fleetlog.services.node.server import Server
from fleetlog.services.query.cursors import read_consistent

from fleetlog import Fleet, FleetSettings, StaleError

STREAM = "FLEET_ATTEMPTS"


async def test_lag_is_the_streams_end_minus_what_the_answer_saw(fleet: Fleet, server: Server) -> None:
    """The fold is held: answers say how far behind they are (events and age), and as_of stays
    below the writer's token; once it folds again, lag and lag_s are 0."""
    fleet.attempts.record(agent="lag", action="a", outcome="success", elapsed_s=1)
    first = await fleet.flush()
    await fleet.attempts.query(agent="lag", min_seq=first)
    server.projector.pause()
    for i in range(6):
        fleet.attempts.record(agent="lag", action="a", outcome="success", elapsed_s=float(i))
    token = await fleet.flush()
    behind = token[STREAM] - first[STREAM]
    assert behind == 6

    page = await fleet.attempts.query(agent="lag")
    stats = await fleet.attempts.stats()  # a cached answer: stamped when it is made, too
    sql = await fleet.sql("SELECT count(*) FROM attempts")
    status = await fleet.status()
    for answer in (page, stats, sql, status):
        assert answer.as_of[STREAM] == first[STREAM], answer.as_of
        assert answer.lag[STREAM] == behind, answer.lag
        assert answer.lag_s[STREAM] > 0, answer.lag_s
    assert [r.agent for r in page.items] == ["lag"] and sql.rows == [[1]]
    (view,) = [p for p in status.projections if p.name == "attempts"]
    assert view.lag[STREAM] == behind and view.lag_seconds[STREAM] > 0
    server.query.wait_max_s = 0.2
    with pytest.raises(StaleError):  # the token is not folded: no answer claims it is
        await fleet.attempts.query(agent="lag", min_seq=token)
    server.query.wait_max_s = 5.0

    server.projector.resume()
    page = await fleet.attempts.query(agent="lag", min_seq=token)
    sql = await fleet.sql("SELECT count(*) FROM attempts", min_seq=token)
    for answer in (page, sql):
        assert answer.as_of[STREAM] == token[STREAM]
        assert answer.lag[STREAM] == 0 and answer.lag_s[STREAM] == 0.0
    assert len(page.items) == 7 and sql.rows == [[7]]


async def _node_status(nc: Any, node: str) -> StatusAnswer:
    import msgspec

    msg = await nc.request(node_status_subject(node), b"{}", timeout=10)
    return msgspec.json.decode(msg.data, type=StatusAnswer)


async def _counts_agree(fleet: Fleet, n: int) -> list[int]:
    """n `SELECT count(*)` answers; each count must be exactly what its as_of holds (one
    attempt per FLEET_ATTEMPTS message)."""
    answers = await asyncio.gather(*(fleet.sql("SELECT count(*) FROM attempts") for _ in range(n)))
    for a in answers:
        assert a.rows == [[a.as_of[STREAM]]], (a.rows, a.as_of)
    return [a.rows[0][0] for a in answers]


async def test_a_second_node_answers_only_once_caught_up(fleet: Fleet, server: Server, settings: FleetSettings,
                                                         tmp_path: Path) -> None:
    for i in range(400):
        fleet.attempts.record(agent=f"n{i % 4}", action="a", outcome="success", elapsed_s=1.0)
    token = await fleet.flush()
    await fleet.attempts.stats(min_seq=token)

    second = Server(settings.model_copy(update={"data_dir": tmp_path / "second"}), fold_paused=True)
    await second.start(wait=False)
    nc = await nats.connect(settings.nats_url)
    try:
        status = await _node_status(nc, second.query.node)
        assert status.node == second.query.node and status.node_state == "catching up"
        progress = {c.stream: c for c in status.catch_up}
        assert progress[f"attempts:{STREAM}"].target == token[STREAM]
        assert progress[f"attempts:{STREAM}"].folded == 0
        # Writers keep going while queries run: every answer comes from the caught-up node,
        # and its count is exactly its as_of.
        for i in range(100):
            fleet.attempts.record(agent="more", action="a", outcome="success", elapsed_s=1.0)
            if i % 25 == 0:
                await _counts_agree(fleet, 10)
        assert not second.query.serving.is_set()
        every = await node_statuses(fleet, wait_s=60, expect=2)
        assert [(a.node, a.node_state) for a in every] == [(server.query.node, "serving"),
                                                          (second.query.node, "catching up")]
        assert "sql" not in {e["name"] for e in await _stats(nc, second.query.node)}

        second.projector.resume()
        await second.serving()
        status = await _node_status(nc, second.query.node)
        assert status.node_state == "serving" and status.catch_up == []
        assert status.as_of[STREAM] >= token[STREAM]
        await _counts_agree(fleet, 60)
        answered = {e["name"]: e["num_requests"] for e in await _stats(nc, second.query.node)}
        assert answered["sql"] > 0  # the second node is in the query group now (60 tries)
    finally:
        await nc.close()
        await second.stop()


async def _stats(nc: Any, node: str) -> list[dict[str, Any]]:
    msg = await nc.request(f"$SRV.STATS.fleetlog.{node}", b"", timeout=10)
    endpoints: list[dict[str, Any]] = json.loads(msg.data)["endpoints"]
    return endpoints


async def test_srv_stats_count_every_error_and_the_real_time(fleet: Fleet, server: Server) -> None:
    """Refused, oversize and timed-out requests are errors in $SRV.STATS, and the time is the
    time to the reply (the timed-out one alone ran sql_timeout_s)."""
    server.query.sql_timeout_s = 0.5
    with pytest.raises(FleetValidationError):
        await fleet.sql("DELETE FROM attempts")
    with pytest.raises(QueryError, match="max_payload"):
        await fleet.sql("SELECT repeat('x', 2000000)")
    with pytest.raises(QueryError, match=r"longer than 0\.5s"):
        await fleet.sql("SELECT sum(a.range * b.range) FROM range(100000) a, range(100000) b", timeout=60)
    await fleet.sql("SELECT 1")
    nc = await nats.connect(fleet.settings.nats_url)
    try:
        sql = next(e for e in await _stats(nc, server.query.node) if e["name"] == "sql")
    finally:
        await nc.close()
    assert sql["num_requests"] == 4
    assert sql["num_errors"] == 3
    assert sql["last_error"].startswith("408")
    assert sql["processing_time"] >= 0.5e9  # the interrupted statement ran at least its time limit
    assert sql["average_processing_time"] == sql["processing_time"] // 4


async def test_a_read_during_a_commit_is_read_again_in_one_transaction(fleet: Fleet, server: Server) -> None:
    """`read_consistent`: as_of from the projector's committed checkpoints when no fold
    committed during the read, else from the checkpoints table in the read's own transaction
    (the read runs again) — the same figure either way."""
    for i in range(3):
        fleet.attempts.record(agent="seq", action="a", outcome="success", elapsed_s=float(i))
    token = await fleet.flush()
    await fleet.attempts.query(agent="seq", min_seq=token)
    projector = server.projector
    schema = projector.live("attempts").gen.schema
    calls: list[int] = []

    def count(cur: Any, commit_meanwhile: bool) -> int:
        calls.append(1)
        if commit_meanwhile and len(calls) == 1:
            with projector.committed.committing(schema, STREAM, token[STREAM]):  # as if a fold committed meanwhile
                pass
        row = cur.execute("SELECT count(*) FROM attempts").fetchone()
        return int(row[0])

    def run(commit_meanwhile: bool) -> tuple[dict[str, int], int]:
        cur = projector.store.cursor(schema)
        try:
            return read_consistent(cur, projector, [schema], lambda c: count(c, commit_meanwhile))
        finally:
            cur.close()

    fast = await asyncio.to_thread(run, False)
    assert len(calls) == 1
    calls.clear()
    again = await asyncio.to_thread(run, True)
    assert len(calls) == 2  # read again, in a transaction with the checkpoints
    assert fast == again == ({STREAM: token[STREAM]}, 3)


async def test_a_commit_into_another_generation_leaves_the_fast_path(fleet: Fleet, server: Server) -> None:
    """The seqlock is per generation schema and spans only the COMMIT: a fold committing into
    `runs` while an attempts read runs does not make that read run again (the counter used to
    be shared by every projection and odd for the whole batch)."""
    fleet.attempts.record(agent="own", action="a", outcome="success", elapsed_s=1.0)
    token = await fleet.flush()
    await fleet.attempts.query(agent="own", min_seq=token)
    projector = server.projector
    schema, runs = projector.live("attempts").gen.schema, projector.live("runs").gen.schema
    calls: list[int] = []

    def count(cur: Any) -> int:
        calls.append(1)
        with projector.committed.committing(runs, "FLEET_RUNS", 0):  # another view commits meanwhile
            pass
        row = cur.execute("SELECT count(*) FROM attempts").fetchone()
        return int(row[0])

    def run() -> tuple[dict[str, int], int]:
        cur = projector.store.cursor(schema)
        try:
            return read_consistent(cur, projector, [schema], count)
        finally:
            cur.close()

    assert await asyncio.to_thread(run) == ({STREAM: token[STREAM]}, 1)
    assert len(calls) == 1  # read once: the fast path


async def test_status_rows_and_checkpoints_come_from_one_read(fleet: Fleet, server: Server) -> None:
    """The fold thread commits before the event loop moves the in-memory feed: in that window
    status took its checkpoints from the feed and counted rows afterwards, claiming more rows
    than its as_of. The window is held open here by setting the feed back."""
    for i in range(5):
        fleet.attempts.record(agent="st", action="a", outcome="success", elapsed_s=float(i))
    token = await fleet.flush()
    await fleet.attempts.query(agent="st", min_seq=token)
    server.projector.pause()
    feed = server.projector.live("attempts").feeds[STREAM]
    folded, feed.checkpoint = feed.checkpoint, 2  # as if the commit of 3..5 had not reached the feed yet
    try:
        status = await fleet.status()
    finally:
        feed.checkpoint = folded
        server.projector.resume()
    (view,) = [p for p in status.projections if p.name == "attempts"]
    assert view.rows["attempts"] == 5 == view.checkpoints[STREAM] == status.as_of[STREAM]


async def test_answers_at_one_position_share_one_age_lookup(fleet: Fleet, server: Server,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """lag_s needs the broker timestamp of the first event not folded: every answer at that
    position shares one DIRECT.GET (each concurrent answer used to send its own)."""
    from fleetlog.services.query.heads import StreamHeads

    fleet.attempts.record(agent="age", action="a", outcome="success", elapsed_s=1.0)
    first = await fleet.flush()
    await fleet.attempts.query(agent="age", min_seq=first)
    server.projector.pause()
    for i in range(3):
        fleet.attempts.record(agent="age", action="a", outcome="success", elapsed_s=float(i))
    await fleet.flush()
    real = StreamHeads._stored_at
    asked: list[tuple[str, int]] = []

    async def stored_at(self: StreamHeads, stream: str, seq: int) -> float | None:
        asked.append((stream, seq))
        return await real(self, stream, seq)

    monkeypatch.setattr(StreamHeads, "_stored_at", stored_at)
    try:
        answers = await asyncio.gather(*(fleet.attempts.query(agent="age", limit=1) for _ in range(24)))
    finally:
        server.projector.resume()
    assert all(a.lag[STREAM] == 3 and a.lag_s[STREAM] > 0 for a in answers)
    assert asked == [(STREAM, first[STREAM] + 1)]


async def test_a_stats_reset_zeroes_requests_errors_and_time(fleet: Fleet, server: Server) -> None:
    """nats-py's reset only moved `started`: requests and our error counts stayed, so after a
    reset errors could exceed requests."""
    for _ in range(2):
        with pytest.raises(FleetValidationError):
            await fleet.sql("DELETE FROM attempts")
    assert server.query._service is not None
    await server.query._service.reset()
    await fleet.sql("SELECT 1")
    nc = await nats.connect(fleet.settings.nats_url)
    try:
        sql = next(e for e in await _stats(nc, server.query.node) if e["name"] == "sql")
    finally:
        await nc.close()
    assert (sql["num_requests"], sql["num_errors"]) == (1, 0)
    assert not sql["last_error"]
    assert 0 < sql["processing_time"] == sql["average_processing_time"]
