"""`execute_prepared`: the same answers as `execute`, values as literals that cannot escape."""

from __future__ import annotations

import duckdb
from fleetlog.projections import execute_prepared


def test_execute_prepared_matches_execute_and_quotes_safely() -> None:
    con = duckdb.connect()
    con.execute("CREATE TABLE t (name VARCHAR, x DOUBLE, n BIGINT)")
    con.execute("INSERT INTO t VALUES ('O''Brien', 1.5, 1), ('x''); DROP TABLE t; --', 2.5, 2), (NULL, NULL, 3)")
    sql = "SELECT n FROM t WHERE (name = ? OR ? IS NULL) AND (x <= ? OR x IS NULL) ORDER BY n LIMIT ?"
    cases = [
        ["O'Brien", "O'Brien", 10.0, 5],
        ["x'); DROP TABLE t; --", "x", 3.0, 5],
        [None, None, 2.0, 5],
        [None, None, float("nan"), 5],  # no literal form: a plain execute
        ["\x00", "\x00", 1.0, 5],
    ]
    for params in cases * 2:  # the second round runs the statement prepared in the first
        assert execute_prepared(con, sql, params).fetchall() == con.execute(sql, params).fetchall()
    assert con.execute("SELECT count(*) FROM t").fetchone() == (3,)  # nothing was dropped
    prepared = con.execute("SELECT count(*) FROM duckdb_prepared_statements()").fetchone()
    assert prepared is not None and prepared[0] == 1  # one statement, prepared once
