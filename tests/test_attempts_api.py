"""Attempt-log behaviour (issue 2, part 7) through the Python API.

Real nats-server + real DuckDB via the conftest fixtures; read-your-writes with
`min_seq=await fleet.flush()` tokens, never sleeps.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import threading
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from fleetlog.services.backbone.streams import ensure_streams
from fleetlog.services.node.server import Server

from fleetlog import (
    CANONICAL_OUTCOMES,
    Fleet,
    FleetSettings,
    FleetSync,
    FleetValidationError,
    StaleError,
)

STREAM = "FLEET_ATTEMPTS"
ROW_KEYS = {"id", "ts", "agent", "action", "outcome", "elapsed_s", "pane_before", "pane_after", "extras"}
NOW = datetime.now(UTC)


def p95(values: Iterable[float]) -> float:
    """The spec's p95: the sorted sample at index max(0, floor(0.95*(n-1)))."""
    s = sorted(values)
    return s[max(0, math.floor(0.95 * (len(s) - 1)))]


def ago(**delta: float) -> str:
    return (datetime.now(UTC) - timedelta(**delta)).isoformat()


def rec(fleet: Fleet, agent: str = "alpha", action: str = "probe", outcome: str = "success",
        elapsed_s: float = 1.0, **kw: Any):
    return fleet.attempts.record(agent=agent, action=action, outcome=outcome, elapsed_s=elapsed_s, **kw)


async def all_rows(fleet: Fleet, token: dict[str, int], **filters: Any) -> list[Any]:
    page = await fleet.attempts.query(limit=10_000, min_seq=token, **filters)
    return page.items


def assert_answer_meta(answer: Any, token: dict[str, int]) -> None:
    assert isinstance(answer.as_of, dict) and isinstance(answer.lag, dict)
    assert answer.as_of.get(STREAM, -1) >= token[STREAM], answer.as_of
    assert STREAM in answer.lag and isinstance(answer.lag[STREAM], int) and answer.lag[STREAM] >= 0, answer.lag


# -- required fields ---------------------------------------------------------------


async def test_canonical_outcomes_constant_and_other_outcomes_accepted(fleet: Fleet) -> None:
    assert tuple(CANONICAL_OUTCOMES) == (
        "success", "precondition_fail", "send_error", "completion_timeout", "skipped_by_policy",
    )
    outcomes = [*CANONICAL_OUTCOMES, "rate_limited", "Weird Outcome ✓", "x"]
    for i, outcome in enumerate(outcomes):
        rec(fleet, agent="oc", action=f"a{i}", outcome=outcome, ts=f"2026-01-01T00:00:{i:02d}+00:00")
    token = await fleet.flush()
    rows = await all_rows(fleet, token, agent="oc")
    assert [r.outcome for r in rows] == list(reversed(outcomes))


async def test_invalid_input_raises_naming_the_field_and_publishes_nothing(fleet: Fleet) -> None:
    ok: dict[str, Any] = {"agent": "alpha", "action": "probe", "outcome": "success", "elapsed_s": 1.0}
    cases: list[tuple[str, dict[str, Any]]] = []
    for field in ("agent", "action", "outcome"):
        for bad in (None, 5, 1.5, b"bytes", "", ["x"]):
            cases.append((field, {**ok, field: bad}))
    for bad in (None, "1.5", -0.001, -1, float("nan"), float("inf"), float("-inf"), True, False, [1], {"s": 1}):
        cases.append(("elapsed_s", {**ok, "elapsed_s": bad}))
    for bad in ([1, 2], "x", 5):
        cases.append(("extras", {**ok, "extras": bad}))
    for bad in ("not a time", "2026-13-45T00:00:00Z", 12345):
        cases.append(("ts", {**ok, "ts": bad}))
    cases.append(("pane_before", {**ok, "pane_before": {1, 2}}))
    cases.append(("pane_after", {**ok, "pane_after": object()}))

    failures = []
    for field, kwargs in cases:
        try:
            fleet.attempts.record(**kwargs)
        except FleetValidationError as exc:
            if exc.field != field or field not in str(exc):
                failures.append(f"{field}={kwargs.get(field)!r}: wrong field in {exc!r} (field={exc.field!r})")
        except Exception as exc:
            failures.append(f"{field}={kwargs.get(field)!r}: {type(exc).__name__}: {exc}")
        else:
            failures.append(f"{field}={kwargs.get(field)!r}: accepted")
    # a missing required field names it too
    for field in ("agent", "action", "outcome", "elapsed_s"):
        kwargs = {k: v for k, v in ok.items() if k != field}
        with pytest.raises(TypeError, match=field):
            fleet.attempts.record(**kwargs)
    assert not failures, "\n".join(failures)

    assert fleet.publisher_stats().accepted == 0
    # boundaries that are valid: 0 and an int
    rec(fleet, agent="edge", action="zero", elapsed_s=0)
    rec(fleet, agent="edge", action="int", elapsed_s=3, ts="2000-01-01T00:00:00Z")
    token = await fleet.flush()
    assert fleet.publisher_stats().accepted == 2
    rows = await all_rows(fleet, token)
    assert {(r.agent, r.action, r.elapsed_s) for r in rows} == {("edge", "zero", 0.0), ("edge", "int", 3.0)}
    assert all(isinstance(r.elapsed_s, float) for r in rows)


