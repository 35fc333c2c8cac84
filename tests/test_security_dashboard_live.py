"""A secure node's live view (/events) over real HTTP: a fact whose payload disagrees with its
subject never reaches a page (review finding 2), and an open stream ends once its reader's
login is revoked (finding 4). One secure node and dashboard shared by the module."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
import pytest_asyncio
from fleetlog.schemas import AttemptRecorded, encode_event, new_event_id, now_iso
from fleetlog.services.dashboard.app import Dashboard
from fleetlog.services.node.broker import reload_secure_broker
from fleetlog.services.node.identities import Registry, password_path

from .security_helpers import Node, identity, raw, secure_node

shared_node = pytest.mark.asyncio(loop_scope="module")
Live = tuple[Node, Dashboard]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def live(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Live]:
    tmp = tmp_path_factory.mktemp("live")
    # data_dir holds the broker's dir, as for `up --secure`: the dashboard reads <data_dir>/broker's logins
    async with secure_node(tmp, data_dir=tmp) as node:
        dashboard = Dashboard(node[2], "127.0.0.1", 0)
        await dashboard.start()
        try:
            yield node, dashboard
        finally:
            await dashboard.stop()


async def _open_events(dashboard: Dashboard, user: str, password: str) -> tuple[asyncio.StreamReader,
                                                                                 asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", dashboard.http.port)
    login = base64.b64encode(f"{user}:{password}".encode()).decode()
    writer.write(f"GET /events HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {login}\r\n\r\n".encode())
    await writer.drain()
    async with asyncio.timeout(60):  # a deadline against hanging, not a timing assert
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        await reader.readuntil(b"event: ready\ndata: {}\n\n")
    return reader, writer


async def _next_chunk(reader: asyncio.StreamReader) -> bytes:
    """The next SSE event or comment; b"" once the server ended the stream."""
    try:
        return await reader.readuntil(b"\n\n")
    except asyncio.IncompleteReadError as end:
        assert end.partial == b"", end.partial
        return b""


def _attempt(agent: str, action: str) -> bytes:
    return encode_event(AttemptRecorded(id=new_event_id(), ts=now_iso(), agent=agent, action=action,
                                        outcome="success", elapsed_s=0.1))


@shared_node
async def test_a_forged_agent_never_reaches_a_page(live: Live, tmp_path: Path) -> None:
    (broker, _, _), dashboard = live
    reader = await identity(broker, "reader", "watcher")
    mallory = await raw(broker, await identity(broker, "agent", "mallory"))
    alice = await raw(broker, await identity(broker, "agent", "alice"))
    stream, writer = await _open_events(dashboard, "reader-watcher", password_path(reader).read_text().strip())
    try:
        refused = dashboard.live.refused
        # On its own subject (the broker allows it, and acks it: it is stored), saying it is alice.
        await mallory.jetstream().publish("fleet.attempt.mallory.x", _attempt("alice", "forged"), timeout=10)
        # Then alice's own: by the time it is on the page, the forgery was filed and taken before it.
        await alice.jetstream().publish("fleet.attempt.alice.honest", _attempt("alice", "honest"), timeout=10)
        seen: list[dict[str, object]] = []
        async with asyncio.timeout(60):  # a deadline against hanging, not a timing assert
            while not any(f["action"] == "honest" for f in seen):
                chunk = await _next_chunk(stream)
                assert chunk, "the stream ended"
                if chunk.startswith(b"event: attempt\n"):
                    seen.append(msgspec.json.decode(chunk.split(b"data: ", 1)[1]))
    finally:
        writer.close()
        await mallory.close()
        await alice.close()
    assert [(f["agent"], f["action"]) for f in seen] == [("alice", "honest")]
    assert dashboard.live.refused == refused + 1
    assert dashboard.live.figures()["refused"] == refused + 1


@shared_node
async def test_an_open_stream_ends_when_its_reader_is_revoked(live: Live) -> None:
    (broker, _, _), dashboard = live
    dashboard.live.keepalive_s = 0.2  # keepalives (and so login checks) come often: the test waits less
    reader = await identity(broker, "reader", "revoked")
    stream, writer = await _open_events(dashboard, "reader-revoked", password_path(reader).read_text().strip())
    admin_password = password_path(broker.credentials_path("admin-fleetlog")).read_text().strip()
    admin_stream, admin_writer = await _open_events(dashboard, "admin-fleetlog", admin_password)
    try:
        async with asyncio.timeout(60):  # a deadline against hanging, not a timing assert
            for _ in range(3):  # a valid login's stream stays open across its re-checks
                assert await _next_chunk(stream) == b": keepalive\n\n"
            assert Registry(broker.data_dir).revoke("reader-revoked")
            assert await reload_secure_broker(broker.data_dir)
            while chunk := await _next_chunk(stream):  # ends at the next re-check
                assert chunk == b": keepalive\n\n"
            # The admin's stream, checked against the same changed registry, goes on.
            for _ in range(3):
                assert await _next_chunk(admin_stream) == b": keepalive\n\n"
    finally:
        writer.close()
        admin_writer.close()
