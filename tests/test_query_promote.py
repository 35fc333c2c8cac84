"""Reads across a rebuild's promotion (issue 9 review): the promoted generation's old schema
is dropped under requests that chose it before; they read the new live one instead of
failing, and reader threads close their cursors on dropped schemas. Real nats-server,
real DuckDB."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

from fleetlog.projections.attempts import AttemptsProjection
from fleetlog.services.node.server import Server

from fleetlog import Fleet, FleetSettings

STREAM = "FLEET_ATTEMPTS"


class _AttemptsNext(AttemptsProjection):
    version: ClassVar[int] = AttemptsProjection.version + 1


async def _record(fleet: Fleet, n: int) -> dict[str, int]:
    for i in range(n):
        fleet.attempts.record(agent="p", action="a", outcome="success", elapsed_s=float(i))
    return await fleet.flush()


async def test_sql_waiting_for_its_token_across_a_promotion_reads_the_new_generation(
        settings: FleetSettings, tmp_path: Path) -> None:
    """The node restarts on a new version: the old live view does not fold, so a token past
    it is reached only by the rebuilt generation, whose promotion drops the old schema while
    the `sql` request waits. It chose its schemas before the wait and failed with "No catalog
    + schema named ..."; now it reads the generation that is live when it runs."""
    own = settings.model_copy(update={"data_dir": tmp_path / "own"})
    fleet = await Fleet.connect(settings=settings)
    node = Server(own, projections=[AttemptsProjection()])
    try:
        await node.start()
        token = await _record(fleet, 20)
        await node.projector.wait_for("attempts", token, 30)
        await node.stop()
        token = await _record(fleet, 5)

        node = Server(own, projections=[_AttemptsNext()], fold_paused=True)
        await node.start()
        old = node.projector.live("attempts").gen.schema
        node.query.wait_max_s = 60
        asking = asyncio.ensure_future(fleet.sql("SELECT count(*) FROM attempts", min_seq=token, timeout=90))
        while not (node.query._dispatch and node.query._dispatch.tasks):  # it arrived, and waits
            assert not asking.done()
            await asyncio.sleep(0.02)
        node.projector.resume()
        answer = await asking
        assert node.projector.live("attempts").gen.schema != old  # promoted meanwhile
        assert answer.rows == [[25]] and answer.as_of[STREAM] == token[STREAM]
    finally:
        await fleet.close()
        await node.stop()


async def test_reader_threads_close_their_cursors_on_dropped_generations(fleet: Fleet, server: Server) -> None:
    token = await _record(fleet, 10)
    await fleet.attempts.query(agent="p", min_seq=token)
    projector, cursors = server.projector, server.query.cursors
    old = projector.live("attempts").gen.schema
    other = projector.live("runs").gen.schema
    thread = ThreadPoolExecutor(max_workers=1)
    try:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(thread, cursors.get, old)
        assert old in await loop.run_in_executor(thread, cursors.held)
        await projector.rebuild("attempts")
        while old not in projector.store.dropped_schemas():  # promoted, and the old schema dropped
            await fleet.attempts.query(agent="p", limit=1)  # reads go on while it rebuilds
        await loop.run_in_executor(thread, cursors.get, other)  # the thread's next read
        assert await loop.run_in_executor(thread, cursors.held) == {other}
    finally:
        thread.shutdown()