async def test_awkward_identities_round_trip_end_to_end(fleet: Fleet) -> None:
    pairs = [("a.b", "c"), ("a", "b.c"), ("x>", ">"), ("*", "*"), ("%", "%2E"), ("%2E", "%"), ("sp ace", "tab\there"),
             ("new\nline", "ctl\x01"), ("ünï ✓", "日本"), ("a", "b c")]
    receipts = {p: rec(fleet, agent=p[0], action=p[1]) for p in pairs}
    token = await fleet.flush()
    assert all(r.position is not None for r in receipts.values())
    rows = await all_rows(fleet, token)
    assert sorted((r.agent, r.action) for r in rows) == sorted(pairs)
    for agent in {a for a, _ in pairs}:
        got = await all_rows(fleet, token, agent=agent)
        assert sorted((r.agent, r.action) for r in got) == sorted(p for p in pairs if p[0] == agent), agent
    status = await fleet.status()
    assert status.rejects_total == 0


# -- ts --------------------------------------------------------------------------


async def test_ts_defaults_to_now_utc_iso(fleet: Fleet) -> None:
    before = datetime.now(UTC)
    r = rec(fleet, agent="now")
    token = await fleet.flush()
    after = datetime.now(UTC)
    [row] = await all_rows(fleet, token, agent="now")
    assert row.id == r.id
    parsed = datetime.fromisoformat(row.ts)
    assert parsed.tzinfo is not None and parsed.utcoffset() == timedelta(0), row.ts
    assert before - timedelta(seconds=1) <= parsed <= after + timedelta(seconds=1)
    assert row.ts[:10] == before.date().isoformat() or row.ts[:10] == after.date().isoformat()


async def test_explicit_ts_stored_exactly_and_ordered_by_instant(fleet: Fleet) -> None:
    given = {
        "A": "2026-01-02T03:04:05Z",                 # 03:04:05Z
        "B": "2026-01-02T03:04:05+02:00",            # 01:04:05Z
        "C": "2026-01-02T03:04:05.123456+00:00",     # 03:04:05.123456Z
        "D": "2026-01-02T02:30:00-01:00",            # 03:30:00Z
        "E": "2026-01-02T02:00:00",                  # no offset: UTC, 02:00:00Z
    }
    for action, ts in given.items():
        rec(fleet, agent="tsx", action=action, ts=ts)
    token = await fleet.flush()
    rows = await all_rows(fleet, token, agent="tsx")
    assert {r.action: r.ts for r in rows} == given  # stored exactly as given
    assert [r.action for r in rows] == ["D", "C", "A", "E", "B"]  # newest first by the instant, not the text
    # since compares instants too: 02:00Z keeps D, C, A, E and drops B (01:04Z)
    rows = await all_rows(fleet, token, agent="tsx", since="2026-01-02T02:00:00Z")
    assert [r.action for r in rows] == ["D", "C", "A", "E"]
    rows = await all_rows(fleet, token, agent="tsx", since="2026-01-02T05:00:00+02:00")  # 03:00Z
    assert [r.action for r in rows] == ["D", "C", "A"]


