"""Shared fixtures: a real nats-server per test (free port, temp dir), never a mock."""

from __future__ import annotations

import faulthandler
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from fleetlog.services.node.broker import EmbeddedBroker, free_port
from fleetlog.services.node.server import Server

from fleetlog import Fleet, FleetSettings

# pytest-timeout (signal method) fails a test that runs past `timeout`; this backstop, armed
# around each whole test (setup, call, teardown), catches what a signal cannot interrupt:
# it prints every thread's stack and ends the run instead of letting it hang until CI's limit.
BACKSTOP_EXTRA_S = 180


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    timeout = float(item.config.getini("timeout") or 0)
    if timeout > 0:
        faulthandler.dump_traceback_later(timeout + BACKSTOP_EXTRA_S, exit=True, file=sys.stderr)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[EmbeddedBroker]:
    server = EmbeddedBroker(tmp_path / "broker", port=free_port())
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def settings(tmp_path: Path, broker: EmbeddedBroker) -> FleetSettings:
    return FleetSettings(
        nats_url=broker.url,
        data_dir=tmp_path / "data",
        spool_dir=tmp_path / "spool",
        batch_wait_s=0.01,
        reactors=False,  # tests drive the reactors' work with their own clocks; test_reactors runs them live
    )


@pytest.fixture
async def server(settings: FleetSettings) -> AsyncIterator[Server]:
    srv = Server(settings)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
async def fleet(settings: FleetSettings, server: Server) -> AsyncIterator[Fleet]:
    client = await Fleet.connect(settings=settings)
    try:
        yield client
    finally:
        await client.close()
