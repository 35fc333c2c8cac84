"""The attempts prepare by column (attempts_raw) against the same rules one payload at a time.

Why: `prepare_attempts` checks ids, ts, subjects and pane texts over whole Arrow columns and
sends only the rows those checks do not vouch for through `strict_row` (the per-row rules).
Whatever it vouches for must be stored exactly as the per-row path stores it, and whatever
it does not must end where the per-row path puts it. So every batch here is prepared both
ways and the two must be equal, row for row and byte for byte, with the rows handed to
the decoder the same; for what the SDK writes, both must also equal the decoder's own path
(typed decode, then `attempts_table`). No broker or database: prepare reads neither.
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pytest
from fleetlog.projections import attempts_raw
from fleetlog.projections._base import RawBatch
from fleetlog.projections.attempts import PROJECTION
from fleetlog.projections.attempts_raw import attempts_table, prepare_attempts
from fleetlog.schemas import AttemptRecorded, AttemptsPurged, encode_event, new_event_id, parse_ts
from fleetlog.services.projector.fold import BatchFolder

from .test_bulk_fold import _event

STREAM = "FLEET_ATTEMPTS"


def _sdk(agent: str = "alpha", action: str = "probe", **kw: Any) -> tuple[str, bytes]:
    """Exactly what `fleet.attempts.record()` publishes (panes normalised as the client does)."""
    e = AttemptRecorded(**_event(agent, action, **kw))
    return e.subject(), encode_event(e)


def _edit(payload: bytes, old: str, new: str, subject: str = "fleet.attempt.alpha.probe") -> tuple[str, bytes]:
    text = payload.decode()
    assert old in text
    return subject, text.replace(old, new, 1).encode()


def _corpus() -> list[tuple[str, bytes | None]]:
    """Odd but valid events, events only the per-row rules or the decoder can judge, and garbage."""
    base = _sdk()[1]
    purge = AttemptsPurged(id=new_event_id(), ts="2026-11-20T00:00:00Z", before="2026-11-16T00:00:00Z")
    upper = new_event_id().upper()
    out: list[tuple[str, bytes | None]] = [
        _sdk(),
        _sdk(id=upper),  # letter case: dedupes against its lower-case twin
        _sdk(id=upper.lower()),
        _sdk(id="6ba7b810-9dad-41d1-80b4-00c04fd430c8"),  # a v4 id
        _edit(base, '"id":"', '"id":"X'),  # not a UUID
        _edit(base, '","ts"', '\\n","ts"'),  # id + newline: Python's `$` takes it, RE2's does not
        # ts: the SDK's shapes, and every other ISO form parse_ts reads (the per-row path's)
        _sdk(ts="2026-11-16T03:44:42+00:00"),
        _sdk(ts="2024-02-29T23:59:59.999999+00:00"),
        _sdk(ts="0001-01-01T00:00:00+00:00"),
        _sdk(ts="9999-12-31T23:59:59.999999+00:00"),
        _sdk(ts="2026-11-16T03:44:42Z"),
        _sdk(ts="2026-11-16T03:44:42"),
        _sdk(ts="2026-11-16 03:44:42+00:00"),
        _sdk(ts="2026-11-16T08:14:42.5+05:30"),
        _sdk(ts="2026-11-16T03:44:42.1234567+00:00"),
        _sdk(ts="2026-11-16T03:44:42.062811+0000"),
        _sdk(ts="2026-11-16T03:44:42.062811-00:00"),
        _sdk(ts="2023-02-29T00:00:00+00:00"),  # the SDK's shape, a day February 2023 lacks: refused
        _sdk(ts="0000-01-01T00:00:00+00:00"),  # year 0: refused
        _sdk(ts="2026-11-16T24:00:00+00:00"),
        _sdk(ts="2026-11-16T23:59:60+00:00"),
        _sdk(ts="2026-13-16T03:44:42+00:00"),
        _sdk(ts="٢٠٢٦-11-16T03:44:42+00:00"),  # digits that are not ASCII
        # subjects: identities escaped, or published on the unescaped subject (refused)
        _sdk(agent="a.b"),
        _sdk(agent="with space", action="é"),
        _sdk(agent="100%", action="*>"),
        _sdk(agent="x%2E"),
        ("fleet.attempt.a.b.probe", _sdk(agent="a.b")[1]),
        ("fleet.attempt.alpha.other", _sdk()[1]),
        # panes: formats, truncated, present and absent in every mix
        _sdk(pane_before="$ ls\n\x1b[1mbold\x1b[0m\ttab é 😀", pane_after={"format": "json-dump", "text": "[1, 2]"}),
        _sdk(pane_before="x" * 100),  # truncated to the last 64 characters: "truncated": true
        _sdk(pane_before={"format": "full", "text": "a", "truncated": False}),
        _sdk(pane_after={"format": 'we"ird é', "text": "back\\slash \"q\" \x01\x7f\u2028"}),
        _sdk(pane_before="only before"),
        _sdk(pane_after="only after"),
        _edit(_sdk(pane_before="t")[1], '"text":"t"', '"text":"caf\\u00e9"'),  # escapes kept as they came
        _edit(_sdk(pane_before="t")[1], '"text":"t"', '"text":5'),  # not a string: the decoder's
        _edit(_sdk(pane_before="t")[1], '"text":"t"', '"text":"t","rows":24'),  # another shape: the decoder's
        # extras
        _sdk(extras={"big": 1234567890123456789, "tiny": 1e-7, "nested": {"a": [1, None, "s"]}}),
        _edit(base, '"extras":{}', '"extras":{"b": 1,  "a": [1.0, 2]}'),  # re-encoded as msgspec writes it
        _edit(base, '"extras":{}', '"extras":[1]'),  # not an object: refused
        _edit(base, ',"extras":{}', ""),  # absent: {}
        # not attempts, or not JSON
        (purge.subject(), encode_event(purge)),
        ("fleet.attempt.alpha.probe", b"{not json"),
        ("fleet.attempt.alpha.probe", None),  # NULL: oversize or not UTF-8
        ("fleet.attempt.alpha.probe", json.dumps({**json.loads(base), "elapsed_s": -1}).encode()),
    ]
    twice = _sdk(agent="twice")
    return [*out, twice, twice]


def _batch(items: list[tuple[str, bytes | None]], rows_per_chunk: int) -> RawBatch:
    seqs = list(range(1, len(items) + 1))
    texts = [None if p is None else p.decode() for _, p in items]
    cut = range(0, len(items), rows_per_chunk)
    return RawBatch(STREAM, pa.table({
        "seq": pa.chunked_array([seqs[i : i + rows_per_chunk] for i in cut], pa.int64()),
        "subject": pa.chunked_array([[s for s, _ in items[i : i + rows_per_chunk]] for i in cut], pa.string()),
        "data": pa.chunked_array([texts[i : i + rows_per_chunk] for i in cut], pa.string()),
    }))


def _row_by_row(batch: RawBatch) -> tuple[pa.Table, list[int]]:
    return attempts_raw._strict_rows(batch.table, list(range(batch.table.num_rows)))


@pytest.mark.parametrize(("rows_per_chunk", "slice_rows"), [(10_000, 256), (3, 2), (7, 5)])
def test_prepare_by_column_equals_row_by_row(rows_per_chunk: int, slice_rows: int,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Every payload of the corpus, shuffled, in chunks and slices of a few rows and in one piece."""
    monkeypatch.setattr(attempts_raw, "SLICE_ROWS", slice_rows)
    items = _corpus()
    random.Random(19).shuffle(items)
    batch = _batch(items, rows_per_chunk)
    prepared = prepare_attempts(batch)
    rows, others = _row_by_row(batch)
    assert prepared.rows.equals(rows)
    assert prepared.others == others
    assert prepared.repeats
    # Sanity: the corpus holds rows of both kinds, and the refused ones are the ones meant.
    assert 25 < rows.num_rows < len(items) - 15
    refused = {items[seq - 1][1] for seq in others}
    assert None in refused and b"{not json" in refused


