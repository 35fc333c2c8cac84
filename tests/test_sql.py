"""`fleetlog sql`: read-only ad-hoc SQL over the live views, through the API and the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
from fleetlog.services.backbone.errors import FleetValidationError, QueryError
from fleetlog.services.node.server import Server
from fleetlog.services.query.sql import check_select

from fleetlog import Fleet

from .helpers import cli_json, cli_runner

TABLES = ("attempts", "attempt_purges", "runs", "run_events", "state")


@pytest.mark.parametrize("sql, rule", [
    ("DELETE FROM attempts", "must be a SELECT"),
    ("SELECT 1; DROP TABLE attempts", "exactly one statement"),
    ("SELECT * FROM read_csv('/etc/passwd')", "table function 'read_csv'"),
    ("SELECT * FROM '/etc/passwd'", "unknown table '/etc/passwd'"),
    ("SELECT * FROM main.attempts", "without a schema or catalog"),
    ("SELECT * FROM fleetlog_generations", "unknown table 'fleetlog_generations'"),
    ("SELECT getenv('HOME')", "function 'getenv'"),
    ("SELECT * FROM duckdb_settings()", "table function 'duckdb_settings'"),
    ("SELECT * FROM query('SELECT 1')", "table function 'query'"),
    ("ATTACH 'x.db'", "must be a SELECT"),
    ("SELEC 1", "does not parse"),
])
def test_check_select_refuses_with_the_rule(sql: str, rule: str) -> None:
    with pytest.raises(FleetValidationError) as info:
        check_select(sql, TABLES)
    assert info.value.field == "sql" and rule in info.value.rule


def test_check_select_allows_reads_of_the_views() -> None:
    check_select("WITH a AS (SELECT agent, count(*) AS n FROM attempts GROUP BY 1) "
                 "SELECT a.agent, r.* FROM a, range(3) r JOIN runs ON true WHERE a.n > (SELECT 0)", TABLES)


async def test_sql_over_the_live_views_api_and_cli(fleet: Fleet, server: Server, tmp_path: Path) -> None:
    for i in range(7):
        fleet.attempts.record(agent="sql-a" if i < 4 else "sql-b", action="x", outcome="success", elapsed_s=float(i))
    await fleet.runs.create("sql-run", "runner", status="queued", priority=3)
    token = await fleet.flush()
    answer = await fleet.sql("SELECT agent, count(*) AS n, sum(elapsed_s) AS total FROM attempts "
                             "GROUP BY agent ORDER BY agent", min_seq=token)
    assert answer.columns == ["agent", "n", "total"]
    assert answer.rows == [["sql-a", 4, 6.0], ["sql-b", 3, 15.0]]
    assert not answer.truncated and answer.as_of["FLEET_ATTEMPTS"] >= token["FLEET_ATTEMPTS"]
    runs = await fleet.sql("SELECT run_id, priority, status FROM runs",
                           min_seq={"FLEET_RUNS": fleet.runs._seen})
    assert runs.rows == [["sql-run", 3, "queued"]]
    cut = await fleet.sql("SELECT * FROM range(100)", max_rows=10)
    assert len(cut.rows) == 10 and cut.truncated
    with pytest.raises(FleetValidationError, match=r"unknown table 'secrets\.csv'"):
        await fleet.sql("SELECT * FROM 'secrets.csv'")
    server.query.sql_timeout_s = 0.3
    with pytest.raises(QueryError, match=r"longer than 0\.3s"):  # the time limit interrupts it
        await fleet.sql("SELECT sum(a.range * b.range) FROM range(100000) a, range(100000) b", timeout=60)
    server.query.sql_timeout_s = 10.0
    assert (await fleet.sql("SELECT count(*) FROM attempts")).rows == [[7]]  # the service carries on

    cli = cli_runner(fleet.settings.nats_url, tmp_path)
    out = cli_json(await cli("sql", "SELECT agent, count(*) AS n FROM attempts GROUP BY 1 ORDER BY 1", "--json"))
    assert out["columns"] == ["agent", "n"] and out["rows"] == [["sql-a", 4], ["sql-b", 3]]
    assert set(out) == {"columns", "rows", "truncated", "truncated_by", "as_of", "lag", "lag_s"}
    text = await cli("sql", "SELECT agent FROM attempts ORDER BY agent LIMIT 1")
    assert text.returncode == 0 and "sql-a" in text.stdout and "1 rows" in text.stdout
    refused = await cli("sql", "DELETE FROM attempts")
    assert refused.returncode == 2 and "must be a SELECT" in refused.stderr  # Exit.USAGE


async def test_sql_answers_fit_the_connections_max_payload(fleet: Fleet, server: Server, tmp_path: Path) -> None:
    """Rows are cut from the end to fit a reply (`truncated_by: max_payload`); a single value
    too big for any reply is a clear error naming the limit, never a MaxPayloadError."""
    limit = (await fleet.nats()).max_payload
    cut = await fleet.sql("SELECT i, repeat('x', 300000) AS blob FROM range(10) t(i) ORDER BY i")
    assert cut.truncated and cut.truncated_by == "max_payload"
    assert [r[0] for r in cut.rows] == [0, 1, 2]  # the first rows, in order: 3 x 300 kB fit in 1 MB
    whole = await fleet.sql("SELECT * FROM range(20)", max_rows=5)
    assert whole.truncated and whole.truncated_by == "max_rows"
    with pytest.raises(QueryError, match=rf"column 'big' is 2000002 bytes.*max_payload of {limit} bytes") as info:
        await fleet.sql("SELECT 1 AS small, repeat('y', 2000000) AS big")
    assert info.value.code == "413"
    assert (await fleet.sql("SELECT 42")).rows == [[42]]  # the service carries on

    cli = cli_runner(fleet.settings.nats_url, tmp_path)
    too_big = await cli("sql", "SELECT repeat('y', 2000000) AS big")
    assert too_big.returncode == 2 and "max_payload" in too_big.stderr  # Exit.USAGE: change the statement
    text = await cli("sql", "SELECT i, repeat('x', 300000) AS blob FROM range(10) t(i)")
    assert text.returncode == 0 and "truncated to fit a reply" in text.stdout
