"""Promotion under load retires the old generation cleanly (review 4 finding).

`_maybe_promote` cancels the old generation's fold tasks. A cancellation that landed while
the loop waited for its batch in flight cancelled that future; the loop's `finally` then
raised `CancelledError` awaiting it again and never closed its reader: each promote under
load left the retired generation's reader open (its socket, its ordered consumer on the
stream, up to 12 MB of buffer). And the old schema was dropped before the old tasks were
stopped, so a fold still in flight failed ("Transaction conflict ... has been dropped").
Real nats-server, real DuckDB: publish continuously while the attempts view is rebuilt a
few times; afterwards only the live generation's consumer exists on FLEET_ATTEMPTS, every
retired fold task ended cleanly and no fold failed.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from fleetlog.schemas import AttemptRecorded, encode_event, new_event_id, now_iso
from fleetlog.services.node.server import Server

from fleetlog import Fleet

from .helpers import rebuild_and_wait, wait_until

STREAM = "FLEET_ATTEMPTS"
REBUILDS = 3


async def test_promotions_under_load_leave_only_the_live_consumer(
        fleet: Fleet, server: Server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="fleetlog")
    js = (await fleet.nats()).jetstream()
    projector = server.projector
    pane = {"format": "text", "text": "x" * 2000}
    stop = asyncio.Event()
    published = 0

    async def publish() -> None:
        nonlocal published
        while not stop.is_set():
            acks = [js.publish("fleet.attempt.w.act", encode_event(AttemptRecorded(
                id=new_event_id(), ts=now_iso(), agent="w", action="act", outcome="success",
                elapsed_s=1.0, pane_after=pane))) for _ in range(100)]
            await asyncio.gather(*acks)
            published += len(acks)

    publisher = asyncio.create_task(publish())
    retired: list[asyncio.Task[None]] = []
    try:
        await wait_until(lambda: _true(published > 0), timeout_s=10)
        for _ in range(REBUILDS):
            retired.extend(projector.live("attempts").tasks)
            await rebuild_and_wait(fleet, "attempts", timeout_s=60)
    finally:
        stop.set()
        await publisher

    def feeds_of_stream() -> int:
        return sum(1 for r in projector.running() if r.folds and STREAM in r.projection.streams)

    async def consumers_settled() -> bool:
        return all(t.done() for t in retired) and (
            (await js.stream_info(STREAM)).state.consumer_count == feeds_of_stream())

    # The old generation's tasks stop (and close their readers) once the promotion has
    # committed, so wait for that rather than read the count straight after the promotion.
    try:
        await wait_until(consumers_settled, timeout_s=10, interval_s=0.1)
    except AssertionError:
        names = sorted(c.name or "" for c in await js.consumers_info(STREAM))
        live = [(r.gen.schema, r.gen.state) for r in projector.running()]
        pytest.fail(f"consumers on {STREAM} after {REBUILDS} promotions: {names}; running: {live}; "
                    f"retired tasks done: {[t.done() for t in retired]}")
    assert len(retired) == REBUILDS  # one fold task per generation (attempts reads one stream)
    for task in retired:
        assert task.cancelled() or task.exception() is None, task.exception()
    assert projector.folder.bulk_fallbacks == 0
    failed = [r.getMessage() for r in caplog.records if "failed" in r.getMessage() or "ended with" in r.getMessage()]
    assert failed == []


async def _true(value: bool) -> bool:
    return value
