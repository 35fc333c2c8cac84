"""Edges of the fold a review found (each reproduced against a real broker first): a time no
UTC datetime holds, a repeated id inside one batch (state: the last write wins, as on a
rebuild), a purge delivered again at the end of a batch with ids in two letter cases. Live
and rebuilt views must agree, and one odd event never stops a view."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
import pytest
from fleetlog.schemas import (
    AttemptRecorded,
    AttemptsPurged,
    encode_event,
    event_decoder,
    new_event_id,
    now_iso,
    subjects,
)
from fleetlog.services.node.server import Server

from fleetlog import Fleet

from .dashboard_helpers import dashboard_of, get
from .helpers import rebuild_and_wait
from .test_state_api import BIND, CTX


def attempt(ts: str | None = None, **extra: object) -> bytes:
    return encode_event(AttemptRecorded(id=new_event_id(), ts=ts or now_iso(), agent="edge", action="act",
                                        outcome="success", elapsed_s=1.0, **extra))  # type: ignore[arg-type]


async def test_a_time_outside_utc_is_a_reject_and_the_fold_goes_on(fleet: Fleet) -> None:
    js = (await fleet.nats()).jetstream()
    first = (await js.publish("fleet.attempt.edge.act", attempt())).seq
    bad = [(await js.publish("fleet.attempt.edge.act", attempt(ts))).seq
           for ts in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00")]
    last = (await js.publish("fleet.attempt.edge.act", attempt())).seq
    page = await fleet.attempts.query(agent="edge", min_seq={"FLEET_ATTEMPTS": last})
    assert len(page.items) == 2 and first < last
    reasons = {r.seq: r.reason for r in (await fleet.rejects("attempts", min_seq={"FLEET_ATTEMPTS": last})).items}
    for seq in bad:
        assert "outside the years 1-9999 in UTC" in reasons[seq], reasons


async def test_a_state_id_repeated_in_one_batch_keeps_the_last_write_like_a_rebuild(
        fleet: Fleet, server: Server) -> None:
    js = (await fleet.nats()).jetstream()
    token = await fleet.state.set("conversation", "mood", "calm", context=CTX, binding=BIND)
    subject = (await js.get_msg("FLEET_STATE", token.seq)).subject
    event = event_decoder.decode((await js.get_last_msg("FLEET_STATE", subject)).data)
    same_id = new_event_id()
    one, two = (encode_event(msgspec.structs.replace(event, value=v, id=same_id)) for v in ("v1", "v2"))
    server.projector.pause()
    try:
        await js.publish(subject, one)
        last = (await js.publish(subject, two)).seq
    finally:
        server.projector.resume()
    live = await fleet.state.entry("conversation", "mood", context=CTX, binding=BIND, min_seq={"FLEET_STATE": last})
    await rebuild_and_wait(fleet, "state")
    rebuilt = await fleet.state.entry("conversation", "mood", context=CTX, binding=BIND)
    assert (live.found, live.value) == (rebuilt.found, rebuilt.value) == (True, "v2")


async def test_a_purge_again_at_a_batch_end_and_an_id_in_two_cases_fold_once(fleet: Fleet, server: Server) -> None:
    js = (await fleet.nats()).jetstream()
    a, p = new_event_id(), new_event_id()
    purge = encode_event(AttemptsPurged(id=p, ts=now_iso(), before="2020-01-01T00:00:00+00:00"))
    # a pane of another shape: this row goes to the decoder's path
    row = encode_event(AttemptRecorded(id=a, ts=now_iso(), agent="edge", action="act", outcome="success",
                                       elapsed_s=1.0, pane_after={"format": "t", "text": 5}))
    seq = (await js.publish(subjects.attempt_purge(), purge)).seq
    await fleet.attempts.query(limit=1, min_seq={"FLEET_ATTEMPTS": seq})
    fallbacks = server.projector.folder.bulk_fallbacks
    server.projector.pause()
    try:
        for subject, body in (("fleet.attempt.edge.act", row),
                              ("fleet.attempt.edge.act", row.replace(a.encode(), a.upper().encode())),
                              (subjects.attempt_purge(), purge)):
            last = (await js.publish(subject, body)).seq
    finally:
        server.projector.resume()
    q = f"SELECT CAST(id AS VARCHAR), seq FROM attempts WHERE id = '{a}' ORDER BY seq"
    live = (await fleet.sql(q, min_seq={"FLEET_ATTEMPTS": last})).rows
    assert server.projector.folder.bulk_fallbacks == fallbacks  # the batch took the bulk path
    await rebuild_and_wait(fleet, "attempts")
    assert live == (await fleet.sql(q)).rows and len(live) == 1


async def test_a_failing_fold_loop_is_logged_and_starts_again_from_its_checkpoint(
        fleet: Fleet, server: Server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """An error nobody foresaw (here: the bulk prepare raising once, then the fold itself twice)
    never leaves a view dead and silent: the batch goes the decoder's way, the loop is logged,
    counted and started again from the checkpoint, and every event lands exactly once."""
    folder = server.projector.folder
    js = (await fleet.nats()).jetstream()
    raw_table, apply = folder._raw_table, folder.apply
    trips = {"prepare": 1, "fold": 2}

    def failing_raw_table(batch: Any) -> Any:
        if trips["prepare"]:
            trips["prepare"] -= 1
            raise RuntimeError("prepare tripped")
        return raw_table(batch)

    def failing_apply(*args: Any, **kwargs: Any) -> Any:
        if trips["fold"] and not trips["prepare"] and args[0].name == "attempts":
            trips["fold"] -= 1
            raise OSError("the view's disk is full (injected)")
        return apply(*args, **kwargs)

    fallbacks = folder.bulk_fallbacks
    monkeypatch.setattr(folder, "_raw_table", failing_raw_table)
    monkeypatch.setattr(folder, "apply", failing_apply)
    caplog.set_level(logging.WARNING, logger="fleetlog.projector")
    last = 0
    for n in range(3):  # one batch trips the prepare, the next ones the fold, twice
        ids = [new_event_id() for _ in range(5)]
        for event_id in ids:
            body = encode_event(AttemptRecorded(id=event_id, ts=now_iso(), agent="loop", action=f"a{n}",
                                                outcome="success", elapsed_s=1.0))
            last = (await js.publish(f"fleet.attempt.loop.a{n}", body)).seq
        await fleet.attempts.query(agent="loop", limit=1, min_seq={"FLEET_ATTEMPTS": last})
    rows = (await fleet.sql("SELECT count(*), count(DISTINCT id) FROM attempts WHERE agent = 'loop'")).rows
    assert rows == [[15, 15]]
    assert trips == {"prepare": 0, "fold": 0}
    assert folder.bulk_fallbacks == fallbacks + 1
    assert server.projector.fold_stats.restarts.get(("attempts", "FLEET_ATTEMPTS")) == 2
    failed = [r for r in caplog.records if "starting again from it" in r.getMessage()]
    assert len(failed) == 2 and failed[0].exc_info is not None and "disk is full" in caplog.text
    async with dashboard_of(server) as dash:
        _, _, text = await get(dash.url + "/metrics")
    assert 'fleetlog_fold_restarts_total{projection="attempts",stream="FLEET_ATTEMPTS"} 2.0' in text


async def test_an_id_ending_in_a_newline_is_a_reject_and_its_batch_stays_on_the_bulk_path(
        fleet: Fleet, server: Server) -> None:
    """Review (issue 19): Python's `$` let "<uuid>\\n" pass the id's pattern; DuckDB's CAST to UUID
    then failed the batch's whole INSERT, and the batch went the decoder's way (which stores an
    escaped pane as msgspec writes it: another body than a rebuild's)."""
    js = (await fleet.nats()).jetstream()
    seq = (await js.publish("fleet.attempt.edge.act", attempt())).seq
    await fleet.attempts.query(limit=1, min_seq={"FLEET_ATTEMPTS": seq})
    fallbacks = server.projector.folder.bulk_fallbacks
    good = attempt(pane_after={"format": "full", "text": "caf\u00e9"})
    poison = attempt().replace(b'","ts"', b'\\n","ts"', 1)  # the id's closing quote, then ts
    server.projector.pause()
    try:
        bad = (await js.publish("fleet.attempt.edge.act", poison)).seq
        last = (await js.publish("fleet.attempt.edge.act", good)).seq
    finally:
        server.projector.resume()
    reasons = {r.seq: r.reason for r in (await fleet.rejects("attempts", min_seq={"FLEET_ATTEMPTS": last})).items}
    assert "invalid event" in reasons[bad] and "$.id" in reasons[bad], reasons
    assert server.projector.folder.bulk_fallbacks == fallbacks
    assert last not in reasons
