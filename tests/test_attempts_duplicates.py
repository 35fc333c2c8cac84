"""An attempt id that comes again: the same body is a silent duplicate (a retry, a spool
replay); another body is refused with the reason "duplicate id with a different body" and the
first body stays, on the live fold and on a rebuild alike, in one batch or across batches."""

from __future__ import annotations

from fleetlog.schemas import AttemptRecorded, encode_event, new_event_id, now_iso

from fleetlog import Fleet

from .helpers import rebuild_and_wait


def body(event_id: str, outcome: str, pane: str | None = None) -> bytes:
    e = AttemptRecorded(id=event_id, ts=now_iso(), agent="dup", action="act", outcome=outcome, elapsed_s=1.5,
                        pane_after=None if pane is None else {"format": "full", "text": pane})
    return encode_event(e)


async def test_a_copy_with_another_body_is_refused_and_the_first_stays(fleet: Fleet) -> None:
    js = (await fleet.nats()).jetstream()
    subject = "fleet.attempt.dup.act"
    a, b = new_event_id(), new_event_id()
    first_a = body(a, "success", "pane one")
    seqs = [(await js.publish(subject, first_a)).seq]
    # across batches: the first one folded before its copies arrive
    await fleet.attempts.query(agent="dup", min_seq={"FLEET_ATTEMPTS": seqs[0]})
    same = (await js.publish(subject, first_a)).seq  # an identical copy
    changed = (await js.publish(subject, body(a, "failure", "pane one"))).seq
    pane_changed = (await js.publish(subject, body(a, "success", "pane two"))).seq
    # in one batch: b and its altered copy published back to back
    first_b = (await js.publish(subject, body(b, "success"))).seq
    copy_b = (await js.publish(subject, body(b, "timeout"))).seq
    last = {"FLEET_ATTEMPTS": copy_b}

    async def view() -> list[list[object]]:
        return (await fleet.sql("SELECT CAST(id AS VARCHAR), seq, outcome, pane_after->>'text' FROM attempts "
                                "WHERE agent = 'dup' ORDER BY seq", min_seq=last)).rows

    assert await view() == [[a, seqs[0], "success", "pane one"], [b, first_b, "success", None]]
    rejects = {r.seq: r.reason for r in (await fleet.rejects("attempts", min_seq=last)).items}
    assert same not in rejects
    assert sorted(rejects) == [changed, pane_changed, copy_b]
    for seq in (changed, pane_changed, copy_b):
        assert rejects[seq].startswith("duplicate id with a different body"), rejects[seq]
    assert f"from seq {first_b}" in rejects[copy_b] and b in rejects[copy_b]

    before = await view()
    await rebuild_and_wait(fleet, "attempts")
    assert await view() == before
    after = {r.seq: r.reason for r in (await fleet.rejects("attempts", min_seq=last)).items}
    assert sorted(after) == sorted(rejects)
