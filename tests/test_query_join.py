"""When a node joins the query group (issue 9 review): never on a catch-up target the broker
did not give, never held out for a live view that cannot move, and never stuck "catching
up" behind deleted messages. Real nats-server, real DuckDB, second real `Server`s."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import ClassVar

import msgspec
import nats
import pytest
from fleetlog.projections.attempts import AttemptsProjection
from fleetlog.schemas.answers import StatusAnswer, node_status_subject
from fleetlog.services.node.server import Server
from fleetlog.services.query.heads import StreamHeads, last_seq_of

from fleetlog import Fleet, FleetSettings

STREAM = "FLEET_ATTEMPTS"


class _AttemptsNext(AttemptsProjection):
    version: ClassVar[int] = AttemptsProjection.version + 1


async def _record(fleet: Fleet, n: int, agent: str = "j") -> dict[str, int]:
    for i in range(n):
        fleet.attempts.record(agent=agent, action="a", outcome="success", elapsed_s=float(i))
    return await fleet.flush()


async def _node_status(nc: nats.NATS, node: str) -> StatusAnswer:
    msg = await nc.request(node_status_subject(node), b"{}", timeout=10)
    return msgspec.json.decode(msg.data, type=StatusAnswer)


def test_an_error_reply_is_no_last_seq() -> None:
    """A JetStream error reply used to decode as last_seq 0 (the default state)."""
    unavailable = (b'{"type":"io.nats.jetstream.api.v1.stream_info_response","error":{"code":503,'
                   b'"err_code":10039,"description":"JetStream system temporarily unavailable"}}')
    assert last_seq_of(unavailable) is None
    assert last_seq_of(b"") is None
    assert last_seq_of(b'{"error":{"code":404,"err_code":10059,"description":"stream not found"}}') == 0
    assert last_seq_of(b'{"state":{"last_seq":12}}') == 12


async def test_a_missing_stream_is_0_and_a_real_one_its_last_seq(fleet: Fleet) -> None:
    token = await _record(fleet, 3)
    nc = await nats.connect(fleet.settings.nats_url)
    try:
        heads = StreamHeads(nc)
        assert await heads._info("NO_SUCH_STREAM") == 0
        assert await heads._info(STREAM) == token[STREAM]
    finally:
        await nc.close()


async def test_a_node_whose_lookup_fails_stays_out_until_the_broker_answers(
        fleet: Fleet, server: Server, settings: FleetSettings, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The second node's STREAM.INFO lookups fail (as a timeout does): it must not take 0 as
    its target and join with an empty view; it keeps asking, and says "catching up"."""
    token = await _record(fleet, 120)
    await fleet.attempts.stats(min_seq=token)
    real = StreamHeads._info
    failing = asyncio.Event()
    failing.set()
    asked: list[str] = []

    async def info(self: StreamHeads, stream: str) -> int | None:
        asked.append(stream)
        return None if failing.is_set() else await real(self, stream)

    monkeypatch.setattr(StreamHeads, "_info", info)
    second = Server(settings.model_copy(update={"data_dir": tmp_path / "second"}), fold_paused=True)
    starting = asyncio.ensure_future(second.start(wait=False))
    nc = await nats.connect(settings.nats_url)
    try:
        while asked.count(STREAM) < 3:  # asked again and again, never settling for 0
            assert not starting.done()
            await asyncio.sleep(0.05)
        status = await _node_status(nc, second.query.node)
        assert status.node_state == "catching up"
        assert STREAM not in second.query.targets
        failing.clear()
        await asyncio.wait_for(starting, 60)
        assert second.query.targets[STREAM] == token[STREAM]
        done, _ = second.query.catch_up()
        assert not done and not second.query.serving.is_set()  # its fold is held at 0 of 120

        second.projector.resume()
        await asyncio.wait_for(second.serving(), 60)
        # An answer whose stream head the broker did not give leaves its lag out (not 0).
        failing.set()
        page = await fleet.attempts.query(agent="j", limit=1)
        assert page.as_of[STREAM] == token[STREAM]
        assert STREAM not in page.lag and STREAM not in page.lag_s, (page.lag, page.lag_s)
        failing.clear()
        page = await fleet.attempts.query(agent="j", limit=1)
        assert page.lag[STREAM] == 0
    finally:
        failing.clear()
        await nc.close()
        if not starting.done():
            starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await second.stop()


async def test_a_node_on_a_new_version_serves_its_old_view_while_it_rebuilds(
        fleet: Fleet, settings: FleetSettings, tmp_path: Path) -> None:
    """Restarted on a new projection version after the stream moved on: the old live view
    does not fold any more, so waiting for it to reach the target kept the node out of the
    group for the whole rebuild. It serves at once, its lag honest."""
    own = settings.model_copy(update={"data_dir": tmp_path / "own"})
    node = Server(own, projections=[AttemptsProjection()])
    await node.start()
    token = await _record(fleet, 20)
    await node.projector.wait_for("attempts", token, 30)
    await node.stop()
    token = await _record(fleet, 30)  # the stream moves on while the node is down

    node = Server(own, projections=[_AttemptsNext()], fold_paused=True)  # the rebuild is held
    nc = await nats.connect(settings.nats_url)
    try:
        await asyncio.wait_for(node.start(), 60)
        status = await _node_status(nc, node.query.node)
        assert status.node_state == "serving"
        (live,) = [p for p in status.projections if p.state == "live"]
        assert live.version == AttemptsProjection.version and live.checkpoints[STREAM] == token[STREAM] - 30
        assert status.lag[STREAM] == 30
    finally:
        await nc.close()
        await node.stop()


async def test_a_live_view_whose_last_messages_were_deleted_is_caught_up(
        fleet: Fleet, settings: FleetSettings, tmp_path: Path) -> None:
    """The last messages were deleted while the node was down: the stream's last_seq stays
    beyond anything that will be delivered, and the node used to say "catching up" until
    the next publish."""
    own = settings.model_copy(update={"data_dir": tmp_path / "own"})
    node = Server(own, projections=[AttemptsProjection()])
    await node.start()
    token = await _record(fleet, 5)
    await node.projector.wait_for("attempts", token, 30)
    await node.stop()
    token = await _record(fleet, 3)
    nc = await nats.connect(settings.nats_url)
    try:
        js = nc.jetstream()
        for seq in range(token[STREAM] - 2, token[STREAM] + 1):
            assert await js.delete_msg(STREAM, seq)
        node = Server(own, projections=[AttemptsProjection()])
        await asyncio.wait_for(node.start(), 30)
        assert node.query.targets[STREAM] == token[STREAM]
        assert node.projector.checkpoints("attempts")[STREAM] == token[STREAM] - 3
    finally:
        await nc.close()
        await node.stop()

