"""Small helpers shared by tests (real broker, real DuckDB; no mocks)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import duckdb
from fleetlog.services.node.broker import die_with_parent

from fleetlog import Fleet, FleetSettings

T = TypeVar("T")


def fleetlog_cmd() -> list[str]:
    exe = shutil.which("fleetlog") or str(Path(sys.executable).parent / "fleetlog")
    return [exe]


def start_serve(nats_url: str, data_dir: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """`fleetlog serve` in its own process (so that fault tests can SIGKILL it)."""
    log = open(log_path, "ab")
    env = {**os.environ, "FLEETLOG_BATCH_WAIT_S": "0.01"}
    return subprocess.Popen([*fleetlog_cmd(), "serve", "--nats", nats_url, "--data-dir", str(data_dir)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent())


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


CliRun = Callable[..., Awaitable[subprocess.CompletedProcess[str]]]


def cli_runner(nats_url: str, tmp_path: Path, parallel: int = 3) -> CliRun:
    """`fleetlog ... --nats URL` as a real subprocess, awaited in a thread.

    Each invocation gets its own FLEETLOG_DATA_DIR (its spool lands there). At most
    `parallel` run at once: the in-process server's DuckDB reads share the default
    thread pool on this 2-core machine.
    """
    slots = asyncio.Semaphore(parallel)
    counter = iter(range(1_000_000))

    async def run(*args: str, stdin: str = "", nats: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "FLEETLOG_DATA_DIR": str(tmp_path / f"cli-{next(counter)}"), "COLUMNS": "300",
               "NO_COLOR": "1", "TERM": "dumb"}
        env.pop("FLEETLOG_NATS_URL", None)
        cmd = [*fleetlog_cmd(), *args, *(["--nats", nats_url] if nats else [])]
        async with slots:
            return await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, env=env,
                                           timeout=60, input=stdin)

    return run


def cli_json(res: subprocess.CompletedProcess[str]) -> Any:
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


async def rebuild_and_wait(fleet: Fleet, projection: str, timeout_s: float = 60.0) -> None:
    """`fleet.rebuild(projection)` and wait until the new generation is the live one."""
    generation = (await fleet.rebuild(projection))["generation"]

    async def live() -> bool:
        return any(p.name == projection and p.state == "live" and p.generation == generation
                   for p in (await fleet.status()).projections)

    await wait_until(live, timeout_s=timeout_s, interval_s=0.05)


async def in_compat_thread(settings: FleetSettings, work: Callable[[], T]) -> T:
    """Run `work` in a plain thread holding fleetlog.compat's shared connection, as the
    drop-in modules' callers do (they are synchronous); the loop stays free for the server."""
    import fleetlog.compat as compat

    def run() -> T:
        compat.connect(settings=settings)
        try:
            return work()
        finally:
            compat.close()

    return await asyncio.to_thread(run)
