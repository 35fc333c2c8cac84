"""The runtime registry against its compacted stream: garbage on a runtime's subject."""

from __future__ import annotations

import nats
from fleetlog.schemas import subjects
from fleetlog.services.node.server import Server

from fleetlog import Fleet

from .helpers import rebuild_and_wait


async def test_garbage_on_a_heartbeat_subject_live_as_after_a_rebuild(fleet: Fleet, server: Server) -> None:
    """A raw publish that is not an event, on a runtime's heartbeat subject, replaces its last
    heartbeat in the compacted stream. The live row then loses what that heartbeat said, as a
    rebuild would, and the stale marker still works: its guard is the runtime's latest
    message on the wire, which is the garbage."""
    t0 = 1_800_000_000.0
    fleet.runtimes.clock = lambda: t0
    await fleet.runtimes.register("rt-g", metadata={"a": 1}, heartbeat_deadline_s=5)
    await fleet.runtimes.register("rt-ok", metadata={"x": 1}, heartbeat_deadline_s=5)
    await fleet.runtimes.heartbeat("rt-g", metadata={"b": 2}, active_runs=4)
    token = await fleet.flush()
    got = await fleet.runtimes.get("rt-g", min_seq=token)
    assert got is not None and got.metadata == {"a": 1, "b": 2} and got.active_runs == 4
    nc = await nats.connect(fleet.settings.nats_url)
    try:
        ack = await nc.jetstream().publish(subjects.runtime("rt-g", "heartbeat"), b"\x00 not an event")
    finally:
        await nc.close()
    got = await fleet.runtimes.get("rt-g", min_seq={"FLEET_RUNTIMES": ack.seq})
    assert got is not None and got.metadata == {"a": 1} and got.active_runs is None  # the registration alone
    other = await fleet.runtimes.get("rt-ok")
    assert other is not None and other.metadata == {"x": 1}
    running = server.projector.live("runtimes")
    live = server.store.table_digest(running.gen.schema, ("runtimes", "runtime_messages"))
    await rebuild_and_wait(fleet, "runtimes")
    running = server.projector.live("runtimes")
    assert server.store.table_digest(running.gen.schema, ("runtimes", "runtime_messages")) == live
    fleet.runtimes.clock = lambda: t0 + 3600
    marked = await fleet.runtimes.mark_stale_runtimes()
    assert sorted(r.runtime_id for r in marked) == ["rt-g", "rt-ok"]  # not stuck on the garbage
