"""Edges of the fold a review found (each reproduced against a real broker first): a time no
UTC datetime holds, a repeated id inside one batch (state: the last write wins, as on a
rebuild), a purge delivered again at the end of a batch with ids in two letter cases. Live
and rebuilt views must agree, and one odd event never stops a view."""

from __future__ import annotations

import msgspec
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
