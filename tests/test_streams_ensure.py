"""`ensure_streams` brings streams an older fleetlog made to the declared config."""

from __future__ import annotations

from pathlib import Path

from fleetlog.services.backbone.link import connect_once
from fleetlog.services.backbone.streams import ensure_streams
from fleetlog.services.node.broker import EmbeddedBroker
from nats.js.api import StreamConfig

from fleetlog import FleetSettings


async def test_an_older_processors_stream_loses_allow_atomic_and_keeps_its_messages(
        broker: EmbeddedBroker, tmp_path: Path) -> None:
    # Before 2026-12-05 FLEET_PROCESSORS allowed atomic batches; nothing writes them now.
    nc = await connect_once([broker.url], "older")
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="FLEET_PROCESSORS", subjects=["fleet.proc.*.lock"],
                                         max_msgs_per_subject=1, allow_direct=True, allow_atomic=True))
        await js.publish("fleet.proc.p1.lock", b"{}", headers={"Nats-Msg-Id": "older-1"})
        assert (await js.stream_info("FLEET_PROCESSORS")).config.allow_atomic
        await ensure_streams(nc, FleetSettings(nats_url=broker.url, data_dir=tmp_path))
        info = await js.stream_info("FLEET_PROCESSORS")
        assert not info.config.allow_atomic
        assert info.state.messages == 1
        assert "fleet.proc.*.session.*" in (info.config.subjects or [])
    finally:
        await nc.close()
