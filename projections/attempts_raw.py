r"""The attempt log's fold: payloads decoded into columns by msgspec, pane text never re-serialised.

`AttemptsProjection.fold_raw` runs this on every batch (issue 19; it replaced a bulk
path that parsed the payloads in DuckDB and wrote each pane back out as JSON). Per
payload, one msgspec decode into `_Wire`: the attempt's own struct (its fields, rules,
defaults and tag, derived from `AttemptRecorded` so they cannot drift), except that

* a pane must have the client's shape, `{"format": str, "text": <JSON string>[,
  "truncated": bool]}` (services/client/attempts/panes.py), and its text is `msgspec.Raw`: located
  and checked as JSON, never turned into a `str`. The stored pane is
  `{"format":F,"text":T[,"truncated":B]}` with T the text's bytes as they came;
* extras (small) are decoded with the decoder's own type and stored as msgspec writes them.

Then the runtime's other rules, in Python: the subject (`fleet.attempt.<agent>.<action>`,
escaped) and `ts` (`parse_ts`). The rows become one Arrow table and one INSERT … SELECT.

For what the SDK publishes this stores exactly what the decoder's path stores
(`attempts_table`: typed decode, then msgspec writes each pane). A client that writes a
pane's keys in another order, with whitespace or with escapes msgspec does not write
(`\u00e9`, `\/`) gets the same pane back from every query, but the stored text keeps
its escapes. Which path folds an event depends only on its bytes, so a rebuild stores
what the live view stored, however the stream is batched.

Rows this path cannot vouch for — another type (purges), anything the decoder would
reject, a pane of another shape, an oversize or non-UTF-8 payload (`data` NULL) — go to
the runtime's decoder (`decode`), which stays the only judge of rejects and writes them
with their reasons; the events it accepts are folded by `fold`, in stream order between
the bulk rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec
import pyarrow as pa
import pyarrow.compute as pc
from fleetlog.schemas import AttemptRecorded, parse_ts, subjects

from ._base import DecodeRows, FoldReject, Projection, RawBatch

if TYPE_CHECKING:
    import duckdb

__all__ = [
    "POOL", "Prepared", "another_body", "attempts_table", "fold_attempts_raw", "insert_attempts", "prepare_attempts",
]

class _Pane(msgspec.Struct, forbid_unknown_fields=True, frozen=True, gc=False):
    """The client's pane (services/client/attempts/panes.py), its text located but not parsed."""

    format: str
    text: msgspec.Raw  # a JSON string (checked by `_pane_parts`), as it sits in the payload
    truncated: bool | msgspec.UnsetType = msgspec.UNSET


def _wire_struct() -> type[msgspec.Struct]:
    """`AttemptRecorded` with the client's pane shape and raw extras: otherwise the same names,
    types, rules, defaults and tag (derived, so the two cannot drift)."""
    fields: list[tuple[str, Any, Any]] = []
    for f in msgspec.structs.fields(AttemptRecorded):
        if f.name in ("pane_before", "pane_after"):
            fields.append((f.name, _Pane | None, None))
        elif f.name == "extras":
            fields.append((f.name, msgspec.Raw, msgspec.Raw(b"{}")))
        else:
            fields.append((f.name, f.type, msgspec.NODEFAULT if f.required else f.default))
    config = AttemptRecorded.__struct_config__
    return msgspec.defstruct(
        "_Wire", fields, kw_only=True, tag_field=config.tag_field, tag=config.tag, frozen=True, gc=False
    )


_Wire: Any = _wire_struct()  # a Struct class built at import: attributes unknown to mypy
# Decoded alone, a tagged struct takes a payload without `type`; in a union (as the
# decoder's event union does) the tag is required. `_NotAttempt` (a tag no client sends)
# only makes `_Wire` part of a union.
_NotAttempt = msgspec.defstruct("_NotAttempt", [], tag_field="type", tag="\x00", frozen=True, gc=False)
_wire: msgspec.json.Decoder[Any] = msgspec.json.Decoder(_Wire | _NotAttempt)
_extras = msgspec.json.Decoder(dict[str, Any])
_encode = msgspec.json.Encoder().encode
_TAILS = {msgspec.UNSET: "}", True: ',"truncated":true}', False: ',"truncated":false}'}
_heads: dict[str, str] = {}  # format -> '{"format":<format as JSON>,"text":' (a handful of formats)
_PaneParts = tuple[str | None, bytes | None, str | None]  # head, the text's bytes, tail (`_pane_parts`)
_NO_PANE: _PaneParts = (None, None, None)
# The fold's Arrow buffers (~12 MB a batch with 2 KB panes) come from the system allocator:
# pyarrow's default (mimalloc) hands freed pages back to the kernel at once, so each batch
# page-faulted its buffers in again (table build 10-18 µs per 2 KB event against 3-4).
POOL = pa.system_memory_pool()


