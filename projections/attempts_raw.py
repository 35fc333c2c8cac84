r"""The attempt log's fold: payloads decoded into columns, checked by column, panes never re-serialised.

`AttemptsProjection.fold_raw` runs this on every batch (issue 19). `prepare_attempts`
(on the prepare thread, holding the GIL for its Python) decodes each payload into
attempts_wire's `_Fast` with one C-level `map` per chunk of payloads, takes the columns
out with `attrgetter` maps, and checks the rules the decode left out over whole Arrow
columns (pyarrow compute: C++, RE2, no Python per event):

* `id`: the UUID pattern (RE2, which is stricter than Python's `re`: its `$` takes no
  trailing newline);
* `ts`: only the shape the SDK writes (`YYYY-MM-DDTHH:MM:SS[.ffffff]+00:00`, fields in
  range) is parsed by the column, with Arrow's ISO-8601 cast, which for that shape gives
  what `parse_ts` gives (a day the month lacks fails the cast: the batch's ts are then
  checked by `parse_ts`);
* the subject: `fleet.attempt.<agent>.<action>` with each distinct agent and action
  escaped once (`subjects.escape_token`);
* each pane's text is a JSON string: its first byte is `"`.

The panes are copied once, each slice of SLICE_ROWS rows by one `bytes.join` of head,
text and tail (attempts_wire: `{"format":F,"text":T[,"truncated":B]}`, T as it came), into
the buffer of the stored column. A row that fails a column check is not judged here: it
goes through attempts_wire's `strict_row`, today's rules one payload at a time, and so does
every payload of a chunk whose decode raised. Rows are stored only as `strict_row` would
store them; a row `strict_row` refuses — another type (purges), anything the decoder would
reject, a pane of another shape, an oversize or non-UTF-8 payload (`data` NULL) — goes to the
runtime's decoder (`decode`), which stays the only judge of rejects and writes them with
their reasons; the events it accepts are folded by `fold`, in stream order between the
bulk rows. The INSERT … SELECT of each range of seqs between those is attempts_sql's.
"""

from __future__ import annotations

from array import array as int_array
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from itertools import accumulate, chain, islice, pairwise, repeat
from operator import add, attrgetter, is_not
from typing import TYPE_CHECKING, Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
from fleetlog.schemas import AttemptRecorded, parse_ts, subjects
from fleetlog.schemas._base import UUID_PATTERN

from . import attempts_wire as wire
from ._base import DecodeRows, FoldReject, Projection, RawBatch
from .attempts_sql import BULK, BULK_REPEATS, END, OTHER_BODY, another_body, insert_attempts, insert_range

if TYPE_CHECKING:
    import duckdb

__all__ = [
    "SLICE_ROWS", "Prepared", "another_body", "attempts_table", "fold_attempts_raw", "insert_attempts",
    "prepare_attempts",
]

# Rows per Python-to-Arrow step (a pane slice's join, a column's conversion): each holds the
# GIL throughout, and the fold thread's DuckDB client re-takes the GIL after every task of its
# query and waits out each step. In slices, the GIL changes hands between them.
SLICE_ROWS = 256

_ID, _TS, _AGENT, _ACTION, _OUTCOME, _ELAPSED, _BEFORE, _AFTER, _EXTRAS = map(attrgetter, (
    "id", "ts", "agent", "action", "outcome", "elapsed_s", "pane_before", "pane_after", "extras"))
_FORMAT, _TEXT, _TRUNCATED = map(attrgetter, ("format", "text", "truncated"))
# The shape the SDK writes (`now_iso`, `datetime.isoformat()` of a UTC time), fields in range;
# year 0000 is refused by parse_ts, so by the shape too.
_TS_SHAPE = (r"^(\d{3}[1-9]|\d\d[1-9]\d|\d[1-9]\d\d|[1-9]\d{3})-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
             r"T([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d{6})?\+00:00$")
_TS_UTC = wire.SCHEMA.field("ts_utc").type
_EPOCH = pa.scalar("1970-01-01T00:00:00+00:00")


