"""`fleetlog serve` and the broker start in any order (compose, systemd): serve waits for NATS."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

from fleetlog.services.backbone.errors import FleetUnavailable
from fleetlog.services.node.broker import EmbeddedBroker, free_port

from fleetlog import Fleet, FleetSettings

from .helpers import fleetlog_cmd, start_serve, wait_until


async def test_serve_started_before_the_broker_waits_then_serves(tmp_path: Path) -> None:
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    proc = start_serve(url, tmp_path / "serve", log_path)
    broker = EmbeddedBroker(tmp_path / "broker", port=port)
    try:
        await wait_until(lambda: _contains(log_path, "waiting for NATS"), timeout_s=30)
        assert proc.poll() is None  # still waiting, not failed
        await broker.start()
        fleet = await Fleet.connect(settings=FleetSettings(nats_url=url, data_dir=tmp_path / "client"))
        try:
            r = fleet.attempts.record(agent="late", action="a", outcome="success", elapsed_s=1.0)
            token = await fleet.flush()
            page = await wait_until(lambda: _query(fleet, token), timeout_s=30)
            assert [row.id for row in page.items] == [r.id]
        finally:
            await fleet.close()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
        assert await _contains(log_path, "answered after")
    finally:
        if proc.poll() is None:
            proc.kill()
        await broker.stop()


async def test_serve_gives_up_after_nats_wait_s_and_stops_on_a_signal_while_waiting(tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    env = {**os.environ, "FLEETLOG_NATS_WAIT_S": "1", "FLEETLOG_DATA_DIR": str(tmp_path / "a")}
    done = await asyncio.to_thread(
        subprocess.run, [*fleetlog_cmd(), "serve", "--nats", url], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "cannot reach NATS" in done.stderr and "within 1.0s" in done.stderr
    # Without a limit it waits; SIGTERM while waiting ends it cleanly.
    log_path = tmp_path / "b.log"
    proc = start_serve(url, tmp_path / "b", log_path)
    try:
        await wait_until(lambda: _contains(log_path, "waiting for NATS"), timeout_s=30)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


async def _contains(path: Path, text: str) -> bool:
    def check() -> bool:
        return path.exists() and text in path.read_text(errors="replace")

    return await asyncio.to_thread(check)


async def _query(fleet: Fleet, token: object) -> object:
    try:
        page = await fleet.attempts.query(agent="late", min_seq=token)  # type: ignore[arg-type]
    except FleetUnavailable:  # serve is still connecting: nothing answers yet
        return None
    return page if page.items else None
