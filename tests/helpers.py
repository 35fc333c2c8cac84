"""Small helpers shared by tests (real broker, real DuckDB; no mocks)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb

from fleetlog import Fleet


def fleetlog_cmd() -> list[str]:
    exe = shutil.which("fleetlog") or str(Path(sys.executable).parent / "fleetlog")
    return [exe]


def start_serve(nats_url: str, data_dir: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """`fleetlog serve` in its own process (so that fault tests can SIGKILL it)."""
    log = open(log_path, "ab")
    env = {**os.environ, "FLEETLOG_BATCH_WAIT_S": "0.01"}
    return subprocess.Popen([*fleetlog_cmd(), "serve", "--nats", nats_url, "--data-dir", str(data_dir)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)


async def wait_until(predicate, timeout_s: float = 60.0, interval_s: float = 0.1):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while True:
        result = await predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s (last: {result!r})")
        await asyncio.sleep(interval_s)


async def live_checkpoint(fleet: Fleet, projection: str, stream: str) -> int:
    try:
        status = await fleet.status(timeout=2)
    except Exception:
        return -1
    for p in status.projections:
        if p.name == projection and p.state == "live":
            return p.checkpoints.get(stream, 0)
    return -1


def view_digest(db_path: Path, projection: str, tables: tuple[str, ...]) -> dict[str, tuple[int, str]]:
    """Row count + order-independent content hash per table of the live generation (read-only open)."""
    con = duckdb.connect(str(db_path), read_only=True)
    try:
        row = con.execute(
            "SELECT schema_name FROM fleetlog_generations WHERE name = ? AND state = 'live'", [projection]
        ).fetchone()
        assert row is not None
        out = {}
        for t in tables:
            r = con.execute(f'SELECT count(*), coalesce(bit_xor(hash(x)), 0) FROM "{row[0]}".{t} x').fetchone()
            assert r is not None
            out[t] = (int(r[0]), str(r[1]))
        return out
    finally:
        con.close()
