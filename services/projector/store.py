"""The DuckDB file that holds every view, with its bookkeeping.

Each projection lives in generations: a DuckDB schema `<name>_g<n>` holding its
tables and its `_rejects`. One generation is `live` (queries read it); a
rebuild or a version bump builds the next one beside it (`building`) and
promotes it atomically once it has caught up. Checkpoints (last folded stream
sequence per generation and stream) sit in `fleetlog_checkpoints` and are
written in the same transaction as the fold they describe.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
from fleetlog.projections import Projection

__all__ = ["CATALOG", "ROW_GROUP_ROWS", "Generation", "ViewStore"]

CATALOG = "fleetlog"
# Rows per row group. DuckDB's default (122,880) made every checkpoint during a replay
# rewrite (and recompress) the row group being filled, up to 300 MB of 2 KB-pane rows:
# 53 µs of CPU per event for insert + commit against 17 µs with 16,384-row groups
# (measured, 200k attempts with 2 KB panes, commit per 5,000); without panes both ~4 µs.
ROW_GROUP_ROWS = 16_384

META_DDL = (
    """CREATE TABLE IF NOT EXISTS fleetlog_generations (
        name VARCHAR NOT NULL,
        generation INTEGER NOT NULL,
        version INTEGER NOT NULL,
        schema_name VARCHAR NOT NULL,
        state VARCHAR NOT NULL,            -- live | building | retired
        created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        promoted_at TIMESTAMPTZ,
        compare_report JSON
    )""",
    """CREATE TABLE IF NOT EXISTS fleetlog_checkpoints (
        schema_name VARCHAR NOT NULL,
        stream VARCHAR NOT NULL,
        seq BIGINT NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
    )""",
)

REJECTS_DDL = """CREATE TABLE IF NOT EXISTS _rejects (
    stream VARCHAR NOT NULL,
    seq BIGINT NOT NULL,
    subject VARCHAR NOT NULL,
    reason VARCHAR NOT NULL,
    data BLOB NOT NULL,
    rejected_at TIMESTAMPTZ NOT NULL DEFAULT now()
)"""


@dataclass
class Generation:
    name: str
    generation: int
    version: int
    schema: str
    state: str


class ViewStore:
    """Owns the DuckDB connection. DuckDB allows one writing process per file, so the
    projector and the query service share this one object in one process."""

    def __init__(
        self,
        path: Path | str,
        memory_limit: str = "128MB",
        checkpoint_threshold: str = "64MB",
        row_group_size: int = ROW_GROUP_ROWS,
    ) -> None:
        """`memory_limit` bounds DuckDB's buffers (it spills beyond); it also sets how much
        DuckDB keeps cached, so it shows in RSS (issue 19, 1M replay of 2 KB panes through
        `fleetlog serve`: peak 423 MB at 192 MB, 402 at 128 MB; queries over the 1M view
        within their targets at 128 MB). `row_group_size`: see ROW_GROUP_ROWS.
        `checkpoint_threshold` is the WAL size that triggers an automatic checkpoint, run by
        the commit that crosses it (which waits for it): at 16 MB a live fold of 5,000 2 KB
        events/s checkpointed every ~1.3 s and publish -> queryable p99 was 636-731 ms; at
        64 MB, 173-247 ms (same load; peak RSS of the 1M replay unchanged, 475 / 479 MB).
        Committed rows not yet checkpointed stay in memory, and the projector checkpoints
        when idle (`checkpoint`)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The file is attached (not opened directly) because the row group size is an
        # ATTACH option; every cursor names the catalog (`cursor()`), so nothing depends
        # on the connection's default database.
        self.con = duckdb.connect()
        self.con.execute(f"SET memory_limit = '{memory_limit}'")
        self.con.execute(f"SET checkpoint_threshold = '{checkpoint_threshold}'")
        quoted = str(self.path).replace("'", "''")
        self.con.execute(f"SET temp_directory = '{quoted}.tmp'")  # spill beside the file, as when opened directly
        self.con.execute(f"ATTACH '{quoted}' AS {CATALOG} (ROW_GROUP_SIZE {int(row_group_size)})")
        self.con.execute(f"USE {CATALOG}")
        row = self.con.execute("SELECT current_database()").fetchone()
        assert row is not None
        self.catalog: str = row[0]
        self._lock = threading.Lock()
        # Schemas of generations dropped by this process, and how many: reader threads close
        # the cursors they keep on them (services/query/cursors.py).
        self.dropped: set[str] = set()
        self.drops = 0
        for stmt in META_DDL:
            self.con.execute(stmt)

    # -- generations ---------------------------------------------------------
    def generations(self, name: str) -> list[Generation]:
        with self._lock:
            rows = self.con.execute(
                """SELECT name, generation, version, schema_name, state FROM fleetlog_generations
                   WHERE name = ? AND state <> 'retired' ORDER BY generation""",
                [name],
            ).fetchall()
        return [Generation(*r) for r in rows]

    def create_generation(self, projection: Projection, state: str) -> Generation:
        """A fresh schema with the projection's tables, checkpoints at 0."""
        with self._lock:
            row = self.con.execute(
                "SELECT coalesce(max(generation), 0) FROM fleetlog_generations WHERE name = ?", [projection.name]
            ).fetchone()
            number = (row[0] if row else 0) + 1
            schema = f"{projection.name}_g{number}"
            cur = self.con.cursor()
            cur.execute(f'USE "{self.catalog}"')
            try:
                cur.execute("BEGIN")
                cur.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
                cur.execute(f'CREATE SCHEMA "{schema}"')
                cur.execute(f'USE "{self.catalog}"."{schema}"')
                for stmt in projection.ddl():
                    cur.execute(stmt)
                cur.execute(REJECTS_DDL)
                cur.execute(
                    "INSERT INTO main.fleetlog_generations (name, generation, version, schema_name, state)"
                    " VALUES (?, ?, ?, ?, ?)",
                    [projection.name, number, projection.version, schema, state],
                )
                for stream in projection.streams:
                    cur.execute(
                        "INSERT INTO main.fleetlog_checkpoints (schema_name, stream, seq) VALUES (?, ?, 0)",
                        [schema, stream],
                    )
                cur.execute("COMMIT")
            except Exception:
                cur.execute("ROLLBACK")
                raise
            finally:
                cur.close()
        return Generation(projection.name, number, projection.version, schema, state)

    def retire(self, gen: Generation) -> None:
        with self._lock:
            self.con.execute(
                "UPDATE fleetlog_generations SET state = 'retired' WHERE name = ? AND generation = ?",
                [gen.name, gen.generation],
            )
            self.con.execute("DELETE FROM fleetlog_checkpoints WHERE schema_name = ?", [gen.schema])
            self.con.execute(f'DROP SCHEMA IF EXISTS "{gen.schema}" CASCADE')
            self._dropped(gen.schema)

    def _dropped(self, schema: str) -> None:  # under _lock
        self.dropped.add(schema)
        self.drops += 1

    def dropped_schemas(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self.dropped)

    def promote(self, new: Generation, old: Generation | None, report: str | None) -> None:
        """Make `new` the live generation (and `old` retired) in one transaction.

        The old tables stay until `drop_retired`: the projector first stops the old
        generation's fold loops, whose batch in flight would otherwise fail on a dropped schema.
        """
        with self._lock:
            cur = self.con.cursor()
            cur.execute(f'USE "{self.catalog}"')
            try:
                cur.execute("BEGIN")
                if old is not None:
                    cur.execute(
                        "UPDATE fleetlog_generations SET state = 'retired' WHERE name = ? AND generation = ?",
                        [old.name, old.generation],
                    )
                cur.execute(
                    """UPDATE fleetlog_generations SET state = 'live', promoted_at = now(), compare_report = ?
                       WHERE name = ? AND generation = ?""",
                    [report, new.name, new.generation],
                )
                cur.execute("COMMIT")
            except Exception:
                cur.execute("ROLLBACK")
                raise
            finally:
                cur.close()
        new.state = "live"
        if old is not None:
            old.state = "retired"

    def drop_retired(self, old: Generation) -> None:
        """Drop a promoted-over generation's tables and checkpoints (nothing folds it any more)."""
        with self._lock:
            self.con.execute("DELETE FROM fleetlog_checkpoints WHERE schema_name = ?", [old.schema])
            self.con.execute(f'DROP SCHEMA IF EXISTS "{old.schema}" CASCADE')
            self._dropped(old.schema)

    # -- reading -------------------------------------------------------------
    def checkpoints(self, schema: str) -> dict[str, int]:
        with self._lock:
            rows = self.con.execute(
                "SELECT stream, seq FROM fleetlog_checkpoints WHERE schema_name = ?", [schema]
            ).fetchall()
        return {stream: int(seq) for stream, seq in rows}

    def cursor(self, schema: str | None = None) -> duckdb.DuckDBPyConnection:
        """A new cursor (its own DuckDB connection) whose unqualified names resolve in `schema`
        (else in the views file's `main`)."""
        with self._lock:
            cur = self.con.cursor()
        if schema is not None:
            cur.execute(f'USE "{self.catalog}"."{schema}"')
        else:
            cur.execute(f'USE "{self.catalog}"')
        return cur

    def table_digest(self, schema: str, tables: tuple[str, ...]) -> dict[str, list[Any]]:
        """Row count and an order-independent content hash per table (rebuild comparison)."""
        out: dict[str, list[Any]] = {}
        cur = self.cursor(schema)
        try:
            for table in tables:
                row = cur.execute(f"SELECT count(*), coalesce(bit_xor(hash(t)), 0) FROM {table} t").fetchone()
                assert row is not None
                out[table] = [int(row[0]), str(row[1])]
        finally:
            cur.close()
        return out

    def wal_bytes(self) -> int:
        """Size of the write-ahead log: committed changes not yet checkpointed into the file."""
        try:
            return Path(str(self.path) + ".wal").stat().st_size
        except OSError:
            return 0

    def checkpoint(self) -> None:
        """Write the WAL into the database file (the projector calls it when idle)."""
        cur = self.cursor()
        try:
            cur.execute(f"CHECKPOINT {CATALOG}")
        finally:
            cur.close()

    def close(self) -> None:
        with self._lock:
            self.con.close()
