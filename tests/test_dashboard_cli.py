"""`fleetlog up` serves the dashboard and /metrics on --http, and none with --no-http:
the real command in its own process, stopped by SIGINT as Ctrl-C would."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import urllib.error
from pathlib import Path

import pytest
from fleetlog.services.node.broker import die_with_parent, free_port

from fleetlog import Fleet

from .dashboard_helpers import get
from .helpers import fleetlog_cmd, wait_until


def _up(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    log = open(tmp_path / "up.log", "ab")
    proc = subprocess.Popen([*fleetlog_cmd(), "up", "--port", str(port), "--data-dir", str(tmp_path / "d"), *extra],
                            stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent(),
                            env={**os.environ, "FLEETLOG_REACTORS": "false"})
    return proc, port


async def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGINT)
    return await asyncio.to_thread(proc.wait, 60)


async def test_up_serves_the_dashboard_on_http(tmp_path: Path) -> None:
    http = free_port()
    proc, _ = _up(tmp_path, "--http", f"127.0.0.1:{http}")
    try:
        async def healthy() -> bool:
            try:
                return (await get(f"http://127.0.0.1:{http}/healthz"))[0] == 200
            except (urllib.error.URLError, ConnectionError):
                return proc.poll() is not None  # died: fail below with its log
        await wait_until(healthy, 120)
        assert proc.poll() is None, (tmp_path / "up.log").read_text()
        status, _, text = await get(f"http://127.0.0.1:{http}/metrics")
        assert status == 200 and "fleetlog_node_serving 1.0" in text
        status, _, page = await get(f"http://127.0.0.1:{http}/")
        assert status == 200 and "<table id=agents>" in page
    finally:
        assert await _stop(proc) == 0
    assert "dashboard on http://127.0.0.1:" in (tmp_path / "up.log").read_text()


async def test_up_no_http_serves_queries_but_no_page_and_logs_json_lines(tmp_path: Path) -> None:
    http = free_port()
    proc, port = _up(tmp_path, "--http", f"127.0.0.1:{http}", "--no-http", "--log-json")
    try:
        async with Fleet.connect(f"nats://127.0.0.1:{port}", data_dir=tmp_path / "client", connect_wait_s=30) as fleet:
            async def serving() -> bool:
                try:
                    return (await fleet.status(timeout=2)).node_state == "serving"
                except Exception:
                    return False
            await wait_until(serving, 120)
        with pytest.raises(urllib.error.URLError):
            await get(f"http://127.0.0.1:{http}/healthz")
    finally:
        assert await _stop(proc) == 0
    lines = [json.loads(line) for line in (tmp_path / "up.log").read_text().splitlines() if line.strip()]
    assert not any("dashboard on" in line["msg"] for line in lines)
    assert any(line["logger"] == "fleetlog.server" and line["msg"].startswith("fleetlog serving") for line in lines)
    assert any(line["logger"] == "fleetlog.server" and line["msg"].startswith("fleetlog stopped") for line in lines)
    assert all({"ts", "level", "logger", "msg"} <= line.keys() for line in lines)


async def test_up_refuses_an_http_address_it_cannot_bind(tmp_path: Path) -> None:
    taken = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    http = taken.sockets[0].getsockname()[1]
    try:
        proc, _ = _up(tmp_path, "--http", f"127.0.0.1:{http}")
        code = await asyncio.to_thread(proc.wait, 120)
    finally:
        taken.close()
    out = (tmp_path / "up.log").read_text()
    assert code == 1 and f"cannot serve the dashboard on 127.0.0.1:{http}" in out and "--no-http" in out
