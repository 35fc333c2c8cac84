"""`sql` refusals, table-driven: every kind of write, every way out to files, settings or
extensions, more than one statement; and the row and time limits stop a query (never hang)."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest
from fleetlog.services.backbone.errors import FleetValidationError
from fleetlog.services.query.sql import check_select, run_select

TABLES = ("attempts", "runs", "run_events", "state")

WRITES = [
    ("INSERT INTO attempts VALUES (1)", "must be a SELECT, got INSERT"),
    ("UPDATE attempts SET agent = 'x'", "must be a SELECT, got UPDATE"),
    ("DELETE FROM attempts", "must be a SELECT, got DELETE"),
    ("TRUNCATE attempts", "must be a SELECT, got DELETE"),
    ("MERGE INTO attempts USING runs ON true WHEN MATCHED THEN DELETE", "must be a SELECT, got MERGE_INTO"),
    ("CREATE TABLE t AS SELECT 1", "must be a SELECT, got CREATE"),
    ("CREATE VIEW v AS SELECT 1", "must be a SELECT, got CREATE"),
    ("CREATE MACRO m(a) AS a", "must be a SELECT, got CREATE"),
    ("CREATE SEQUENCE s", "must be a SELECT, got CREATE"),
    ("DROP TABLE attempts", "must be a SELECT, got DROP"),
    ("ALTER TABLE attempts ADD COLUMN x INT", "must be a SELECT, got ALTER"),
    ("CHECKPOINT", "must be a SELECT, got CALL"),
    ("VACUUM", "must be a SELECT, got VACUUM"),
    ("BEGIN", "must be a SELECT, got TRANSACTION"),
    ("PREPARE p AS SELECT 1", "must be a SELECT, got PREPARE"),
    ("EXECUTE p", "must be a SELECT, got EXECUTE"),
]
ESCAPES = [
    ("ATTACH 'x.db' AS x", "must be a SELECT, got ATTACH"),
    ("DETACH x", "must be a SELECT, got DETACH"),
    ("COPY attempts TO '/tmp/x.csv'", "must be a SELECT, got COPY"),
    ("COPY attempts FROM '/tmp/x.csv'", "must be a SELECT, got COPY"),
    ("EXPORT DATABASE '/tmp/x'", "must be a SELECT, got EXPORT"),
    ("IMPORT DATABASE '/tmp/x'", "must be a SELECT, got PRAGMA"),
    ("INSTALL httpfs", "must be a SELECT, got LOAD"),
    ("LOAD httpfs", "must be a SELECT, got LOAD"),
    ("SET memory_limit = '1GB'", "must be a SELECT, got SET"),
    ("RESET memory_limit", "must be a SELECT, got SET"),
    ("SET VARIABLE x = 1", "must be a SELECT, got SET"),
    ("PRAGMA database_list", "must be a SELECT, got PRAGMA"),
    ("CALL pragma_version()", "must be a SELECT, got CALL"),
    ("USE main", "must be a SELECT, got SET"),
    ("EXPLAIN ANALYZE SELECT 1", "must be a SELECT, got EXPLAIN"),
]
FILES = [
    (f"SELECT * FROM {fn}('/etc/passwd')", f"table function '{fn}'")
    for fn in ("read_csv", "read_csv_auto", "read_parquet", "parquet_scan", "parquet_metadata", "parquet_schema",
               "read_json", "read_json_auto", "read_ndjson", "read_text", "read_blob", "glob", "sniff_csv",
               "read_xlsx", "delta_scan", "iceberg_scan", "json_execute_serialized_sql")
] + [
    ("SELECT * FROM read_csv(['/etc/passwd'])", "table function 'read_csv'"),
    ("FROM read_csv('/etc/passwd')", "table function 'read_csv'"),
    ("SELECT * FROM sqlite_scan('x.db', 't')", "table function 'sqlite_scan'"),
    ("SELECT * FROM postgres_scan('', 'public', 't')", "table function 'postgres_scan'"),
    ("SELECT * FROM '/etc/passwd'", "unknown table '/etc/passwd'"),
    ('SELECT * FROM "/etc/passwd"', "unknown table '/etc/passwd'"),
    ("SELECT * FROM 'https://example.com/x.csv'", "unknown table 'https://example.com/x.csv'"),
    ("SELECT * FROM 's3://bucket/x.parquet'", "unknown table 's3://bucket/x.parquet'"),
    ("SELECT read_text('/etc/passwd')", "function 'read_text'"),
    ("SELECT read_blob('/etc/passwd')", "function 'read_blob'"),
    # hidden inside a subquery, a CTE, a lateral join, a union, a lambda: the whole tree is checked
    ("SELECT (SELECT count(*) FROM read_csv('/etc/passwd'))", "table function 'read_csv'"),
    ("WITH x AS (SELECT * FROM read_csv('/etc/passwd')) SELECT * FROM x", "table function 'read_csv'"),
    ("SELECT * FROM range(3), LATERAL (SELECT * FROM read_text('/etc/passwd'))", "table function 'read_text'"),
    ("SELECT 1 UNION SELECT * FROM read_csv('/etc/passwd')", "table function 'read_csv'"),
    ("SELECT * FROM read_csv('/etc/passwd') AS attempts", "table function 'read_csv'"),
    ("SELECT * FROM attempts WHERE agent IN (SELECT file FROM glob('*'))", "table function 'glob'"),
    ("SELECT list_transform([1], x -> getenv('HOME'))", "function 'getenv'"),
    ("SELECT * FROM unnest((SELECT list(content) FROM read_text('/etc/passwd')))", "table function 'read_text'"),
]
STATE = [
    ("SELECT getenv('HOME')", "function 'getenv'"),
    ("SELECT current_setting('threads')", "function 'current_setting'"),
    ("SELECT getvariable('x')", "function 'getvariable'"),
    ("SELECT nextval('s')", "function 'nextval'"),
    ("SELECT setseed(0.5)", "function 'setseed'"),
    ("SELECT write_log('x')", "function 'write_log'"),
    ("SELECT * FROM query('SELECT 1')", "table function 'query'"),
    ("SELECT * FROM query_table('attempts')", "table function 'query_table'"),
    ("SELECT * FROM duckdb_settings()", "table function 'duckdb_settings'"),
    ("SELECT * FROM duckdb_secrets()", "table function 'duckdb_secrets'"),
    ("SELECT * FROM duckdb_extensions()", "table function 'duckdb_extensions'"),
    ("SELECT * FROM duckdb_tables()", "table function 'duckdb_tables'"),
    ("SELECT * FROM pragma_database_list()", "table function 'pragma_database_list'"),
    ("SELECT * FROM information_schema.tables", "without a schema or catalog"),
    ("SELECT * FROM main.attempts", "without a schema or catalog"),
    ("SELECT * FROM memory.main.attempts", "without a schema or catalog"),
    ("SELECT * FROM fleetlog_generations", "unknown table 'fleetlog_generations'"),
    ("SELECT * FROM sqlite_master", "unknown table 'sqlite_master'"),
    ("SHOW TABLES", "SHOW 'tables'"),
    ("SHOW ALL TABLES", "SHOW '__show_tables_expanded'"),
    ("SHOW DATABASES", "SHOW 'databases'"),
    ("SHOW fleetlog_generations", "SHOW 'fleetlog_generations'"),
]
STATEMENTS = [
    ("SELECT 1; SELECT 2", "exactly one statement, got 2"),
    ("SELECT 1; DROP TABLE attempts", "exactly one statement, got 2"),
    ("FROM attempts; FROM runs; FROM state", "exactly one statement, got 3"),
    ("", "exactly one statement, got 0"),
    ("SELEC 1", "does not parse"),
]
REFUSED = WRITES + ESCAPES + FILES + STATE + STATEMENTS


@pytest.mark.parametrize("sql, rule", REFUSED, ids=[s for s, _ in REFUSED])
def test_sql_refuses_with_the_rule(sql: str, rule: str) -> None:
    with pytest.raises(FleetValidationError) as info:
        check_select(sql, TABLES)
    assert info.value.field == "sql"
    assert rule in info.value.rule, info.value.rule


ALLOWED = [
    "SELECT agent, count(*) FROM attempts GROUP BY 1",
    "FROM attempts",
    "TABLE runs",
    "DESCRIBE attempts",
    "SUMMARIZE runs",
    "SHOW attempts",
    "SELECT * FROM range(10) USING SAMPLE 5",
    "SELECT * FROM unnest([1, 2])",
    "SELECT * FROM attempts PIVOT (count(*) FOR agent IN ('a'))",
]


@pytest.mark.parametrize("sql", ALLOWED)
def test_sql_allows_reads_of_the_views(sql: str) -> None:
    check_select(sql, TABLES)


def test_queries_past_the_row_and_time_limits_are_stopped(tmp_path: Path) -> None:
    """The limits on a real DuckDB file: rows are cut (`truncated`), a query past the time limit
    is interrupted (TimeoutError naming the limit), and the cursor answers again afterwards."""
    con = duckdb.connect(str(tmp_path / "views.duckdb"))
    try:
        con.execute("CREATE TABLE attempts AS SELECT range AS i FROM range(1000)")
        cur = con.cursor()
        columns, rows, truncated = run_select(cur, "SELECT i FROM attempts ORDER BY i", max_rows=10, timeout_s=30)
        assert columns == ["i"] and rows == [[i] for i in range(10)] and truncated
        heavy = "SELECT sum(a.range * b.range) FROM range(1000000) a, range(1000000) b"
        check_select(heavy, TABLES)  # a legal statement: only the time limit stands in its way
        with pytest.raises(TimeoutError, match=r"longer than 0\.2s and was stopped"):
            run_select(cur, heavy, max_rows=10, timeout_s=0.2)
        assert run_select(cur, "SELECT count(*) FROM attempts", max_rows=10, timeout_s=30) == (
            ["count_star()"], [[1000]], False)
    finally:
        con.close()
