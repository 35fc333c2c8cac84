"""Catch-up transactions (services/projector/transactions.py): a feed far behind folds many
batches in one transaction. Every event lands once, rejects and a purge keep their place in
stream order, a failure inside a held transaction undoes all of it and the feed reads it again,
and a rebuild (itself a catch-up) equals the live view."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from fleetlog.schemas import AttemptRecorded, AttemptsPurged, encode_event, new_event_id, now_iso, subjects
from fleetlog.services.backbone.tasks import stop_tasks
from fleetlog.services.node.server import Server
from fleetlog.services.projector import transactions

from fleetlog import Fleet, FleetSettings

from .helpers import rebuild_and_wait, wait_until

BACKLOG = 1_500
OLD_TS = "2020-06-01T00:00:00+00:00"


@pytest.fixture
def settings(tmp_path: Path, settings: FleetSettings) -> FleetSettings:
    # Small batches, so that a backlog of 1,500 is many catch-up batches (pending > batch_max).
    return settings.model_copy(update={"batch_max": 20})


@pytest.fixture(autouse=True)
def hold_long(monkeypatch: pytest.MonkeyPatch) -> None:
    # A slow machine must not commit each batch for want of time: held transactions end on rows
    # or when the backlog is done, never on the clock, in these tests.
    monkeypatch.setattr(transactions, "HOLD_S", 600.0)


def attempt(i: int, ts: str | None = None, elapsed_s: float = 1.0) -> bytes:
    return encode_event(AttemptRecorded(id=new_event_id(), ts=ts or now_iso(), agent="catchup", action="act",
                                        outcome="success", elapsed_s=elapsed_s, extras={"i": i},
                                        pane_before={"format": "plain", "text": f"pane {i} " * 20}))


async def publish_backlog(fleet: Fleet, server: Server) -> tuple[int, set[int], int]:
    """BACKLOG attempts published while the fold is held: the first 300 with an old time, a purge
    of those after 700, a bad one every 250 (elapsed_s < 0). Returns (last seq, bad seqs, rows
    the view must hold)."""
    js = (await fleet.nats()).jetstream()
    server.projector.catchup_batch_max = 100  # a backlog of many batches, not one
    bad: set[int] = set()
    kept = 0
    server.projector.pause()
    try:
        for i in range(BACKLOG):
            if i == 700:
                purge = AttemptsPurged(id=new_event_id(), ts=now_iso(), before="2021-01-01T00:00:00+00:00")
                await js.publish(subjects.attempt_purge(), encode_event(purge))
            if i % 250 == 125:
                bad.add((await js.publish("fleet.attempt.catchup.act", attempt(i, elapsed_s=-1.0))).seq)
                continue
            # old rows before the purge are deleted by it; an old row after it stays
            old = i < 300 or i == 900
            last = (await js.publish("fleet.attempt.catchup.act", attempt(i, OLD_TS if old else None))).seq
            kept += 0 if i < 300 else 1
    finally:
        server.projector.resume()
    return last, bad, kept


async def view_rows(fleet: Fleet) -> list[Any]:
    q = "SELECT count(*), count(DISTINCT id), min(seq), max(seq), sum(length(pane_before)) FROM attempts"
    return (await fleet.sql(q)).rows


async def test_a_backlog_folds_in_held_transactions_once_each_like_a_rebuild(fleet: Fleet, server: Server) -> None:
    tx = server.projector.folder.tx
    held = tx.held_commits
    last, bad, kept = await publish_backlog(fleet, server)
    page = await fleet.attempts.query(agent="catchup", limit=1, min_seq={"FLEET_ATTEMPTS": last})
    assert page.items
    assert tx.held_commits > held  # batches went into shared transactions
    live = await view_rows(fleet)
    assert live[0][0] == live[0][1] == kept
    rejects = await fleet.rejects("attempts", min_seq={"FLEET_ATTEMPTS": last})
    assert {r.seq for r in rejects.items} == bad
    assert all("elapsed_s" in r.reason for r in rejects.items)
    purged = (await fleet.sql("SELECT deleted FROM attempt_purges")).rows
    assert purged == [[300 - sum(1 for i in range(300) if i % 250 == 125)]]
    await rebuild_and_wait(fleet, "attempts")
    assert await view_rows(fleet) == live


async def test_a_failure_inside_a_held_transaction_undoes_it_and_the_feed_reads_again(
        fleet: Fleet, server: Server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    tx = server.projector.folder.tx
    projection = server.projector.projections["attempts"]
    fold_raw = projection.fold_raw
    trips = {"left": 1, "undone_batches": 0}

    def failing_fold_raw(con: Any, batch: Any, decode: Any) -> Any:
        if trips["left"] and tx.held_batches >= 3:  # three batches folded and not committed
            trips["left"] -= 1
            trips["undone_batches"] = tx.held_batches
            raise OSError("the view's disk is full (injected)")
        return fold_raw(con, batch, decode)

    monkeypatch.setattr(projection, "fold_raw", failing_fold_raw)
    caplog.set_level(logging.WARNING, logger="fleetlog.projector")
    fallbacks = server.projector.folder.bulk_fallbacks
    last, bad, kept = await publish_backlog(fleet, server)
    await fleet.attempts.query(agent="catchup", limit=1, min_seq={"FLEET_ATTEMPTS": last})
    assert trips == {"left": 0, "undone_batches": 3}
    live = await view_rows(fleet)
    assert live[0][0] == live[0][1] == kept  # the undone batches were read again, once
    rejects = await fleet.rejects("attempts", min_seq={"FLEET_ATTEMPTS": last})
    assert sorted(r.seq for r in rejects.items) == sorted(bad)  # each once
    assert server.projector.fold_stats.restarts.get(("attempts", "FLEET_ATTEMPTS")) == 1
    assert "catch-up transaction of" in caplog.text and "disk is full" in caplog.text
    # read again batch by batch up to the failed one, which the bulk path then folded
    assert server.projector.folder.bulk_fallbacks == fallbacks
    await rebuild_and_wait(fleet, "attempts")
    assert await view_rows(fleet) == live


async def test_a_loop_cancelled_while_its_batch_waits_in_the_fold_queue_ends(fleet: Fleet, server: Server) -> None:
    """Review: the loop's cancel (a promotion, a stop) reached the fold queued behind another
    write; nothing was written, yet the loop's clean-up waited for its commit forever."""
    projector = server.projector
    js = (await fleet.nats()).jetstream()
    await fleet.attempts.query(limit=1)  # the view's loop runs
    running = projector.live("attempts")
    queue = projector._fold_thread._work_queue  # type: ignore[attr-defined]
    # The one fold thread busy with another write (another feed's fold, a trim, an idle CHECKPOINT).
    busy = asyncio.get_running_loop().run_in_executor(projector._fold_thread, time.sleep, 1.5)
    await js.publish("fleet.attempt.catchup.act", attempt(0))

    async def queued() -> bool:
        return bool(queue.qsize() >= 1)

    await wait_until(queued, timeout_s=10, interval_s=0.01)  # the batch waits behind it
    await asyncio.sleep(0.2)  # and the loop, its reader idle (batch_wait_s 0.01), waits for that fold
    left = await stop_tasks(running.tasks, rounds=3, wait_s=2.0)
    await busy
    assert not left, [t.get_name() for t in left]
