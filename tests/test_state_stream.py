"""Scoped state (issue 4) against the stream itself: concurrent writers, compaction, rebuilds,
tombstones, and the projection's own rule checks on raw publishes. Real nats-server + DuckDB."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgspec
import nats
from fleetlog.schemas import decode_event, new_event_id, now_iso
from fleetlog.schemas.state import StateContext, StateSet, scope_key_for
from fleetlog.services.node.server import Server

from fleetlog import Fleet, FleetSettings

from .helpers import rebuild_and_wait, wait_until

STREAM = "FLEET_STATE"
CTX: dict[str, Any] = {"runner_id": "runner-1", "conversation_id": "conv-1", "actor_id": "user-1"}
BIND: dict[str, Any] = {"binding_id": "bind-A"}


async def subject_counts(settings: FleetSettings, subject: str = "fleet.state.>") -> dict[str, int]:
    nc = await nats.connect(settings.nats_url)
    try:
        info = await nc.jetstream().stream_info(STREAM, subjects_filter=subject)
        return dict(info.state.subjects or {})
    finally:
        await nc.close()


async def last_message(settings: FleetSettings, subject: str) -> tuple[int, Any]:
    nc = await nats.connect(settings.nats_url)
    try:
        msg = await nc.jetstream().get_last_msg(STREAM, subject, direct=True)
        return int(msg.seq or 0), decode_event(msg.data or b"")
    finally:
        await nc.close()


def digest(server: Server) -> Any:
    running = server.projector.live("state")
    return server.store.table_digest(running.gen.schema, ("state",))


async def test_twenty_concurrent_writers_last_write_in_stream_order_wins(
        fleet: Fleet, settings: FleetSettings) -> None:
    writers = [await Fleet.connect(settings=settings, ensure=False, name=f"writer-{i}") for i in range(20)]
    try:
        async def write(i: int) -> list[int]:
            return [(await w.state.set("actor", "contended", {"writer": i, "n": n}, context=CTX, binding=BIND)).seq
                    for n in range(5) for w in (writers[i],)]

        seqs = [s for batch in await asyncio.gather(*(write(i) for i in range(20))) for s in batch]
    finally:
        for w in writers:
            await w.close()
    assert len(seqs) == len(set(seqs)) == 100  # every write landed, each at its own position
    entry = await fleet.state.entry("actor", "contended", context=CTX, binding=BIND, min_seq={STREAM: max(seqs)})
    subject = StateSet(id=new_event_id(), ts=now_iso(), scope_key=entry.scope_key, key="contended",
                       value=None).subject()
    seq, event = await last_message(settings, subject)
    assert seq == max(seqs) == entry.seq  # the view holds the stream's last message for the key
    assert entry.value == event.value and entry.updated_at == event.ts
    assert (await subject_counts(settings, subject)) == {subject: 1}
    # created_at was carried from the first write through all 100 (every writer read the last message)
    assert entry.created_at == event.created_at and entry.created_at < entry.updated_at


async def test_compaction_rebuild_and_tombstones(fleet: Fleet, settings: FleetSettings, server: Server) -> None:
    first = await fleet.state.set("actor", "hot", 0, context=CTX, binding=BIND)
    w = first
    for n in range(1, 1000):
        w = await fleet.state.set("actor", "hot", n, context=CTX, binding=BIND)
    await fleet.state.set("actor", "doomed", "bye", context=CTX, binding=BIND)
    gone = await fleet.state.delete("actor", "doomed", context=CTX, binding=BIND)
    w2 = await fleet.state.set("conversation", "kept", {"a": 1}, context=CTX, binding=BIND)
    token = {STREAM: max(w.seq, gone.seq, w2.seq)}

    counts = await subject_counts(settings)
    assert sorted(counts.values()) == [1, 1, 1]  # one message per key: 1,000 overwrites compacted to one
    hot = await fleet.state.entry("actor", "hot", context=CTX, binding=BIND, min_seq=token)
    assert hot.value == 999 and hot.created_at == first.created_at
    assert await fleet.state.get("actor", "doomed", context=CTX, binding=BIND, min_seq=token) is None
    before = digest(server)
    snap_before = msgspec.to_builtins(await fleet.state.snapshot(CTX, BIND, min_seq=token))

    await rebuild_and_wait(fleet, "state")
    assert digest(server) == before  # the same rows, byte for byte (created_at survived compaction)
    assert before["state"][0] == 2
    snap_after = msgspec.to_builtins(await fleet.state.snapshot(CTX, BIND, min_seq=token))
    for snap in (snap_before, snap_after):
        snap.pop("as_of"), snap.pop("lag"), snap.pop("lag_s")
    assert snap_after == snap_before
    assert await fleet.state.get("actor", "doomed", context=CTX, binding=BIND) is None  # tombstone held
    again = await fleet.state.entry("actor", "hot", context=CTX, binding=BIND)
    assert (again.value, again.created_at, again.seq) == (999, first.created_at, w.seq)


def _raw(scope: str = "conversation", key: str = "raw", value: Any = "v", **over: Any) -> dict[str, Any]:
    ctx = StateContext(**CTX)
    event: dict[str, Any] = {"type": "state.set", "id": new_event_id(), "ts": now_iso(),
                             "scope_key": scope_key_for(scope, ctx, "bind-A"), "key": key, "value": value,
                             "binding_identity": "bind-A", "context": msgspec.to_builtins(ctx),
                             "policy": {"enable_state": True, "state_scopes": ["conversation", "actor"]}}
    event.update(over)
    return event


def _subject(event: dict[str, Any]) -> str:
    import hashlib

    scope, _, digest_ = event["scope_key"].partition(":v2:")
    return f"fleet.state.{scope}.{digest_}.{hashlib.sha256(event['key'].encode()).hexdigest()[:40]}"


async def test_projection_rechecks_rules_on_raw_publishes(fleet: Fleet, settings: FleetSettings) -> None:
    nc = await nats.connect(settings.nats_url)
    js = nc.jetstream()
    try:
        # a well-formed raw publish (an agent in another language) is folded like the client's
        good = _raw(key="from-go", value={"lang": "go"})
        ack = await js.publish(_subject(good), json.dumps(good).encode())
        assert await fleet.state.get("conversation", "from-go", context=CTX, binding=BIND,
                                     min_seq={STREAM: ack.seq}) == {"lang": "go"}

        ctx = StateContext(**CTX)
        bad: list[tuple[dict[str, Any], str]] = [
            (_raw(key="k1", policy={"enable_state": False}), "State is disabled by binding policy"),
            (_raw(key="k2", scope_key="bogus:v2:" + "0" * 64), "Invalid scope: bogus"),
            (_raw(key="k3", policy={"state_scopes": ["actor"]}), 'Scope "conversation" not enabled by binding policy'),
            (_raw(key="k4", context={"runner_id": "runner-1"}), 'Missing identity for scope "conversation"'),
            (_raw(key="k5", binding_identity="bind-B"), "does not match the context and binding identity"),
            (_raw(key="conversation_id"), 'Key "conversation_id" must be written as "external.conversation_id"'),
            (_raw(key="k6", value="x" * 262_143), "Value size 262145 bytes exceeds limit 262144 bytes"),
            (_raw(key="k" * 256), "length <= 255"),
        ]
        assert scope_key_for("conversation", ctx, "bind-A")
        seqs = {}
        for event, reason in bad:
            seqs[(await js.publish(_subject(event), json.dumps(event).encode())).seq] = reason

        async def all_rejected() -> Any:
            answer = await fleet.rejects("state", limit=100)
            got = {r.seq: r.reason for r in answer.items if r.seq in seqs}
            return got if len(got) == len(seqs) else None

        got = await wait_until(all_rejected, 30, 0.05)
        for seq, reason in seqs.items():
            assert reason in got[seq], (reason, got[seq])

        # a rule-breaking publish on a key's subject replaced the key's message in the compacted
        # stream: the key holds no value afterwards, live as after a rebuild
        w = await fleet.state.set("conversation", "victim", "ok", context=CTX, binding=BIND)
        breach = _raw(key="victim", policy={"enable_state": False})
        ack = await js.publish(_subject(breach), json.dumps(breach).encode())
        assert await fleet.state.get("conversation", "victim", context=CTX, binding=BIND,
                                     min_seq={STREAM: ack.seq}) is None
        assert ack.seq > w.seq
        deleted = await fleet.state.delete("conversation", "victim", context=CTX, binding=BIND)
        assert not deleted and deleted.token == {STREAM: ack.seq}
        back = await fleet.state.set("conversation", "victim", "again", context=CTX, binding=BIND)
        assert back.created_at == back.updated_at  # a fresh key: the breach left nothing to keep
    finally:
        await nc.close()


async def test_writes_need_the_broker(tmp_path: Any) -> None:
    """State writes are awaited, not spooled: with no broker they fail clearly instead of pretending."""
    from fleetlog.services.node.broker import free_port

    from fleetlog import FleetUnavailable

    offline = FleetSettings(nats_url=f"nats://127.0.0.1:{free_port()}", data_dir=tmp_path / "d",
                            spool_dir=tmp_path / "spool")
    async with await Fleet.connect(settings=offline) as fleet:
        for call in (fleet.state.set("actor", "k", 1, context=CTX, binding=BIND),
                     fleet.state.delete("actor", "k", context=CTX, binding=BIND)):
            try:
                await call
            except FleetUnavailable as exc:
                assert "not connected" in str(exc)
            else:
                raise AssertionError("a state write without a broker must raise FleetUnavailable")
        assert fleet.publisher_stats().accepted == 0  # nothing went to the fire-and-forget path


async def test_a_message_rejected_before_the_fold_clears_its_key_live_as_after_a_rebuild(
        fleet: Fleet, settings: FleetSettings, server: Server) -> None:
    """Garbage published raw on a key's subject replaces the key's message in the compacted
    stream. It is rejected before the fold (not JSON, or wrong subject), so the projection
    never sees it, yet the key must lose its value live as a rebuild (which sees only the
    garbage) would; a later valid message in the same batch still stands."""
    w1 = await fleet.state.set("conversation", "victim-1", "ok", context=CTX, binding=BIND)
    w2 = await fleet.state.set("conversation", "victim-2", "ok", context=CTX, binding=BIND)
    await fleet.state.set("conversation", "bystander", "ok", context=CTX, binding=BIND)
    nc = await nats.connect(settings.nats_url)
    js = nc.jetstream()
    try:
        await js.publish(_subject(_raw(key="victim-1")), b"\xff not json")
        # a well-formed event for another key, published on victim-2's subject: wrong subject
        await js.publish(_subject(_raw(key="victim-2")), json.dumps(_raw(key="elsewhere")).encode())
        # garbage and then a valid write on a third key: the valid one is its last message
        await js.publish(_subject(_raw(key="revived")), b"{broken")
        last = await js.publish(_subject(_raw(key="revived")), json.dumps(_raw(key="revived", value=7)).encode())
    finally:
        await nc.close()
    token = {STREAM: last.seq}
    assert await fleet.state.get("conversation", "victim-1", context=CTX, binding=BIND, min_seq=token) is None
    assert await fleet.state.get("conversation", "victim-2", context=CTX, binding=BIND) is None
    assert await fleet.state.get("conversation", "revived", context=CTX, binding=BIND) == 7
    assert await fleet.state.get("conversation", "bystander", context=CTX, binding=BIND) == "ok"
    assert w1.seq < w2.seq < last.seq
    rejects = await fleet.rejects("state", 10, min_seq=token)
    assert len(rejects.items) == 3
    live = digest(server)
    await rebuild_and_wait(fleet, "state")
    assert digest(server) == live  # the live view and a rebuild from the stream agree