class Prepared(NamedTuple):
    """A batch decoded into columns (`prepare_attempts`), ready for its INSERT."""

    rows: pa.Table
    others: list[int]  # seqs for the decoder
    repeats: bool  # an id occurs twice among `rows`


def prepare_attempts(batch: RawBatch) -> Prepared:
    """The decode, off the fold thread (`Projection.prepare_raw`): it reads nothing from the view.

    Each slice's panes are joined into their columns right after the slice is decoded, while its
    payloads are still in the core's cache: in the replay every payload is fresh memory, and a
    pass over it that comes after the whole batch is decoded reads it from RAM again."""
    table = batch.table
    n = table.num_rows
    decoded: list[Any] = []  # per row: a `_Fast`, or None (NULL payload, or the decode raised)
    before, after = _PaneColumn(), _PaneColumn()
    fast = wire.FAST
    for part in _decode_slices(table.column("data")):
        decoded += part
        if list(map(type, part)).count(fast) == len(part):
            before.add(list(map(_BEFORE, part)))
            after.add(list(map(_AFTER, part)))
        else:
            before.add([e.pane_before if type(e) is fast else None for e in part])
            after.add([e.pane_after if type(e) is fast else None for e in part])
    types = list(map(type, decoded))
    picked: list[int] | None = None  # the rows decoded as `_Fast` (None: all)
    if types.count(fast) != n:  # a purge, garbage: a Python step per row, in this batch only
        picked = [i for i, t in enumerate(types) if t is fast]
        decoded = [decoded[i] for i in picked]
    del types
    seqs, subjects_ = table.column("seq"), table.column("subject")
    # Typed indices: `take([])` of a plain list has no kernel (a batch where no row decoded).
    taken = None if picked is None else pa.array(picked, pa.int64())
    rows, ok = _columns(decoded, seqs if taken is None else seqs.take(taken),
                        subjects_ if taken is None else subjects_.take(taken),
                        before.finish(picked), after.finish(picked))
    del decoded
    others: list[int] = []
    if picked is not None or ok is not None:
        unvouched = set() if ok is None else set(pc.indices_nonzero(pc.invert(ok)).to_pylist())
        vouched = {p for j, p in enumerate(range(n) if picked is None else picked) if j not in unvouched}
        if ok is not None:
            rows = rows.filter(ok)
        strict, others = _strict_rows(table, [i for i in range(n) if i not in vouched])
        if strict.num_rows:
            rows = pa.concat_tables([rows, strict])
            rows = rows.take(pc.sort_indices(rows.column("seq")))
    # The decoder keeps the first of a repeated id; ids compare as UUIDs (any letter case).
    repeats = len(pc.unique(pc.ascii_lower(rows.column("id")))) != rows.num_rows
    return Prepared(rows, others, repeats)


def _views(chunk: pa.Array) -> list[memoryview | None]:
    """Each payload of a chunk as a memoryview of the chunk's Arrow buffer (no copy), None where NULL."""
    _, offsets_buffer, values = chunk.buffers()
    offsets: list[int] = memoryview(offsets_buffer).cast("i")[chunk.offset : chunk.offset + len(chunk) + 1].tolist()
    view = memoryview(values) if values is not None else memoryview(b"")
    views: list[memoryview | None] = [view[a:b] for a, b in pairwise(offsets)]
    if chunk.null_count:
        views = [v if valid else None for v, valid in zip(views, chunk.is_valid().to_pylist(), strict=True)]
    return views