class _Unusual(Exception):
    """A row this path does not vouch for: the decoder judges it."""


def _pane_parts(pane: _Pane | None) -> _PaneParts:
    """The pane's JSON in three parts, joined by the INSERT: `{"format":F,"text":`, the text's
    bytes as they came (copied once, never parsed or written again) and `}` (or the
    `truncated` member and `}`).

    msgspec has checked the text is one valid JSON value while locating it; it must be a
    string (anything else goes to the decoder, which may accept it: a pane is any object).
    The text is copied out of the `msgspec.Raw` with `bytes()`: handing pyarrow a memoryview
    of the Raw leaked a reference to it, and with it the batch's payload buffer (measured:
    +12 MB of RSS per 5,000-event batch, pyarrow 26.0.1 / msgspec 0.23).
    """
    if pane is None:
        return _NO_PANE
    text = bytes(pane.text)
    if text[0] != 0x22:  # '"'
        raise _Unusual
    head = _heads.get(pane.format)
    if head is None:
        head = '{"format":' + _encode(pane.format).decode() + ',"text":'
        if len(_heads) < 256:
            _heads[pane.format] = head
    return head, text, _TAILS[pane.truncated]


class _Columns:
    """The attempts table's columns, filled row by row (both fold paths)."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.seqs: list[int] = []
        self.ts: list[str] = []
        self.at: list[datetime] = []
        self.agents: list[str] = []
        self.actions: list[str] = []
        self.outcomes: list[str] = []
        self.elapsed: list[float] = []
        # Each pane in three parts (`_pane_parts`); the decoder's path: "", its JSON, "".
        self.before: tuple[list[str | None], list[bytes | None], list[str | None]] = ([], [], [])
        self.after: tuple[list[str | None], list[bytes | None], list[str | None]] = ([], [], [])
        self.extras: list[bytes] = []

    def add(self, seq: int, e: Any, at: datetime, before: _PaneParts, after: _PaneParts,
            extras: bytes) -> None:
        """One row (both paths; `e` an AttemptRecorded or a `_Wire`): its fields, panes in parts, extras."""
        self.ids.append(e.id)
        self.seqs.append(seq)
        self.ts.append(e.ts)
        self.at.append(at)
        self.agents.append(e.agent)
        self.actions.append(e.action)
        self.outcomes.append(e.outcome)
        self.elapsed.append(e.elapsed_s)
        for which, parts in ((self.before, before), (self.after, after)):
            which[0].append(parts[0])
            which[1].append(parts[1])
            which[2].append(parts[2])
        self.extras.append(extras)

    def table(self) -> pa.Table:
        return pa.table(
            {
                "id": _array(self.ids, pa.string()),
                "seq": _array(self.seqs, pa.int64()),
                "ts": _array(self.ts, pa.string()),
                "ts_utc": _array(self.at, pa.timestamp("us", tz="UTC")),
                "agent": _array(self.agents, pa.string()),
                "action": _array(self.actions, pa.string()),
                "outcome": _array(self.outcomes, pa.string()),
                "elapsed_s": _array(self.elapsed, pa.float64()),
                **_pane_columns("before", self.before),
                **_pane_columns("after", self.after),
                "extras": _array(self.extras, pa.string()),
            }
        )


# Rows per pa.array call. Converting a Python list holds the GIL for the whole call (~3 ms for
# 3,400 2 KB panes); the fold thread's DuckDB client re-takes the GIL after every task of its
# query and waited out each such call. In slices, the GIL changes hands between them.
SLICE_ROWS = 256


def _array(values: Sequence[Any], type_: pa.DataType) -> pa.ChunkedArray:
    """`values` as Arrow, converted SLICE_ROWS at a time (the GIL can change hands between)."""
    n = len(values)
    if n <= SLICE_ROWS:
        return pa.chunked_array([pa.array(values, type_, memory_pool=POOL)], type_)
    return pa.chunked_array(
        [pa.array(values[i : i + SLICE_ROWS], type_, memory_pool=POOL) for i in range(0, n, SLICE_ROWS)], type_
    )


def _pane_columns(
    name: str, parts: tuple[list[str | None], list[bytes | None], list[str | None]]
) -> dict[str, pa.ChunkedArray]:
    # The text parts are slices of payloads that are valid UTF-8 (checked when the batch
    # became Arrow) cut at JSON token edges, or msgspec's output: no second check.
    text = _array(parts[1], pa.binary())
    return {
        f"{name}_head": _array(parts[0], pa.string()),
        f"{name}_text": pa.chunked_array([c.view(pa.string()) for c in text.chunks], pa.string()),
        f"{name}_tail": _array(parts[2], pa.string()),
    }


def attempts_table(events: Sequence[tuple[int, AttemptRecorded, datetime]]) -> pa.Table:
    """The decoder's path: (seq, decoded event, parsed ts) rows, panes and extras encoded by msgspec."""
    c = _Columns()
    for seq, e, at in events:
        c.add(seq, e, at, _NO_PANE if e.pane_before is None else ("", _encode(e.pane_before), ""),
              _NO_PANE if e.pane_after is None else ("", _encode(e.pane_after), ""), _encode(e.extras))
    return c.table()


