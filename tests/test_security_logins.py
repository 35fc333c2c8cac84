"""Dashboard logins under load (review finding 6): a cached login is answered on the event loop
whatever is queued; hashes run in a small pool of their own with a cap (over it: 503 at once);
an unknown user is hashed like a known one (no username oracle). A real registry and a real
HTTP server; the pool's one worker is held by the test (a gate), so "queued" is a fact, not
a race."""

from __future__ import annotations

import asyncio
import base64
import threading
from pathlib import Path

import pytest
from fleetlog.services.backbone.logins import Logins, LoginsBusy
from fleetlog.services.dashboard.http import HttpServer, Request, Response
from fleetlog.services.node.identities import Registry, password_path


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _registry(tmp_path: Path) -> tuple[Path, str]:
    Registry(tmp_path).add("reader", "dash", out=tmp_path / "dash.nk")
    return tmp_path / "identities.json", password_path(tmp_path / "dash.nk").read_text().strip()


def test_known_and_unknown_users_take_the_same_path(tmp_path: Path) -> None:
    registry, password = _registry(tmp_path)
    logins = Logins(registry)
    try:
        assert not logins.check(_basic("reader-dash", "wrong"))
        assert logins.hashes == 1
        assert not logins.check(_basic("reader-nobody", "wrong"))  # hashed too, against no one
        assert logins.hashes == 2
        assert not logins.check(_basic("reader-nobody", password))  # someone's password, no such user
        assert logins.check(_basic("reader-dash", password)) and logins.hashes == 4
        assert logins.check(_basic("reader-dash", password)) and logins.hashes == 4  # cached: no hash
        assert not logins.check("Bearer x") and not logins.check(None) and logins.hashes == 4
    finally:
        logins.close()


async def _get(port: int, header: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET / HTTP/1.1\r\nAuthorization: {header}\r\n\r\n".encode())
    await writer.drain()
    line = (await reader.readline()).decode().strip()
    writer.close()
    return line


async def test_a_cached_login_is_answered_while_bad_ones_queue(tmp_path: Path) -> None:
    registry, password = _registry(tmp_path)
    logins = Logins(registry, workers=1, max_queued=4)

    async def page(_: Request) -> Response:
        return Response(body=b"ok")

    server = HttpServer({"/": page}, "127.0.0.1", 0, auth=logins.check)
    await server.start()
    gate = threading.Event()
    try:
        good = _basic("reader-dash", password)
        assert (await _get(server.port, good)).endswith("200 OK")  # verified once: cached from now on
        held = logins._pool.submit(gate.wait)  # the pool's only worker: busy until the gate opens
        guesses = [asyncio.create_task(_get(server.port, _basic("admin-fleetlog", f"g{i}"))) for i in range(4)]
        while logins.queued < 4:  # noqa: ASYNC110 - the four guesses reach the pool, which the gate holds
            await asyncio.sleep(0.01)
        assert (await _get(server.port, good)).endswith("200 OK")  # on the loop, no hash, no wait
        assert (await _get(server.port, _basic("reader-dash", "x"))).endswith("503 Service Unavailable")
        with pytest.raises(LoginsBusy):
            await logins.check.on_loop(_basic("reader-nobody", "x"))
        assert not [t for t in guesses if t.done()]  # still queued behind the gate
        gate.set()
        held.result()
        assert [line.split(" ", 1)[1] for line in await asyncio.gather(*guesses)] == ["401 Unauthorized"] * 4
        assert logins.queued == 0 and logins.hashes == 5  # the good login's first check and 4 guesses
    finally:
        gate.set()
        await server.stop()
        logins.close()
