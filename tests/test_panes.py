"""Pane snapshots through the whole stack (issue 19): record → fold (pane text carried as
bytes, never re-serialised) → `attempts.query` and `fleetlog sql`.

Why: the fold no longer parses a pane; it stores `{"format":F,"text":<the text's bytes as
sent>[,"truncated":B]}`. The query must still give back exactly the pane the client
normalised (text, format, the truncated flag, every kind of character), and SQL users
must still reach the text with DuckDB's JSON functions on the VARCHAR column. Batches
of many events are folded by the pipelined loop (batch N+1 decoded while N commits): every
event lands once.
"""

from __future__ import annotations

import msgspec
from fleetlog.services.client.attempts.panes import normalize_pane
from fleetlog.services.node.server import Server

from fleetlog import Fleet

STREAM = "FLEET_ATTEMPTS"
ODD_TEXT = 'line "1"\n\ttab \\ back\x1b[1mansi\x1b[0m é 😀 \u2028 </script> ' + "\x00\x01\x7f"


async def test_panes_come_back_exactly_as_recorded(fleet: Fleet, server: Server) -> None:
    cases = {
        "plain": ("$ ls\nfile\n", None),
        "odd": (ODD_TEXT, {"format": "tmux", "text": "after"}),
        "long": ("x" * 5000 + "tail", None),  # tail-truncated by the client: "truncated": true
        "object": ({"rows": [1, 2.5, None], "ok": True}, None),  # the client's json-dump
        "none": (None, None),
    }
    for action, (before, after) in cases.items():
        fleet.attempts.record(agent="pane-agent", action=action, outcome="success", elapsed_s=0.5,
                              pane_before=before, pane_after=after)
    token = await fleet.flush()
    page = await fleet.attempts.query(agent="pane-agent", limit=10, min_seq=token)
    got = {row.action: (row.pane_before, row.pane_after) for row in page.items}
    assert set(got) == set(cases)
    limit = fleet.settings.pane_max_chars
    for action, (before, after) in cases.items():
        assert got[action] == (normalize_pane("pane_before", before, limit),
                               normalize_pane("pane_after", after, limit)), action
    assert got["long"][0] is not None and got["long"][0]["truncated"] is True

    # `fleetlog sql`: the pane columns hold JSON text; DuckDB's JSON functions read them.
    answer = await fleet.sql(
        "SELECT action, pane_before->>'text' AS text, pane_before->>'format' AS format"
        " FROM attempts WHERE agent = 'pane-agent' AND action = 'odd'", min_seq=token)
    assert answer.rows == [["odd", ODD_TEXT, "full"]]


async def test_many_batches_fold_once_each(fleet: Fleet, server: Server) -> None:
    n = 3000
    for i in range(n):
        fleet.attempts.record(agent=f"bulk-{i % 7}", action="probe", outcome="success", elapsed_s=i / 1000,
                              pane_before=f"pane {i}\n" * 20, extras={"i": i})
    token = await fleet.flush()
    answer = await fleet.sql(
        "SELECT count(*), count(DISTINCT id), sum(CAST(extras->>'i' AS BIGINT)),"
        " count(*) FILTER (WHERE pane_before->>'text' = 'pane ' || (extras->>'i') || chr(10)"
        "                  || repeat('pane ' || (extras->>'i') || chr(10), 19))"
        " FROM attempts WHERE agent LIKE 'bulk-%'", min_seq=token)
    assert answer.rows == [[n, n, n * (n - 1) // 2, n]]
    feed = server.projector.live("attempts").feeds[STREAM]
    assert feed.checkpoint >= token[STREAM]
    assert server.projector.folder.bulk_fallbacks == 0
    raw = msgspec.json.encode(normalize_pane("pane_before", "pane 0\n" * 20, fleet.settings.pane_max_chars))
    stored = await fleet.sql("SELECT pane_before FROM attempts WHERE agent = 'bulk-0' AND extras->>'i' = '0'",
                             min_seq=token)
    assert stored.rows == [[raw.decode()]]  # byte for byte what the SDK published