def _decode_slices(data: pa.ChunkedArray) -> Iterator[list[Any]]:
    """The payloads decoded as `_Fast`, SLICE_ROWS at a time whatever the chunks (a slice per
    yield; the pane columns' chunks, and so the record batches DuckDB's scan makes of the table,
    stay that size: each is a task after which DuckDB's client re-takes the GIL), each slice by one
    C-level map (~0.4 ms of GIL with 2 KB panes); a slice where one raises (or with a NULL) one
    payload at a time, with None for those (`_Fast` only relaxes `_Wire`: what it refuses,
    `strict_row` refuses too)."""
    decode = wire.fast.decode
    for i in range(0, len(data), SLICE_ROWS):
        part = data.slice(i, SLICE_ROWS)
        views: list[memoryview | None] = []
        for chunk in part.chunks:
            views += _views(chunk)
        if part.null_count:
            yield [None if view is None else _decode_or_none(decode, view) for view in views]
            continue
        try:
            yield list(map(decode, views))  # type: ignore[arg-type]  # whole, or nothing if one raises
        except wire.DECODE_ERRORS:
            yield [_decode_or_none(decode, view) for view in views]  # type: ignore[arg-type]


def _decode_or_none(decode: Any, payload: memoryview) -> Any:
    try:
        return decode(payload)
    except wire.DECODE_ERRORS:
        return None


def _columns(
    events: list[Any], seqs: pa.ChunkedArray, subjects_: pa.ChunkedArray,
    panes_before: tuple[pa.ChunkedArray, pa.Array | None], panes_after: tuple[pa.ChunkedArray, pa.Array | None],
) -> tuple[pa.Table, pa.Array | None]:
    """The decoded events as the attempts table (their pane columns made by `_PaneColumn`), and
    which rows the column checks vouch for (None: all of them).

    The short columns are one Arrow array each (~0.15 ms of GIL for 5,000 rows): pyarrow
    compute pays a fixed cost per chunk (RE2 compiles its pattern again), 0.08 µs per event
    with 256-row chunks."""
    ids = pa.array(list(map(_ID, events)), pa.string(), memory_pool=wire.POOL)
    ts = pa.array(list(map(_TS, events)), pa.string(), memory_pool=wire.POOL)
    agents = pa.array(list(map(_AGENT, events)), pa.string(), memory_pool=wire.POOL)
    actions = pa.array(list(map(_ACTION, events)), pa.string(), memory_pool=wire.POOL)
    ts_utc, ts_ok = _ts_utc(ts)
    (before, before_ok), (after, after_ok) = panes_before, panes_after
    expected = pc.binary_join_element_wise("fleet.attempt", _escaped(agents), _escaped(actions), ".")
    ok = pc.and_(pc.and_(pc.match_substring_regex(ids, UUID_PATTERN), ts_ok), pc.equal(subjects_, expected))
    for check in (before_ok, after_ok):
        if check is not None:
            ok = pc.and_(ok, check)
    outcomes = pa.array(list(map(_OUTCOME, events)), pa.string(), memory_pool=wire.POOL)
    rows = pa.table([
        ids, seqs, ts, ts_utc, agents, actions, outcomes,
        pa.array(list(map(_ELAPSED, events)), pa.float64(), memory_pool=wire.POOL), before, after,
        # extras were decoded with the decoder's type (`_Fast`); stored as msgspec writes them
        pa.array(list(map(wire.encode, map(_EXTRAS, events))), pa.binary(), memory_pool=wire.POOL).view(pa.string()),
    ], schema=wire.SCHEMA)
    return rows, None if pc.all(ok).as_py() else ok


def _ts_utc(ts: pa.Array) -> tuple[pa.Array, pa.Array]:
    """`ts` parsed where it has the SDK's shape (placeholder elsewhere), and where it has it."""
    ok = pc.match_substring_regex(ts, _TS_SHAPE)
    try:
        return pc.cast(ts if pc.all(ok).as_py() else pc.if_else(ok, ts, _EPOCH), _TS_UTC), ok
    except pa.ArrowInvalid:  # a day its month lacks (2023-02-29): those rows are strict_row's
        ok = pc.and_(ok, pa.array(list(map(_parses, ts.to_pylist())), pa.bool_()))
        return pc.cast(pc.if_else(ok, ts, _EPOCH), _TS_UTC), ok


def _parses(ts: str) -> bool:
    try:
        parse_ts(ts)
    except ValueError:
        return False
    return True


