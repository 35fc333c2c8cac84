"""The attempts view's INSERTs from Arrow: rows not seen before, and the copies that changed a body.

Both fold paths end here: the decoder's (`insert_attempts`, over `attempts_table` rows) and
the bulk path (attempts_raw, over `prepare_attempts` rows, one range of seqs between the
events the decoder folds). One INSERT … SELECT per range; never a row at a time.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["BULK", "BULK_REPEATS", "END", "OTHER_BODY", "another_body", "insert_attempts", "insert_range"]


def _insert_sql(src: str, repeats: bool) -> str:
    """INSERT … SELECT from the Arrow table `src` (a replacement scan: `_ROWS`), of its rows with ? < seq < ?,
    skipping ids the view holds or a purge deleted.

    The anti-join is narrowed to [min(id), max(id)] of the batch: event ids are UUIDv7,
    so zone maps skip everything older and the dedupe stays cheap however large the
    table grows. `repeats`: the batch holds an id twice; the first (lowest seq) is kept.
    """
    span = f"BETWEEN (SELECT min(CAST(id AS UUID)) FROM {src}) AND (SELECT max(CAST(id AS UUID)) FROM {src})"
    sql = f"""
INSERT INTO attempts (id, seq, ts, ts_utc, agent, action, outcome, elapsed_s, pane_before, pane_after, extras)
SELECT CAST(b.id AS UUID), seq, ts, ts_utc, agent, action, outcome, elapsed_s,
    pane_before, pane_after, extras
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
       OR t.pane_before IS DISTINCT FROM b.pane_before
       OR t.pane_after IS DISTINCT FROM b.pane_after
       OR CAST(t.extras AS VARCHAR) IS DISTINCT FROM b.extras)
ORDER BY b.seq"""


END = 1 << 62  # above any stream sequence
# The rows are found by DuckDB's replacement scan: a local variable of this name in the frame
# that runs the statement (`insert_range`). Not `con.register`: a registered table is a view in
# the transaction's catalog, kept (with its Arrow buffers) until the transaction ends, and a
# catch-up transaction holds dozens of batches (measured: 1M replay with 2 KB panes, `serve` peak
# RSS 475 MB registered, ~370 MB scanned).
_ROWS = "_fleetlog_rows"
# The decoder passes on a repeated id whose payload differs (it drops only exact copies): the
# first by seq is kept and the others compared, as on the bulk path.
_DECODED = _insert_sql(_ROWS, repeats=True)
BULK = _insert_sql(_ROWS, repeats=False)
BULK_REPEATS = _insert_sql(_ROWS, repeats=True)
OTHER_BODY = _another_body_sql(_ROWS)


def another_body(seq: int, event_id: str, kept_seq: int) -> str:
    """The reject reason of a copy of an id that came with another body (the first body stays)."""
    return (f"duplicate id with a different body: attempt {event_id} is in the view from seq {kept_seq}; "
            f"this message (seq {seq}) changes it, so it is refused and the first body kept")


def insert_range(con: duckdb.DuckDBPyConnection, insert: str, other_body: str, rows: pa.Table,
                  lo: int, hi: int) -> list[tuple[int, str, int]]:
    """INSERT the rows lo < seq < hi not seen before; when some were skipped (an id the view
    holds, or repeated in the batch), the skipped ones whose body differs from the kept row.
    An identical copy (a spool or retry replay) is a silent duplicate."""
    _fleetlog_rows = rows  # read by the statements, by name (see _ROWS)
    result = con.execute(insert, [lo, hi]).fetchone()
    inserted = int(result[0]) if result else 0
    seqs = rows.column("seq")
    wanted = rows.num_rows if (lo, hi) == (0, END) else int(
        pc.sum(pc.and_(pc.greater(seqs, lo), pc.less(seqs, hi))).as_py() or 0)
    if inserted == wanted:
        return []
    return [(int(s), str(i), int(k)) for s, i, k in con.execute(other_body, [lo, hi]).fetchall()]


def insert_attempts(con: duckdb.DuckDBPyConnection, rows: pa.Table) -> list[tuple[int, str, int]]:
    """The decoder's path: insert `attempts_table` rows not seen before (of a repeated id, the
    first); the (seq, id, kept seq) of copies that came with another body."""
    return insert_range(con, _DECODED, OTHER_BODY, rows, 0, END)
