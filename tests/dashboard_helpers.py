"""Shared by the dashboard tests: a node's dashboard on a free loopback port, and plain GETs."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fleetlog.services.dashboard import Dashboard
from fleetlog.services.node.server import Server, start_dashboard


@asynccontextmanager
async def dashboard_of(server: Server) -> AsyncIterator[Dashboard]:
    """The node's dashboard as `up`/`serve` start it (start_dashboard), on port 0."""
    server.settings = server.settings.model_copy(update={"http": "127.0.0.1:0"})
    dash = await start_dashboard(server)
    assert dash is not None
    try:
        yield dash
    finally:
        await dash.stop()


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


async def get(url: str) -> tuple[int, str, str]:
    """(status, content type, body) of one GET, off the event loop (the server runs on it)."""
    return await asyncio.to_thread(_get, url)
