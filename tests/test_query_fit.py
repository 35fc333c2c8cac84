"""A page too big for the connection's max_payload is cut to what fits, with a cursor that
continues right after it: walking the cursors returns every row once, in order."""

from __future__ import annotations

from fleetlog.services.node.server import Server

from fleetlog import Fleet

PANE = "x" * 4000  # 2 x 4 KB per attempt: 300 of them are far over NATS's default 1 MB


async def test_an_attempts_page_too_big_is_cut_and_continues_by_offset(fleet: Fleet, server: Server) -> None:
    ids = [fleet.attempts.record(agent="big", action="a", outcome="success", elapsed_s=i,
                                 pane_before=PANE, pane_after=PANE).id for i in range(300)]
    token = await fleet.flush()
    first = await fleet.attempts.query(agent="big", limit=300, min_seq=token)
    assert first.has_more and 0 < len(first.items) < 300
    assert first.next_offset == len(first.items)
    seen = [r.id for r in first.items]
    page = first
    while page.has_more:
        assert page.next_offset is not None
        page = await fleet.attempts.query(agent="big", limit=300 - len(seen), offset=page.next_offset)
        assert page.items
        seen += [r.id for r in page.items]
    assert seen == ids[::-1]  # newest first, each once


async def test_a_snapshot_history_too_big_is_cut_and_continues_by_cursor(fleet: Fleet, server: Server) -> None:
    for i in range(8):
        await fleet.snapshots.take("fat", {"i": i, "blob": "y" * 300_000}, host="h")
    token = await fleet.flush()
    page = await fleet.snapshots.history("fat", "h", limit=8, min_seq=token)
    assert 0 < len(page.items) < 8 and page.next_cursor == page.items[-1].seq
    seen = [r.seq for r in page.items]
    while page.next_cursor is not None:
        page = await fleet.snapshots.history("fat", "h", limit=8, before_seq=page.next_cursor)
        seen += [r.seq for r in page.items]
    assert len(seen) == 8 and seen == sorted(seen, reverse=True)


async def test_a_runtimes_list_too_big_is_cut_and_continues_after_the_last_id(fleet: Fleet, server: Server) -> None:
    """Metadata is of any size: 12 runtimes of 200 kB each are over 1 MB. The page is cut to
    what fits, and `after=next_after` walks every runtime once, in id order."""
    for i in range(12):
        await fleet.runtimes.register(f"fat-{i:02}", metadata={"blob": "m" * 200_000}, labels={"kind": "fat"})
    await fleet.runtimes.register("thin", labels={"kind": "thin"})
    page = await fleet.runtimes.list(labels={"kind": "fat"}, limit=500)
    assert page.total == 12 and page.has_more and 0 < len(page.items) < 12
    assert page.next_after == page.items[-1].id
    seen = [r.runtime_id for r in page.items]
    while page.has_more:
        page = await fleet.runtimes.list(labels={"kind": "fat"}, limit=500, after=page.next_after)
        assert page.items
        seen += [r.runtime_id for r in page.items]
    assert seen == [f"fat-{i:02}" for i in range(12)]
    small = await fleet.runtimes.list(limit=5)  # the limit pages the same way
    assert small.has_more and len(small.items) == 5 and small.next_after == small.items[-1].id


async def test_proposals_too_big_are_cut_to_the_front_that_fits(fleet: Fleet, server: Server) -> None:
    """Each proposal carries its run's state JSON (metadata of any size): 8 runs of 200 kB made
    every candidates answer a 413, which stopped every claim. The front of the list comes."""
    import time

    from fleetlog.schemas.runs import CandidatesQuery, Proposals

    for i in range(8):
        await fleet.runs.create(f"fat-{i}", "runner-1", status="queued", priority=8 - i,
                                metadata={"blob": "r" * 200_000})
    last = (await server.nc.jetstream().stream_info("FLEET_RUNS")).state.last_seq
    query = CandidatesQuery(runtime_id="rt", now=time.time(), min_seq={"FLEET_RUNS": last})
    got = await fleet.request("fleetlog.runs.candidates", query, Proposals)
    assert 0 < len(got.items) < 8
    assert [p.run_id for p in got.items] == [f"fat-{i}" for i in range(len(got.items))]  # highest priority first