def _decode_batch(table: pa.Table) -> tuple[_Columns, list[int], bool]:
    """The rows this path vouches for as columns, the seqs of the others, and whether an id repeats."""
    seqs: list[int] = table.column("seq").to_pylist()
    subjects_: list[str] = table.column("subject").to_pylist()
    # Each payload is decoded in place from its chunk's Arrow buffer (a memoryview slice): no copy.
    views: list[memoryview | None] = []  # row i: its payload, or None (NULL: oversize or not UTF-8)
    for data in table.column("data").chunks:
        _, offsets_buffer, values = data.buffers()
        offsets: list[int] = memoryview(offsets_buffer).cast("i")[data.offset : data.offset + len(data) + 1].tolist()
        view = memoryview(values) if values is not None else memoryview(b"")
        valid = data.is_valid().to_pylist() if data.null_count else None
        views.extend(view[offsets[j] : offsets[j + 1]] if valid is None or valid[j] else None
                     for j in range(len(data)))
    c = _Columns()
    others: list[int] = []
    decode = _wire.decode
    subject_of = subjects.attempt
    for i, seq in enumerate(seqs):
        payload = views[i]
        if payload is None:
            others.append(seq)
            continue
        try:
            e: Any = decode(payload)
            if type(e) is not _Wire:
                raise _Unusual
            before = _pane_parts(e.pane_before)
            after = _pane_parts(e.pane_after)
            extras = _encode(_extras.decode(e.extras))
            at = parse_ts(e.ts)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, RecursionError, _Unusual):
            others.append(seq)
            continue
        if subjects_[i] != subject_of(e.agent, e.action):
            others.append(seq)
            continue
        c.add(seq, e, at, before, after, extras)
    # The decoder keeps the first of a repeated id; ids compare as UUIDs (any letter case).
    repeats = len({i.lower() for i in c.ids}) != len(c.ids)
    return c, others, repeats


def _insert_sql(src: str, repeats: bool) -> str:
    """INSERT … SELECT from the Arrow table registered as `src`, of its rows with ? < seq < ?,
    skipping ids the view holds or a purge deleted.

    The anti-join is narrowed to [min(id), max(id)] of the batch: event ids are UUIDv7,
    so zone maps skip everything older and the dedupe stays cheap however large the
    table grows. `repeats`: the batch holds an id twice; the first (lowest seq) is kept.
    """
    span = f"BETWEEN (SELECT min(CAST(id AS UUID)) FROM {src}) AND (SELECT max(CAST(id AS UUID)) FROM {src})"
    sql = f"""
INSERT INTO attempts (id, seq, ts, ts_utc, agent, action, outcome, elapsed_s, pane_before, pane_after, extras)
SELECT CAST(b.id AS UUID), seq, ts, ts_utc, agent, action, outcome, elapsed_s,
    before_head || before_text || before_tail, after_head || after_text || after_tail, extras
FROM {src} b
WHERE seq > ? AND seq < ?
  AND CAST(b.id AS UUID) NOT IN (
    SELECT t.id FROM attempts t WHERE t.id {span}
    UNION ALL
    SELECT p.id FROM attempt_purged_ids p WHERE p.id {span}  -- deleted by a purge: a copy stays deleted
  )"""
    return sql + (" QUALIFY row_number() OVER (PARTITION BY CAST(b.id AS UUID) ORDER BY seq) = 1" if repeats else "")


def _another_body_sql(src: str) -> str:
    """The rows of `src` (? < seq < ?) whose id the view holds from another message with a
    different body: (seq, id, the kept row's seq). Asked only when an INSERT skipped rows."""
    span = f"BETWEEN (SELECT min(CAST(id AS UUID)) FROM {src}) AND (SELECT max(CAST(id AS UUID)) FROM {src})"
    return f"""
SELECT b.seq, CAST(t.id AS VARCHAR), t.seq FROM {src} b JOIN attempts t ON t.id = CAST(b.id AS UUID)
WHERE b.seq > ? AND b.seq < ? AND t.id {span} AND t.seq <> b.seq
  AND (t.ts IS DISTINCT FROM b.ts OR t.agent IS DISTINCT FROM b.agent OR t.action IS DISTINCT FROM b.action
       OR t.outcome IS DISTINCT FROM b.outcome OR t.elapsed_s IS DISTINCT FROM b.elapsed_s
       OR t.pane_before IS DISTINCT FROM (b.before_head || b.before_text || b.before_tail)
       OR t.pane_after IS DISTINCT FROM (b.after_head || b.after_text || b.after_tail)
       OR CAST(t.extras AS VARCHAR) IS DISTINCT FROM b.extras)
ORDER BY b.seq"""