def _escaped(identities: pa.Array) -> pa.Array:
    """Each identity as a subject token: the distinct ones (a batch holds few) escaped once."""
    distinct = pc.unique(identities)
    values: list[str] = distinct.to_pylist()
    escaped = list(map(subjects.escape_token, values))
    if escaped == values:
        return identities
    return pc.take(pa.array(escaped, pa.string()), pc.index_in(identities, value_set=distinct))


class _PaneColumn:
    """A pane column (its JSON, NULL where none), slice by slice (`add`), and which rows' texts
    are JSON strings (`finish`).

    Per slice, one `bytes.join` of each pane's head, text and tail writes the column's buffer;
    its offsets come from the lengths (C-level maps). A second, binary view of the same buffer
    starts each value at a text: one `starts_with '"'` over them all checks every text at once."""

    def __init__(self) -> None:
        self.column: list[pa.Array] = []
        self.texts_at: list[pa.Array] = []

    def add(self, part: list[Any]) -> None:
        """One slice's panes (None: no pane, or the row is not a `_Fast`)."""
        present = list(filter(None, part))  # a Struct is true
        if not present:
            self.column.append(pa.nulls(len(part), pa.string()))
            return
        texts = list(map(_TEXT, present))
        formats = set(map(_FORMAT, present))
        truncated = set(map(_TRUNCATED, present))
        if len(formats) == len(truncated) == 1:  # the usual slice: one head and tail for every pane
            head, tail = wire.head(next(iter(formats))), wire.tail(next(iter(truncated)))
            pieces: Iterable[tuple[bytes, Any, bytes]] = zip(repeat(head), texts, repeat(tail), strict=False)
            lengths = map(add, map(len, texts), repeat(len(head) + len(tail)))
            head_lengths: Iterable[int] = repeat(len(head))
        else:
            heads = {f: wire.head(f) for f in formats}
            pane_heads = list(map(heads.__getitem__, map(_FORMAT, present)))
            tails = list(map(wire.tail, map(_TRUNCATED, present)))
            pieces = zip(pane_heads, texts, tails, strict=True)
            lengths = map(add, map(add, map(len, pane_heads), map(len, texts)), map(len, tails))
            head_lengths = map(len, pane_heads)
        data = pa.py_buffer(b"".join(chain.from_iterable(pieces)))
        ends = list(accumulate(lengths, initial=0))
        text_starts = int_array("i", map(add, islice(ends, len(present)), head_lengths))
        text_starts.append(ends[-1])
        self.texts_at.append(pa.Array.from_buffers(pa.binary(), len(present), [None, pa.py_buffer(text_starts), data]))
        if len(present) == len(part):
            offsets = pa.py_buffer(int_array("i", ends))
            self.column.append(pa.Array.from_buffers(pa.string(), len(part), [None, offsets, data]))
            return
        mask = list(map(is_not, part, repeat(None)))  # row offsets: the end of the panes before it
        offsets = pa.py_buffer(int_array("i", map(ends.__getitem__, accumulate(mask, initial=0))))
        validity = pa.array(mask, pa.bool_()).buffers()[1]
        self.column.append(pa.Array.from_buffers(pa.string(), len(part), [validity, offsets, data],
                                                 null_count=len(part) - len(present)))

    def finish(self, picked: list[int] | None) -> tuple[pa.ChunkedArray, pa.Array | None]:
        """The column (of the `picked` rows only, if given), and which rows' texts are JSON
        strings (None: all)."""
        column = pa.chunked_array(self.column, pa.string())
        ok: pa.Array | None = None
        if self.texts_at:
            ok_present = pc.starts_with(pa.chunked_array(self.texts_at, pa.binary()), '"')
            if not pc.all(ok_present).as_py():
                present = column.is_valid().combine_chunks()
                ok = pc.replace_with_mask(pa.array([True] * len(column), pa.bool_()), present,
                                          ok_present.combine_chunks())
        if picked is None:
            return column, ok
        indices = pa.array(picked, pa.int64())
        return column.take(indices), None if ok is None else ok.take(indices)