def test_sdk_batch_folds_by_column_as_the_decoder_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the SDK writes (UTC times, panes of every form, identities that need escaping) is
    vouched for by the column checks alone, and stored as the decoder's path stores it."""
    rng = random.Random(7)
    t0 = datetime(2026, 11, 16, tzinfo=UTC)
    items = [
        _sdk(agent=rng.choice(["alpha", "a.b", "é x"]), action=rng.choice(["probe", "send:v2"]),
             ts=(t0 + timedelta(seconds=rng.uniform(0, 9e5), microseconds=rng.choice([0, 1]))).isoformat(),
             pane_before=rng.choice([None, "tail text", "é" * 80, {"format": "tmux", "text": "t"}]),
             pane_after=rng.choice([None, {"format": "full", "text": "a", "truncated": False}]),
             extras=rng.choice([{}, {"polls": 3, "model": "m-7"}]))
        for _ in range(300)
    ]
    monkeypatch.setattr(attempts_raw, "SLICE_ROWS", 16)

    def no_row_by_row(*args: Any) -> Any:
        raise AssertionError("a row the SDK wrote went through strict_row")

    monkeypatch.setattr(attempts_raw, "_strict_rows", no_row_by_row)
    prepared = prepare_attempts(_batch(items, 64))
    folder = BatchFolder.__new__(BatchFolder)
    folder.max_event_bytes = 1 << 20
    stored, rejects = folder.decode(PROJECTION, STREAM, [(i + 1, s, p) for i, (s, p) in enumerate(items)])
    assert not rejects and not prepared.others and not prepared.repeats
    assert prepared.rows.equals(attempts_table([(st.seq, st.event, st.at) for st in stored]))  # type: ignore[misc]