_ALL = 1 << 62  # above any stream sequence
# The decoder passes on a repeated id whose payload differs (it drops only exact copies): the
# first by seq is kept and the others compared, as on the bulk path.
_DECODED = _insert_sql("_fleetlog_attempts_decoded", repeats=True)
_BULK = _insert_sql("_fleetlog_attempts", repeats=False)
_BULK_REPEATS = _insert_sql("_fleetlog_attempts", repeats=True)
_DECODED_OTHER_BODY = _another_body_sql("_fleetlog_attempts_decoded")
_BULK_OTHER_BODY = _another_body_sql("_fleetlog_attempts")


def another_body(seq: int, event_id: str, kept_seq: int) -> str:
    """The reject reason of a copy of an id that came with another body (the first body stays)."""
    return (f"duplicate id with a different body: attempt {event_id} is in the view from seq {kept_seq}; "
            f"this message (seq {seq}) changes it, so it is refused and the first body kept")


def _insert_range(con: duckdb.DuckDBPyConnection, insert: str, other_body: str, rows: pa.Table,
                  lo: int, hi: int) -> list[tuple[int, str, int]]:
    """INSERT the rows lo < seq < hi not seen before; when some were skipped (an id the view
    holds, or repeated in the batch), the skipped ones whose body differs from the kept row.
    An identical copy (a spool or retry replay) is a silent duplicate."""
    result = con.execute(insert, [lo, hi]).fetchone()
    inserted = int(result[0]) if result else 0
    seqs = rows.column("seq")
    wanted = rows.num_rows if (lo, hi) == (0, _ALL) else int(
        pc.sum(pc.and_(pc.greater(seqs, lo), pc.less(seqs, hi))).as_py() or 0)
    if inserted == wanted:
        return []
    return [(int(s), str(i), int(k)) for s, i, k in con.execute(other_body, [lo, hi]).fetchall()]


def insert_attempts(con: duckdb.DuckDBPyConnection, rows: pa.Table) -> list[tuple[int, str, int]]:
    """The decoder's path: insert `attempts_table` rows not seen before (of a repeated id, the
    first); the (seq, id, kept seq) of copies that came with another body."""
    con.register("_fleetlog_attempts_decoded", rows)
    try:
        return _insert_range(con, _DECODED, _DECODED_OTHER_BODY, rows, 0, _ALL)
    finally:
        con.unregister("_fleetlog_attempts_decoded")


class Prepared(NamedTuple):
    """A batch decoded into columns (`prepare_attempts`), ready for its INSERT."""

    rows: pa.Table
    others: list[int]  # seqs for the decoder
    repeats: bool  # an id occurs twice among `rows`


def prepare_attempts(batch: RawBatch) -> Prepared:
    """The decode, off the fold thread (`Projection.prepare_raw`): it reads nothing from the view."""
    columns, others, repeats = _decode_batch(batch.table)
    return Prepared(columns.table(), others, repeats)


def fold_attempts_raw(
    projection: Projection, con: duckdb.DuckDBPyConnection, batch: RawBatch, decode: DecodeRows
) -> Sequence[FoldReject] | None:
    prepared = batch.prepared if isinstance(batch.prepared, Prepared) else prepare_attempts(batch)
    rows, others, repeats = prepared
    del prepared
    sql = _BULK_REPEATS if repeats else _BULK
    refused: list[FoldReject] = []
    other_body: list[tuple[int, str, int]] = []
    lo = 0
    con.register("_fleetlog_attempts", rows)
    try:
        # Events the decoder accepted (purges, unusual panes), folded in stream order
        # between the bulk rows.
        for event in decode(others) if others else ():
            if rows.num_rows:
                other_body += _insert_range(con, sql, _BULK_OTHER_BODY, rows, lo, event.seq)
            refused.extend(projection.fold(con, [event]) or ())
            lo = event.seq
        if rows.num_rows:
            other_body += _insert_range(con, sql, _BULK_OTHER_BODY, rows, lo, _ALL)
    finally:
        con.unregister("_fleetlog_attempts")
    if other_body:
        why = {seq: another_body(seq, i, kept) for seq, i, kept in other_body}
        # One at a time: the decoder keeps only the first of a repeated id among what it is given.
        refused.extend((event, why[event.seq]) for seq in sorted(why) for event in decode([seq]))
    return refused
