"""`fleetlog sql`: read-only ad-hoc SQL over the live views (DESIGN §5).

A request is one SELECT, checked before it runs with DuckDB's own parser
(`extract_statements` for the statement kind, `json_serialize_sql` for the tree):

* it may read only the live views' tables (and its own CTEs), unqualified: no other
  schema, no other catalog, no file a name could point at (`FROM 'x.csv'`);
* table functions only from `TABLE_FUNCTIONS` (no `read_csv`, `query`, `duckdb_settings`);
* none of the scalar functions in `DENIED_FUNCTIONS` (environment, settings, files).

It runs on its own cursor whose search path is the live generations' schemas, with a row
limit (`truncated` says when it cut) and a time limit (the cursor is interrupted). The
views file stays opened read-write by the projector: DuckDB's `enable_external_access`
is process-wide and would also stop the fold, so the checks above stand in for it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import Any

import duckdb
import msgspec
from fleetlog.services.backbone.errors import FleetValidationError

__all__ = ["DENIED_FUNCTIONS", "TABLE_FUNCTIONS", "check_select", "run_select"]

TABLE_FUNCTIONS = frozenset({"range", "generate_series", "unnest"})
# Scalars that read the environment, settings or files, or change the cursor's session state
# (sequences, the random seed, the log): a SELECT must leave nothing behind.
DENIED_FUNCTIONS = frozenset({
    "getenv", "current_setting", "getvariable", "read_text", "read_blob", "glob", "query", "query_table",
    "nextval", "currval", "setval", "setseed", "write_log",
})


class SqlRefused(FleetValidationError):
    """The statement is not one read-only SELECT over the views."""

    def __init__(self, rule: str) -> None:
        super().__init__("sql", rule)


def check_select(sql: str, tables: Iterable[str]) -> None:
    """Raise SqlRefused (naming the rule) unless `sql` is one SELECT reading only `tables`."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise SqlRefused(f"does not parse: {exc}") from None
    if len(statements) != 1:
        raise SqlRefused(f"must be exactly one statement, got {len(statements)}")
    if statements[0].type != duckdb.StatementType.SELECT:
        raise SqlRefused(f"must be a SELECT, got {statements[0].type.name}")
    con = duckdb.connect()
    try:
        row = con.execute("SELECT json_serialize_sql(?::VARCHAR)", [sql]).fetchone()
    finally:
        con.close()
    tree = msgspec.json.decode(row[0]) if row else {}
    if tree.get("error"):
        raise SqlRefused(f"cannot be checked: {tree.get('error_message', '')}")
    allowed = {t.lower() for t in tables}
    ctes = {str(name).lower() for name in _cte_names(tree)}
    for node in _nodes(tree):
        kind = node.get("type")
        if kind == "BASE_TABLE":
            name = str(node.get("table_name", ""))
            if node.get("catalog_name") or node.get("schema_name"):
                raise SqlRefused(f"table {name!r}: name the view's tables without a schema or catalog")
            if name.lower() not in allowed | ctes:
                raise SqlRefused(f"unknown table {name!r}; the views are: {', '.join(sorted(allowed))}")
        elif kind == "SHOW_REF":
            name = str(node.get("table_name", ""))
            if node.get("show_type") == "SHOW_SPECIAL" or (name and name.lower() not in allowed | ctes):
                raise SqlRefused(f"SHOW {name.strip(chr(34))!r}: only the views' tables or a query may be shown")
        elif kind == "TABLE_FUNCTION":
            fn = str((node.get("function") or {}).get("function_name", "")).lower()
            if fn not in TABLE_FUNCTIONS:
                raise SqlRefused(f"table function {fn!r} is not allowed (only {', '.join(sorted(TABLE_FUNCTIONS))})")
        elif kind == "FUNCTION":
            fn = str(node.get("function_name", "")).lower()
            if fn in DENIED_FUNCTIONS:
                raise SqlRefused(f"function {fn!r} is not allowed")


def run_select(
    cur: duckdb.DuckDBPyConnection, sql: str, max_rows: int, timeout_s: float
) -> tuple[list[str], list[list[Any]], bool]:
    """Run a checked SELECT: (columns, at most max_rows rows, truncated). Interrupted after
    timeout_s (raises TimeoutError)."""
    timer = threading.Timer(timeout_s, cur.interrupt)
    timer.start()
    try:
        cur.execute(sql)
        columns = [d[0] for d in cur.description or []]
        rows = cur.fetchmany(max_rows + 1)
    except duckdb.InterruptException:
        raise TimeoutError(f"the query ran longer than {timeout_s}s and was stopped") from None
    finally:
        timer.cancel()
    truncated = len(rows) > max_rows
    return columns, [list(r) for r in rows[:max_rows]], truncated


def _nodes(tree: Any) -> Iterator[dict[str, Any]]:
    if isinstance(tree, dict):
        yield tree
        for value in tree.values():
            yield from _nodes(value)
    elif isinstance(tree, list):
        for item in tree:
            yield from _nodes(item)


def _cte_names(tree: Any) -> Iterator[Any]:
    for node in _nodes(tree):
        cte_map = node.get("cte_map")
        if isinstance(cte_map, dict):
            for entry in cte_map.get("map", []) or []:
                if isinstance(entry, dict) and "key" in entry:
                    yield entry["key"]
