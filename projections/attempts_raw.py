"""The attempt log's bulk fold: raw payloads decoded by DuckDB, no Python object per event.

`AttemptsProjection.fold_raw` runs this. One statement parses the whole batch
(`json_transform_strict`: one JSON parse per payload, duplicate keys refused) into a
temp stage, with a flag per row saying whether SQL alone can vouch for it. A row is
vouched for only when every rule of the typed decoder holds in a form SQL checks
exactly:

* type `attempt.recorded`; all eleven fields present (the SDK always writes them);
* `id` a UUID (the decoder's pattern), `v` an integer;
* `ts` `YYYY-MM-DDTHH:MM:SS[.ffffff][Z|±HH:MM]`, a real date (parsed by DuckDB to the
  same instant `parse_ts` gives; no offset = UTC);
* `agent` and `action` of 1–256 characters that subject escaping leaves as they are,
  and the message subject equal to `fleet.attempt.<agent>.<action>`;
* `outcome` a string of 1–1024 characters without escapes, `elapsed_s` a plain
  non-negative number;
* panes null, or the client's `{"format","text"[,"truncated"]}` string form (so no
  number in them can overflow a float), `extras` an object without huge numbers.

Everything else — another type (purges), a reject, an unusual but valid shape — goes
to the runtime's decoder (`decode`), so the decoder stays the only judge of validity
and writes the rejects with their reasons. The events it accepts are folded by
`fold`, in stream order between the bulk rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._base import DecodeRows, FoldReject, Projection, RawBatch

if TYPE_CHECKING:
    import duckdb

__all__ = ["fold_attempts_raw"]

_SHAPE = (
    '{"type":"JSON","id":"JSON","ts":"JSON","v":"JSON","agent":"JSON","action":"JSON","outcome":"JSON",'
    '"elapsed_s":"JSON","pane_before":"JSON","pane_after":"JSON","extras":"JSON"}'
)
# The JSON texts (quotes included) of values SQL can vouch for. Unbounded repeats with
# separate length checks: counted repeats ({1,256}) make RE2 automata large and slow.
_ID = r'"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"'
_TS = (
    r'"(19|2[0-9])[0-9][0-9]-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]'
    r'(\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])?"'
)
# Printable ASCII except `"`, `\` (JSON escapes) and `.`, `*`, `>`, `%` (escaped in subjects).
_IDENT = r'"[\x21\x23\x24\x26-\x29\x2B-\x2D\x2F-\x3D\x3F-\x5B\x5D-\x7E]+"'
_PLAIN_TEXT = r'"[^"\\]+"'
_INT = r"-?[0-9]+"
_NON_NEGATIVE = r"(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9][0-9]?)?"
# Text that may hold a number a double cannot: a three-digit exponent or a run of 20 digits
# (a mantissa must be 309 digits long to overflow; 20 keeps the automaton small, and a
# false alarm only sends the row to the decoder).
_HUGE_NUMBER = r"[eE][+-]?[0-9][0-9][0-9]|[0-9]{20}"


def _client_pane(col: str) -> str:
    """SQL: the pane JSON text `col` is null or exactly `{"format":"F","text":"T"[,"truncated":B]}`.

    `col` is minified JSON of one valid object (no whitespace outside strings). A
    string ends at an unescaped quote, which a comma or the object's end must follow,
    so when the first `",` in the text opens `","text":"`, F is the whole format
    string; when the only other `",` (if any) opens the `truncated` suffix, T is the
    whole text string. Then the pane holds two strings (and a boolean): no number.
    Plain substring searches only: one pass over the pane each, no character counting.
    """
    quote_commas = f"(strlen({col}) - strlen(replace({col}, '\",', ''))) // 2"
    return (
        f"({col} IS NULL OR (starts_with({col}, '{{\"format\":\"')"
        f" AND instr({col}, '\",') = instr({col}, '\",\"text\":\"') AND instr({col}, '\",') > 0"
        f" AND CASE WHEN suffix({col}, '\"}}') THEN {quote_commas} = 1"
        f"          WHEN suffix({col}, '\",\"truncated\":true}}') OR suffix({col}, '\",\"truncated\":false}}')"
        f"          THEN {quote_commas} = 2 ELSE false END))"
    )


_STAGE = f"""
CREATE OR REPLACE TEMP TABLE _fleetlog_attempts_stage AS
WITH parsed AS (
    SELECT seq, subject, unnest(try(json_transform_strict(data, '{_SHAPE}'))) FROM _fleetlog_raw
), checked AS (
    SELECT seq, subject, ts, agent, action, outcome, elapsed_s, pane_before, pane_after, extras, coalesce(
        type = '"attempt.recorded"'
        AND regexp_full_match(id, '{_ID}')
        AND regexp_full_match(ts, '{_TS}') AND strlen(ts) <= 34
        AND regexp_full_match(v, '{_INT}') AND strlen(v) <= 18
        AND regexp_full_match(agent, '{_IDENT}') AND strlen(agent) <= 258
        AND regexp_full_match(action, '{_IDENT}') AND strlen(action) <= 258
        AND subject = 'fleet.attempt.' || substr(agent, 2, strlen(agent) - 2)
                      || '.' || substr(action, 2, strlen(action) - 2)
        AND regexp_full_match(outcome, '{_PLAIN_TEXT}') AND strlen(outcome) <= 1026
        AND regexp_full_match(elapsed_s, '{_NON_NEGATIVE}') AND strlen(elapsed_s) <= 40
        AND {_client_pane("pane_before")}
        AND {_client_pane("pane_after")}
        AND starts_with(extras, '{{') AND NOT regexp_matches(extras, '{_HUGE_NUMBER}'), false) AS shape_ok,
        CASE WHEN shape_ok THEN CAST(substr(id, 2, 36) AS UUID) END AS uuid,
        CASE WHEN shape_ok THEN CAST(elapsed_s AS DOUBLE) END AS elapsed
    FROM parsed
)
SELECT seq, uuid AS id, substr(ts, 2, strlen(ts) - 2) AS ts, ts_utc,
    substr(agent, 2, strlen(agent) - 2) AS agent, substr(action, 2, strlen(action) - 2) AS action,
    substr(outcome, 2, length(outcome) - 2) AS outcome, elapsed AS elapsed_s, pane_before, pane_after, extras,
    coalesce(ts_utc IS NOT NULL, false) AS ok