def _strict_rows(table: pa.Table, rows: list[int]) -> tuple[pa.Table, list[int]]:
    """`rows` (positions in the batch) by `strict_row`, one at a time: their table, and the
    seqs of those it refuses (the decoder's)."""
    seqs: list[int] = table.column("seq").take(rows).to_pylist()
    subjects_: list[str] = table.column("subject").take(rows).to_pylist()
    data = table.column("data").take(rows)
    views: list[memoryview | None] = []
    for chunk in data.chunks:
        views += _views(chunk)
    c = wire.Columns()
    others: list[int] = []
    for seq, subject, view in zip(seqs, subjects_, views, strict=True):
        row = None if view is None else wire.strict_row(view, subject)
        if row is None:
            others.append(seq)
        else:
            c.add(seq, *row)
    return _table(c), others


def _table(c: wire.Columns) -> pa.Table:
    text = pa.string()
    return pa.table([
        _array(c.ids, text), _array(c.seqs, pa.int64()), _array(c.ts, text), _array(c.at, _TS_UTC),
        _array(c.agents, text), _array(c.actions, text), _array(c.outcomes, text), _array(c.elapsed, pa.float64()),
        _text(c.before), _text(c.after), _text(c.extras),
    ], schema=wire.SCHEMA)


def attempts_table(events: Sequence[tuple[int, AttemptRecorded, datetime]]) -> pa.Table:
    """The decoder's path: (seq, decoded event, parsed ts) rows, panes and extras encoded by msgspec."""
    c = wire.Columns()
    encode = wire.encode
    for seq, e, at in events:
        c.add(seq, e, at, None if e.pane_before is None else encode(e.pane_before),
              None if e.pane_after is None else encode(e.pane_after), encode(e.extras))
    return _table(c)


def _array(values: Sequence[Any], type_: pa.DataType) -> pa.ChunkedArray:
    """`values` as Arrow, converted SLICE_ROWS at a time (the GIL can change hands between)."""
    n = len(values)
    if n <= SLICE_ROWS:
        return pa.chunked_array([pa.array(values, type_, memory_pool=wire.POOL)], type_)
    return pa.chunked_array(
        [pa.array(values[i : i + SLICE_ROWS], type_, memory_pool=wire.POOL) for i in range(0, n, SLICE_ROWS)], type_
    )


def _text(values: Sequence[bytes | None]) -> pa.ChunkedArray:
    """JSON as a string column, not checked again: msgspec's output, or slices of payloads that
    are valid UTF-8 (checked when the batch became Arrow) cut at JSON token edges."""
    return pa.chunked_array([c.view(pa.string()) for c in _array(values, pa.binary()).chunks], pa.string())


def fold_attempts_raw(
    projection: Projection, con: duckdb.DuckDBPyConnection, batch: RawBatch, decode: DecodeRows
) -> Sequence[FoldReject] | None:
    prepared = batch.prepared if isinstance(batch.prepared, Prepared) else prepare_attempts(batch)
    rows, others, repeats = prepared
    del prepared
    sql = BULK_REPEATS if repeats else BULK
    refused: list[FoldReject] = []
    other_body: list[tuple[int, str, int]] = []
    lo = 0
    # Events the decoder accepted (purges, unusual panes), folded in stream order between
    # the bulk rows.
    for event in decode(others) if others else ():
        if rows.num_rows:
            other_body += insert_range(con, sql, OTHER_BODY, rows, lo, event.seq)
        refused.extend(projection.fold(con, [event]) or ())
        lo = event.seq
    if rows.num_rows:
        other_body += insert_range(con, sql, OTHER_BODY, rows, lo, END)
    if other_body:
        why = {seq: another_body(seq, i, kept) for seq, i, kept in other_body}
        # One at a time: the decoder keeps only the first of a repeated id among what it is given.
        refused.extend((event, why[event.seq]) for seq in sorted(why) for event in decode([seq]))
    return refused
