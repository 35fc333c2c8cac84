"""The processor pipeline's health with real session files, real mtimes (os.utime) and real
bookkeeping rows: ok / warning / info in each of the pipeline check's cases, through the
API, the processors.health endpoint and `fleetlog processors health --json`."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fleetlog.schemas.scheduler import PipelineHealth
from fleetlog.services.backbone.errors import FleetValidationError, QueryError
from fleetlog.services.client.processors.files import utcnow
from fleetlog.services.client.processors.health import HEALTH_SUBJECT, HealthRequest, pipeline_health
from fleetlog.services.node.server import Server

from fleetlog import Fleet, ProcessorResult
from fleetlog.processors import register, unregister

from .helpers import cli_json, cli_runner


class Every10:
    cadence_minutes = 10  # grace 20 min; stuck-file grace 80 min

    def __init__(self, name: str) -> None:
        self.name = name

    def process_session(self, session_path: Path, username: str, session_key: str,
                        **kwargs: Any) -> ProcessorResult | None:
        return None


@pytest.fixture
def procs() -> Iterator[None]:
    register(Every10("hp"))
    register(Every10("hp2"))
    yield
    unregister("hp")
    unregister("hp2")


def _file(root: Path, key: str, age: timedelta) -> None:
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"x": 1}\n')
    at = (datetime.now() - age).timestamp()
    os.utime(path, (at, at))


async def _mark(fleet: Fleet, key: str, ago: timedelta, processor: str = "hp") -> None:
    await fleet.processors.mark_processed(processor, key, "u", 1, "h", read_at=utcnow() - ago)


async def _health(fleet: Fleet, root: Path, **kwargs: Any) -> PipelineHealth:
    return await pipeline_health(fleet.processors, root, processors=["hp"], **kwargs)


M = timedelta(minutes=1)


async def test_each_health_state_with_real_files(fleet: Fleet, procs: None, tmp_path: Path) -> None:
    root = tmp_path / "sessions"
    h = await _health(fleet, root)
    assert h.status == "ok" and h.processors[0].status == "ok" and h.processors[0].reason == "no sessions"

    _file(root, "u/a.jsonl", 60 * M)
    h = await _health(fleet, root)
    (p,) = h.processors
    assert (h.status, p.status) == ("degraded", "warning") and "never processed any" in p.reason

    await _mark(fleet, "u/a.jsonl", 50 * M)  # newest mtime -60m <= -50m + 20m
    h = await _health(fleet, root)
    assert (h.status, h.processors[0].status) == ("ok", "ok") and h.processors[0].grace_seconds == 1200

    _file(root, "u/b.jsonl", 5 * M)  # -5m > -50m + 20m: behind
    h = await _health(fleet, root)
    (p,) = h.processors
    assert (h.status, p.status, p.newest_file) == ("degraded", "warning", "u/b.jsonl")
    assert "more than the grace of 1200s" in p.reason

    await _mark(fleet, "u/b.jsonl", 4 * M)
    assert (await _health(fleet, root)).processors[0].status == "ok"

    _file(root, "v/c.jsonl", 120 * M)  # old, no row, newer files processed, older than 80 min
    h = await _health(fleet, root)
    (p,) = h.processors
    assert (h.status, p.status, p.stuck_file) == ("ok", "info", "v/c.jsonl")  # info is not degraded
    assert p.stuck_file_age_seconds is not None and 7100 < p.stuck_file_age_seconds < 7300

    # the stuck-file grace is configurable: by argument, or by the environment
    assert (await _health(fleet, root, stuck_file_grace_seconds=3 * 3600)).processors[0].status == "ok"
    env_ok = {"FLEETLOG_PROCESSOR_STUCK_FILE_GRACE_S": str(3 * 3600)}
    assert (await _health(fleet, root, env=env_ok)).processors[0].status == "ok"
    with pytest.raises(FleetValidationError, match="FLEETLOG_PROCESSOR_STUCK_FILE_GRACE_S"):
        await _health(fleet, root, env={"FLEETLOG_PROCESSOR_STUCK_FILE_GRACE_S": "abc"})

    _file(root, "v/d.jsonl", 90 * M)  # also stuck, but younger: the oldest is reported
    assert (await _health(fleet, root)).processors[0].stuck_file == "v/c.jsonl"


async def test_an_old_unprocessed_file_with_no_newer_processed_file_is_not_stuck(
        fleet: Fleet, procs: None, tmp_path: Path) -> None:
    _file(tmp_path, "u/new.jsonl", 200 * M)
    _file(tmp_path, "u/old.jsonl", 300 * M)
    await _mark(fleet, "u/new.jsonl", 190 * M)
    assert (await _health(fleet, tmp_path)).processors[0].stuck_file == "u/old.jsonl"
    await fleet.processors.delete_for_processors(["hp"])
    await _mark(fleet, "u/old.jsonl", 180 * M)  # only the older file processed: the newer one is no "stuck" file
    p = (await _health(fleet, tmp_path)).processors[0]
    assert (p.status, p.stuck_file) == ("ok", None)


async def test_any_warning_degrades_the_pipeline(fleet: Fleet, procs: None, tmp_path: Path) -> None:
    _file(tmp_path, "u/a.jsonl", 60 * M)
    await _mark(fleet, "u/a.jsonl", 50 * M, processor="hp")
    h = await pipeline_health(fleet.processors, tmp_path, processors=["hp", "hp2"])
    assert h.status == "degraded" and [p.status for p in h.processors] == ["ok", "warning"]
    with pytest.raises(FleetValidationError, match="unknown processor 'nope'"):
        await pipeline_health(fleet.processors, tmp_path, processors=["nope"])


async def test_health_through_the_endpoint_and_the_cli(fleet: Fleet, server: Server, procs: None,
                                                       tmp_path: Path) -> None:
    root = tmp_path / "sessions"
    _file(root, "u/a.jsonl", 60 * M)
    _file(root, "v/c.jsonl", 120 * M)
    await _mark(fleet, "u/a.jsonl", 50 * M)
    ready = asyncio.Event()
    serving = asyncio.create_task(fleet.processors.serve_runs(root, ready=ready))
    try:
        await ready.wait()
        h = await fleet.request(HEALTH_SUBJECT, HealthRequest(processors=["hp"]), PipelineHealth)
        assert h.status == "ok" and h.processors[0].status == "info" and h.processors[0].stuck_file == "v/c.jsonl"
        with pytest.raises(QueryError, match=r"Unknown processor 'nope'\. Known: ") as caught:
            await fleet.request(HEALTH_SUBJECT, HealthRequest(processors=["nope"]), PipelineHealth)
        assert caught.value.code == "404"
        cli = cli_runner(fleet.settings.nats_url, tmp_path)
        got = cli_json(await cli("processors", "health", "--processor", "hp", "--processor", "hp2", "--json"))
        assert got["status"] == "degraded"
        assert [(p["processor"], p["status"]) for p in got["processors"]] == [("hp", "info"), ("hp2", "warning")]
        assert got["processors"][0]["stuck_file"] == "v/c.jsonl"
        table = await cli("processors", "health", "--processor", "hp", "--stuck-grace", "36000")
        assert table.returncode == 0 and "pipeline: ok" in table.stdout and "info" not in table.stdout
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