FROM (
    SELECT *,
        CASE WHEN shape_ok THEN try_cast(CASE WHEN suffix(ts, 'Z"') OR substr(ts, strlen(ts) - 6, 1) IN ('+', '-')
                                              THEN substr(ts, 2, strlen(ts) - 2)
                                              ELSE substr(ts, 2, strlen(ts) - 2) || '+00:00' END AS TIMESTAMPTZ)
        END AS ts_utc
    FROM checked
)
"""

_VERDICT = """
SELECT coalesce(list(seq ORDER BY seq) FILTER (WHERE NOT ok), []),
       count(*) FILTER (WHERE ok) - count(DISTINCT id) FILTER (WHERE ok)
FROM _fleetlog_attempts_stage
"""

_INSERT = """
INSERT INTO attempts (id, seq, ts, ts_utc, agent, action, outcome, elapsed_s, pane_before, pane_after, extras)
SELECT id, seq, ts, ts_utc, agent, action, outcome, elapsed_s, pane_before, pane_after, extras
FROM _fleetlog_attempts_stage s
WHERE ok AND seq > ? AND seq < ?
  AND s.id NOT IN (
    SELECT t.id FROM attempts t
    WHERE t.id BETWEEN (SELECT min(id) FROM _fleetlog_attempts_stage WHERE ok)
                   AND (SELECT max(id) FROM _fleetlog_attempts_stage WHERE ok)
    UNION ALL
    SELECT p.id FROM attempt_purged_ids p  -- deleted by a purge: a copy stays deleted
    WHERE p.id BETWEEN (SELECT min(id) FROM _fleetlog_attempts_stage WHERE ok)
                   AND (SELECT max(id) FROM _fleetlog_attempts_stage WHERE ok)
  )
"""
_FIRST_PER_ID = " QUALIFY row_number() OVER (PARTITION BY id ORDER BY seq) = 1"


def fold_attempts_raw(
    projection: Projection, con: duckdb.DuckDBPyConnection, batch: RawBatch, decode: DecodeRows
) -> Sequence[FoldReject] | None:
    con.register("_fleetlog_raw", batch.table)
    try:
        con.execute(_STAGE)
    finally:
        con.unregister("_fleetlog_raw")
    try:
        row = con.execute(_VERDICT).fetchone()
        assert row is not None
        others: list[int] = row[0]
        insert = _INSERT + (_FIRST_PER_ID if row[1] else "")
        refused: list[FoldReject] = []
        lo = 0
        # Events SQL did not vouch for, folded in stream order between the bulk rows.
        for event in decode(others) if others else []:
            con.execute(insert, [lo, event.seq])
            refused.extend(projection.fold(con, [event]) or ())
            lo = event.seq
        con.execute(insert, [lo, 1 << 62])
        return refused
    finally:
        con.execute("DROP TABLE IF EXISTS _fleetlog_attempts_stage")
