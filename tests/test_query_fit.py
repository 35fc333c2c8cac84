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