def test_ts_column_parse_equals_parse_ts() -> None:
    """The SDK's ts shape parsed by the column (Arrow's ISO cast) gives parse_ts's instant for
    every day of four years (a leap year among them) and times across the day; a day its
    month lacks and an hour, minute or second out of range are left to parse_ts, which refuses them."""
    rng = random.Random(3)
    good: list[str] = []
    day = datetime(2023, 1, 1, tzinfo=UTC)
    while day.year < 2027:
        t = day + timedelta(seconds=rng.randrange(86_400), microseconds=rng.choice([0, rng.randrange(1, 10**6)]))
        good.append(t.isoformat())
        day += timedelta(days=1)
    good += ["0001-01-01T00:00:00+00:00", "9999-12-31T23:59:59.999999+00:00", "2000-02-29T12:00:00+00:00"]
    bad = ["2023-02-29T00:00:00+00:00", "2100-02-29T00:00:00+00:00", "2026-04-31T00:00:00+00:00",
           "2026-01-01T24:00:00+00:00", "2026-01-01T23:60:00+00:00", "2026-01-01T23:59:60+00:00",
           "0000-06-01T00:00:00+00:00", "2026-00-01T00:00:00+00:00", "2026-01-00T00:00:00+00:00"]
    parsed, ok = attempts_raw._ts_utc(pa.array(good, pa.string()))
    assert ok.to_pylist() == [True] * len(good)
    assert parsed.to_pylist() == [parse_ts(s) for s in good]
    for s in bad:  # one at a time: a day the cast refuses sends the whole column to parse_ts
        parsed, ok = attempts_raw._ts_utc(pa.array([*good[:3], s], pa.string()))
        assert ok.to_pylist() == [True, True, True, False], s
        with pytest.raises(ValueError):
            parse_ts(s)


def test_a_batch_where_no_row_decodes_goes_to_the_decoder_whole() -> None:
    """Found by the rejects test: with no row decoded (garbage, an oversize payload, a purge
    alone), the column step took rows by an empty Python list, which pyarrow cannot type: the
    prepare raised and the batch went the slow way, logged as a failure."""
    purge = encode_event(AttemptsPurged(id=new_event_id(), ts="2026-11-16T00:00:00+00:00",
                                        before="2020-01-01T00:00:00+00:00"))
    items = [("fleet.attempt.alpha.probe", b"{not json"), ("fleet.attempt.purge", purge),
             ("fleet.attempt.alpha.probe", None)]
    prepared = prepare_attempts(_batch(items, 2))
    assert prepared.rows.num_rows == 0
    assert prepared.others == [1, 2, 3]