async def test_datetime_ts_is_accepted(fleet: Fleet) -> None:
    when = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    rec(fleet, agent="dt", ts=when)
    token = await fleet.flush()
    [row] = await all_rows(fleet, token, agent="dt")
    assert datetime.fromisoformat(row.ts) == when


async def test_same_ts_later_recorded_first(fleet: Fleet) -> None:
    ts = "2026-05-05T05:05:05+00:00"
    receipts = [rec(fleet, agent="same", action=f"n{i}", ts=ts) for i in range(6)]
    token = await fleet.flush()
    rows = await all_rows(fleet, token, agent="same")
    assert [r.id for r in rows] == [r.id for r in reversed(receipts)]
    # arrival breaks ties only among equal instants: an older ts recorded later still sorts last
    rec(fleet, agent="same", action="older", ts="2026-05-05T05:05:04+00:00")
    token = await fleet.flush()
    rows = await all_rows(fleet, token, agent="same")
    assert rows[-1].action == "older" and rows[0].action == "n5"


# -- panes and extras ---------------------------------------------------------------


def _pane_cases(max_chars: int) -> list[tuple[Any, Any]]:
    long_text = "".join(chr(ord("a") + i % 26) for i in range(max_chars + 904))
    long_unicode = "é" * (max_chars + 1) + "ünï"
    exact = "z" * max_chars
    long_list = [f"item-{i}" for i in range(max_chars // 4)]
    assert len(json.dumps(long_list)) > max_chars
    return [
        (None, None),
        ("hello pane", {"format": "full", "text": "hello pane"}),
        ("", {"format": "full", "text": ""}),
        (exact, {"format": "full", "text": exact}),
        (long_text, {"format": "full", "text": long_text[-max_chars:], "truncated": True}),
        (long_unicode, {"format": "full", "text": long_unicode[-max_chars:], "truncated": True}),
        ({"format": "ansi", "text": "abc", "cursor": [1, 2]}, {"format": "ansi", "text": "abc", "cursor": [1, 2]}),
        ({"format": "ansi", "text": long_text, "rows": 40},
         {"format": "ansi", "text": long_text[-max_chars:], "rows": 40, "truncated": True}),
        ({"format": "full", "text": exact}, {"format": "full", "text": exact}),
        ({"format": "screen"}, {"format": "screen"}),
        ([1, "two", None], {"format": "json-dump", "text": json.dumps([1, "two", None])[-max_chars:]}),
        ({"rows": ["a", "b"], "n": 2},
         {"format": "json-dump", "text": json.dumps({"rows": ["a", "b"], "n": 2})[-max_chars:]}),
        (42, {"format": "json-dump", "text": "42"}),
        (2.5, {"format": "json-dump", "text": "2.5"}),
        (True, {"format": "json-dump", "text": "true"}),
        (long_list, {"format": "json-dump", "text": json.dumps(long_list)[-max_chars:]}),  # cut, never flagged
    ]


async def _check_panes(fleet: Fleet, agent: str, max_chars: int) -> None:
    cases = _pane_cases(max_chars)
    for i, (value, _) in enumerate(cases):
        # pane_after gets the next case so both fields see every form
        rec(fleet, agent=agent, action=f"p{i:02d}", pane_before=value, pane_after=cases[(i + 1) % len(cases)][0])
    token = await fleet.flush()
    rows = {r.action: r for r in await all_rows(fleet, token, agent=agent)}
    assert len(rows) == len(cases)
    failures = []
    for i, (value, expected) in enumerate(cases):
        row = rows[f"p{i:02d}"]
        if row.pane_before != expected:
            failures.append(f"pane_before case {i} ({str(value)[:40]!r}): got {str(row.pane_before)[:200]}")
        if rows[f"p{(i - 1) % len(cases):02d}"].pane_after != expected:
            failures.append(f"pane_after case {i} ({str(value)[:40]!r})")
    assert not failures, "\n".join(failures)
    for row in rows.values():
        for pane in (row.pane_before, row.pane_after):
            if pane is not None and isinstance(pane.get("text"), str):
                assert len(pane["text"]) <= max_chars
            if pane is not None and pane.get("format") == "json-dump":
                assert "truncated" not in pane


async def test_pane_normalisation_default_4096(fleet: Fleet) -> None:
    assert fleet.settings.pane_max_chars == 4096
    await _check_panes(fleet, "panes", 4096)


async def test_pane_max_chars_configurable(settings: FleetSettings, server: Server) -> None:
    custom = settings.model_copy(update={"pane_max_chars": 10})
    async with await Fleet.connect(settings=custom) as small:
        await _check_panes(small, "panes10", 10)
        rec(small, agent="p10", pane_before="0123456789abcdef")
        token = await small.flush()
        [row] = await all_rows(small, token, agent="p10")
        assert row.pane_before == {"format": "full", "text": "6789abcdef", "truncated": True}


async def test_extras_default_and_roundtrip(fleet: Fleet) -> None:
    extras = {"polls": 4, "nested": {"a": [1, 2.5, None, True]}, "text": "ünïcode ✓", "empty": {}}
    rec(fleet, agent="ex", action="none")
    rec(fleet, agent="ex", action="given", extras=extras)
    rec(fleet, agent="ex", action="explicit-none", extras=None)
    token = await fleet.flush()
    rows = {r.action: r for r in await all_rows(fleet, token, agent="ex")}
    assert rows["none"].extras == {}
    assert rows["explicit-none"].extras == {}
    assert rows["given"].extras == extras


# -- query ---------------------------------------------------------------------------


async def test_query_filters_and_row_shape(fleet: Fleet) -> None:
    combos = [(a, x, o) for a in ("f1", "f2") for x in ("open", "send") for o in ("success", "send_error")]
    ids = {}
    for i, (agent, action, outcome) in enumerate(combos):
        ids[(agent, action, outcome)] = rec(fleet, agent=agent, action=action, outcome=outcome,
                                             elapsed_s=i, ts=f"2026-02-01T00:00:{i:02d}Z").id
    token = await fleet.flush()

    async def got(**filters: Any) -> set[tuple[str, str, str]]:
        return {(r.agent, r.action, r.outcome) for r in await all_rows(fleet, token, **filters)}

    assert await got() == set(combos)
    assert await got(agent="f1") == {c for c in combos if c[0] == "f1"}
    assert await got(action="send") == {c for c in combos if c[1] == "send"}
    assert await got(outcome="send_error") == {c for c in combos if c[2] == "send_error"}
    assert await got(agent="f2", action="open", outcome="success") == {("f2", "open", "success")}
    assert await got(agent="nobody") == set()

    page = await fleet.attempts.query(agent="f1", action="open", outcome="success", min_seq=token)
    [row] = page.items
    assert set(msgspec.structs.asdict(row)) == ROW_KEYS
    assert set(msgspec.to_builtins(row)) == ROW_KEYS
    assert row.id == ids[("f1", "open", "success")]
    assert (row.ts, row.agent, row.action, row.outcome, row.elapsed_s) == (
        "2026-02-01T00:00:00Z", "f1", "open", "success", 0.0)
    assert row.pane_before is None and row.pane_after is None and row.extras == {}

    for field, kwargs in (("agent", {"agent": ""}), ("action", {"action": 5}), ("outcome", {"outcome": ""})):
        with pytest.raises(FleetValidationError) as exc_info:
            await fleet.attempts.query(**kwargs)
        assert exc_info.value.field == field


async def test_query_since_forms(fleet: Fleet) -> None:
    marks = {"d3": {"days": 3}, "m100": {"minutes": 100}, "m60": {"minutes": 60}, "m20": {"minutes": 20},
             "s10": {"seconds": 10}}
    for action, delta in marks.items():
        rec(fleet, agent="since", action=action, ts=ago(**delta))
    token = await fleet.flush()

    async def got(since: Any) -> list[str]:
        return [r.action for r in await all_rows(fleet, token, agent="since", since=since)]

    cutoff = datetime.now(UTC) - timedelta(minutes=70)
    expected = {
        "90m": ["s10", "m20", "m60"],
        " 1.5H ": ["s10", "m20", "m60"],
        "1.5h": ["s10", "m20", "m60"],
        "2d": ["s10", "m20", "m60", "m100"],
        "2D": ["s10", "m20", "m60", "m100"],
        "30M": ["s10", "m20"],
        ".5h": ["s10", "m20"],
        "45s": ["s10"],
        "4d": ["s10", "m20", "m60", "m100", "d3"],
        cutoff: ["s10", "m20", "m60"],
        cutoff.astimezone(timezone(timedelta(hours=5))): ["s10", "m20", "m60"],
        cutoff.isoformat(): ["s10", "m20", "m60"],
        cutoff.strftime("%Y-%m-%dT%H:%M:%SZ"): ["s10", "m20", "m60"],
        cutoff.astimezone(timezone(timedelta(hours=-7))).isoformat(): ["s10", "m20", "m60"],
        None: ["s10", "m20", "m60", "m100", "d3"],
    }
    for since, want in expected.items():
        assert await got(since) == want, f"since={since!r}"

    for bad in ("yesterday", "5x", "-5m", "", "h", "1.5.5h", "5 m", 5, 2.5):
        with pytest.raises(FleetValidationError) as exc_info:
            await fleet.attempts.query(since=bad)
        assert exc_info.value.field == "since" and "since" in str(exc_info.value), bad
        with pytest.raises(FleetValidationError) as exc_info:
            await fleet.attempts.stats(since=bad)
        assert exc_info.value.field == "since", bad


async def test_default_limit_offset_and_paging(fleet: Fleet) -> None:
    base = datetime(2026, 4, 1, tzinfo=UTC)
    receipts = [rec(fleet, agent="page", action=f"n{i:02d}", ts=(base + timedelta(seconds=i)).isoformat())
                for i in range(57)]
    token = await fleet.flush()
    newest_first = [r.id for r in reversed(receipts)]

    page = await fleet.attempts.query(agent="page", min_seq=token)
    assert [r.id for r in page.items] == newest_first[:50]  # default limit 50, offset 0
    page = await fleet.attempts.query(agent="page", offset=50, min_seq=token)
    assert [r.id for r in page.items] == newest_first[50:]
    paged: list[str] = []
    for offset in range(0, 60, 10):
        page = await fleet.attempts.query(agent="page", limit=10, offset=offset, min_seq=token)
        paged += [r.id for r in page.items]
    assert paged == newest_first
    assert (await fleet.attempts.query(agent="page", offset=57, min_seq=token)).items == []
    assert [r.id for r in (await fleet.attempts.query(agent="page", limit=1, min_seq=token)).items] == [
        newest_first[0]]

    for field, kwargs in (("limit", {"limit": 0}), ("limit", {"limit": -1}), ("limit", {"limit": 10_001}),
                          ("limit", {"limit": "5"}), ("offset", {"offset": -1}), ("offset", {"offset": 1.5})):
        with pytest.raises(FleetValidationError) as exc_info:
            await fleet.attempts.query(**kwargs)
        assert exc_info.value.field == field, kwargs


# -- stats -----------------------------------------------------------------------------


async def test_stats_count_mean_p95(fleet: Fleet) -> None:
    rng = random.Random(7)
    samples: dict[str, list[float]] = {"ten": [float(v) for v in range(1, 11)]}
    for n in (1, 2, 3, 5, 19, 20, 21, 40):
        samples[f"n{n:02d}"] = [round(rng.uniform(0, 100), 3) for _ in range(n)]
    for action, values in samples.items():
        shuffled = values[:]
        rng.shuffle(shuffled)
        for v in shuffled:
            rec(fleet, agent="st", action=action, outcome="success", elapsed_s=v)
    token = await fleet.flush()
    stats = await fleet.attempts.stats(agent="st", min_seq=token)
    by_action = {s.action: s for s in stats.items}
    assert set(by_action) == set(samples)
    ten = by_action["ten"]
    assert (ten.outcome, ten.count, ten.p95_elapsed_s) == ("success", 10, 9.0)
    assert ten.mean_elapsed_s == pytest.approx(5.5)
    for action, values in samples.items():
        s = by_action[action]
        assert s.count == len(values), action
        assert s.mean_elapsed_s == pytest.approx(sum(values) / len(values)), action
        assert s.p95_elapsed_s == p95(values), (action, len(values))
    assert set(msgspec.structs.asdict(ten)) == {"action", "outcome", "count", "mean_elapsed_s", "p95_elapsed_s"}


async def test_stats_grouping_ordering_and_filters(fleet: Fleet) -> None:
    plan = [("o1", "b", "x", 1), ("o1", "b", "y", 3), ("o1", "b", "z", 2), ("o1", "a", "r", 1), ("o1", "a", "q", 2),
            ("o1", "c", "q", 1), ("o2", "a", "q", 5), ("o2", "d", "w", 1)]
    for agent, action, outcome, n in plan:
        for i in range(n):
            rec(fleet, agent=agent, action=action, outcome=outcome, elapsed_s=i + 1)
    for _ in range(4):  # old rows: out of "2d", in the unfiltered stats
        rec(fleet, agent="o1", action="b", outcome="old", elapsed_s=9, ts=ago(days=3))
    token = await fleet.flush()

    def triples(stats: Any) -> list[tuple[str, str, int]]:
        return [(s.action, s.outcome, s.count) for s in stats.items]

    assert triples(await fleet.attempts.stats(agent="o1", since="2d", min_seq=token)) == [
        ("a", "q", 2), ("a", "r", 1), ("b", "y", 3), ("b", "z", 2), ("b", "x", 1), ("c", "q", 1)]
    assert triples(await fleet.attempts.stats(agent="o1", min_seq=token)) == [
        ("a", "q", 2), ("a", "r", 1), ("b", "old", 4), ("b", "y", 3), ("b", "z", 2), ("b", "x", 1), ("c", "q", 1)]
    assert triples(await fleet.attempts.stats(since="2d", min_seq=token)) == [
        ("a", "q", 7), ("a", "r", 1), ("b", "y", 3), ("b", "z", 2), ("b", "x", 1), ("c", "q", 1), ("d", "w", 1)]
    assert triples(await fleet.attempts.stats(agent="o2", min_seq=token)) == [("a", "q", 5), ("d", "w", 1)]
    assert (await fleet.attempts.stats(agent="nobody", min_seq=token)).items == []
    # the same ordering rule, computed here from the data
    stats = await fleet.attempts.stats(min_seq=token)
    keys = [(s.action, -s.count) for s in stats.items]
    assert keys == sorted(keys)


# -- summarize ----------------------------------------------------------------------------


async def test_summarize_newest_100(fleet: Fleet) -> None:
    rng = random.Random(11)
    base = datetime(2026, 6, 1, tzinfo=UTC)
    rows = []
    for i in range(100):
        action = rng.choice(["probe", "send", "wait"])
        outcome = rng.choice(["success", "send_error", "completion_timeout"])
        elapsed = round(rng.uniform(0, 20), 2)
        ts = (base + timedelta(minutes=i)).strftime("%Y-%m-%dT%H:%M:%SZ")
        rows.append((ts, action, outcome, elapsed))
    rows.sort(key=lambda r: r[0])
    for ts, action, outcome, elapsed in rows:
        rec(fleet, agent="sum", action=action, outcome=outcome, elapsed_s=elapsed, ts=ts)
    # recorded last but older by ts: outside the newest 100
    for i in range(5):
        rec(fleet, agent="sum", action="ancient", outcome="success", elapsed_s=999,
            ts=(base - timedelta(days=1, minutes=i)).isoformat())
    rec(fleet, agent="other", action="probe", outcome="success", elapsed_s=500)
    token = await fleet.flush()

    summary = await fleet.attempts.summarize("sum", min_seq=token)
    last = rows[-1]
    assert (summary.last_action_at, summary.last_action_name, summary.last_action_outcome,
            summary.last_action_elapsed_s) == last
    counts: dict[str, int] = {}
    by_action: dict[str, list[float]] = {}
    for _, action, outcome, elapsed in rows:
        counts[f"{action}:{outcome}"] = counts.get(f"{action}:{outcome}", 0) + 1
        by_action.setdefault(action, []).append(elapsed)
    assert summary.counts == counts
    assert sum(summary.counts.values()) == 100
    assert summary.p95_elapsed_s_by_action == {a: p95(v) for a, v in by_action.items()}
    assert_answer_meta(summary, token)

    small = await fleet.attempts.summarize("sum", limit=3, min_seq=token)
    newest3 = rows[-3:]
    assert sum(small.counts.values()) == 3
    assert small.counts == {k: sum(1 for r in newest3 if f"{r[1]}:{r[2]}" == k)
                            for k in {f"{r[1]}:{r[2]}" for r in newest3}}


async def test_summarize_unknown_agent(fleet: Fleet) -> None:
    rec(fleet, agent="known")
    token = await fleet.flush()
    s = await fleet.attempts.summarize("ghost", min_seq=token)
    assert (s.last_action_at, s.last_action_name, s.last_action_outcome, s.last_action_elapsed_s, s.counts,
            s.p95_elapsed_s_by_action) == ("", "", "", None, {}, {})
    assert_answer_meta(s, token)
    with pytest.raises(FleetValidationError) as exc_info:
        await fleet.attempts.summarize("")
    assert exc_info.value.field == "agent"


# -- retention: purge + rebuild -------------------------------------------------------------


async def _rebuild_and_wait(fleet: Fleet) -> int:
    started = await fleet.rebuild("attempts")
    generation = started["generation"]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        status = await fleet.status()
        gens = [p for p in status.projections if p.name == "attempts"]
        live = [p for p in gens if p.state == "live"]
        if len(live) == 1 and live[0].generation == generation:
            return generation
        assert loop.time() < deadline, f"rebuild to generation {generation} never went live: {gens}"
        await asyncio.sleep(0.05)


async def test_purge_days_and_rebuild_yields_same_rows(fleet: Fleet) -> None:
    for i in range(4):
        rec(fleet, agent="pg", action="old40", ts=ago(days=40, minutes=i))
    for i in range(3):
        rec(fleet, agent="pg", action="old10", ts=ago(days=10, minutes=i))
    for _ in range(2):
        rec(fleet, agent="pg", action="fresh")
    token = await fleet.flush()
    assert len(await all_rows(fleet, token)) == 9

    result = await fleet.attempts.purge(30)
    assert result.deleted == 4
    assert set(msgspec.structs.asdict(result)) == {"deleted", "before", "as_of", "lag", "lag_s"}
    before = datetime.fromisoformat(result.before)
    assert abs((datetime.now(UTC) - timedelta(days=30) - before).total_seconds()) < 120
    assert_answer_meta(result, token)
    assert sorted(r.action for r in await all_rows(fleet, token)) == ["fresh"] * 2 + ["old10"] * 3
    assert (await fleet.attempts.purge(30)).deleted == 0
    assert (await fleet.attempts.purge(5.5)).deleted == 3

    # recorded after the purge with an old ts: the purge does not reach it (also not on replay)
    rec(fleet, agent="pg", action="late-old", ts=ago(days=40))
    token = await fleet.flush()
    rows_before = await all_rows(fleet, token)
    assert sorted(r.action for r in rows_before) == ["fresh", "fresh", "late-old"]
    stats_before = await fleet.attempts.stats(min_seq=token)

    await _rebuild_and_wait(fleet)
    rows_after = await all_rows(fleet, token)
    assert [msgspec.to_builtins(r) for r in rows_after] == [msgspec.to_builtins(r) for r in rows_before]
    assert (await fleet.attempts.stats(min_seq=token)).items == stats_before.items

    for bad in (-1, float("nan"), "3", True):
        with pytest.raises(FleetValidationError) as exc_info:
            await fleet.attempts.purge(bad)  # type: ignore[arg-type]
        assert exc_info.value.field == "days"


async def test_stream_max_age_default_30_days_and_configurable(settings: FleetSettings, server: Server) -> None:
    nc = await nats.connect(settings.nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(STREAM)
        assert info.config.max_age == pytest.approx(30 * 86400)
        await ensure_streams(nc, settings.model_copy(update={"attempts_max_age_days": 7}))
        info = await js.stream_info(STREAM)
        assert info.config.max_age == pytest.approx(7 * 86400)
    finally:
        await nc.close()


# -- replies carry as_of/lag; consistency tokens --------------------------------------------------


async def test_as_of_and_lag_in_every_reply(fleet: Fleet) -> None:
    receipt = rec(fleet, agent="meta")
    token = await fleet.flush()
    assert receipt.position is not None and receipt.position.stream == STREAM
    assert token[STREAM] >= receipt.position.seq
    assert receipt.token == {STREAM: receipt.position.seq}
    for answer in (
        await fleet.attempts.query(min_seq=token),
        await fleet.attempts.query(min_seq=receipt),  # a Receipt works as a token too
        await fleet.attempts.stats(min_seq=token),
        await fleet.attempts.summarize("meta", min_seq=token),
        await fleet.attempts.purge(365),
    ):
        assert_answer_meta(answer, token)
        wire = msgspec.to_builtins(answer)
        assert "as_of" in wire and "lag" in wire
    status = await fleet.status()
    assert status.as_of.get(STREAM, -1) >= token[STREAM]


async def test_stale_min_seq_gives_stale_error(settings: FleetSettings, tmp_path: Path) -> None:
    quick = settings.model_copy(update={"query_wait_max_s": 0.2, "data_dir": tmp_path / "quick"})
    srv = Server(quick)
    await srv.start()
    try:
        async with await Fleet.connect(settings=quick) as fleet:
            rec(fleet, agent="stale")
            token = await fleet.flush()
            beyond = {STREAM: token[STREAM] + 1000}
            with pytest.raises(StaleError, match="stale"):
                await fleet.attempts.query(min_seq=beyond)
            with pytest.raises(StaleError):
                await fleet.attempts.stats(min_seq=beyond)
            with pytest.raises(StaleError):
                await fleet.attempts.summarize("stale", min_seq=beyond)
            # the service is still fine afterwards
            page = await fleet.attempts.query(min_seq=token)
            assert [r.agent for r in page.items] == ["stale"]
    finally:
        await srv.stop()


async def test_fleet_sync_records_and_queries(settings: FleetSettings, server: Server) -> None:
    def work() -> tuple[list[Any], Any, Any, dict[str, int]]:
        sync = FleetSync.connect(settings=settings)
        try:
            receipts = [
                sync.attempts.record(agent="sync", action="probe", outcome="success", elapsed_s=float(i),
                                     ts=f"2026-07-01T00:00:0{i}Z", extras={"i": i})
                for i in range(3)
            ]
            with pytest.raises(FleetValidationError):
                sync.attempts.record(agent="", action="probe", outcome="success", elapsed_s=1.0)
            token = sync.flush()
            page = sync.attempts.query(agent="sync", min_seq=token)
            stats = sync.attempts.stats(agent="sync", min_seq=token)
            summary = sync.attempts.summarize("sync", min_seq=token)
            assert [r.id for r in page.items] == [r.id for r in reversed(receipts)]
            return page.items, stats, summary, token
        finally:
            sync.close()

    items, stats, summary, token = await asyncio.to_thread(work)
    assert [r.extras for r in items] == [{"i": 2}, {"i": 1}, {"i": 0}]
    assert [(s.action, s.outcome, s.count, s.p95_elapsed_s) for s in stats.items] == [("probe", "success", 3, 1.0)]
    assert summary.last_action_at == "2026-07-01T00:00:02Z" and summary.counts == {"probe:success": 3}
    assert token[STREAM] >= 3


async def test_agent_threads_connecting_at_once_share_the_spool_dir(settings: FleetSettings, server: Server,
                                                                    fleet: Fleet) -> None:
    """Agents that are plain threads each make a FleetSync with the same settings (hence one spool root),
    starting at the same moment. Every connect must work and every attempt must land."""
    threads, rounds = 6, 20
    failures: list[str] = []
    lock = threading.Lock()

    def agent(t: int) -> None:
        for i in range(rounds):
            try:
                sync = FleetSync.connect(settings=settings)
            except Exception as exc:
                with lock:
                    failures.append(f"thread {t} round {i}: FleetSync.connect raised {type(exc).__name__}: {exc}")
                continue
            try:
                sync.attempts.record(agent=f"thr{t}", action=f"r{i}", outcome="success", elapsed_s=0.1)
            finally:
                sync.close()

    await asyncio.gather(*(asyncio.to_thread(agent, t) for t in range(threads)))
    assert not failures, f"{len(failures)} of {threads * rounds} connects failed:\n" + "\n".join(failures[:5])
    rec(fleet, agent="marker")
    token = await fleet.flush()
    rows = await all_rows(fleet, token)
    assert len(rows) == threads * rounds + 1

