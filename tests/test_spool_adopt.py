"""Taking over the spools of processes that died (the exit-safety review's findings 2, 3, 8, 10, 11):
real agents SIGKILLed mid-work, real broken spool files, a real broker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import struct
from pathlib import Path

import pytest
from fleetlog.services.node.broker import EmbeddedBroker
from fleetlog.services.node.server import Server
from fleetlog.services.writepath.spool import survey

from fleetlog import Fleet, FleetSettings

from .helpers import fleetlog_cmd
from .test_exit import HANG_S, N, assert_all_in_view, run_agent


async def attempts_in_stream(client: Fleet) -> int:
    info = await (await client.nats()).jetstream().stream_info("FLEET_ATTEMPTS")
    return int(info.state.messages)


async def test_adopting_past_the_cap_keeps_the_rest(settings: FleetSettings, server: Server) -> None:
    """Finding 2: a dead spool bigger than the adopter's cap. The adopter takes what fits, the
    rest stays in the dead spool (nothing dropped, nothing deleted), and a later client with
    room delivers it: every event once, in order."""
    n = 6000
    returncode, _err = await run_agent(settings, "sigkill", "adopt-cap", "durable", sig=signal.SIGKILL, n=n)
    assert returncode == -signal.SIGKILL
    [orphan] = [d for d in survey(settings.resolved_spool_dir()) if d.records]
    assert orphan.records == n + 1 and orphan.bytes > 1 << 20
    small = settings.model_copy(update={"spool_max_bytes": 1 << 20})
    async with Fleet.connect(settings=small) as client:
        await client.flush(HANG_S)
        stats = client.publisher_stats()
        assert stats.dropped_spool_full == 0
        taken = await attempts_in_stream(client)
    [rest] = [d for d in survey(settings.resolved_spool_dir()) if d.records]
    assert (rest.name, rest.live) == (orphan.name, False)
    assert 0 < taken < n
    assert rest.records == n + 1 - taken  # the run event comes last
    await assert_all_in_view(settings, "adopt-cap", n=n)


def broken_spool(root: Path, url: str) -> Path:
    """A dead process's spool whose only record is a length followed by zeros (a power cut
    before the data reached the disk, or a disk that filled up mid-write)."""
    d = root / "deadbeef"
    d.mkdir(parents=True)
    (d / "lock").write_bytes(b"")
    (d / "fleet").write_text(json.dumps({"fleet": None, "urls": [url]}))
    (d / "seg-00000000.log").write_bytes(struct.pack(">I", 8) + b"\0" * 8)
    return d


async def test_an_unreadable_spool_record_is_set_aside(settings: FleetSettings, broker: EmbeddedBroker) -> None:
    """Finding 3: the unreadable record goes to the dead letter; this client and every later
    one publish as usual."""
    root = settings.resolved_spool_dir()
    dead = broken_spool(root, settings.nats_url)
    for _ in range(2):
        async with Fleet.connect(settings=settings) as client:
            assert client.connected
            client.attempts.record(agent="after-broken", action="a", outcome="success", elapsed_s=1.0)
            await client.flush(HANG_S)
    assert not dead.exists()
    [line] = (root / "dead-letter.jsonl").read_text().splitlines()
    assert "unreadable record" in json.loads(line)["reason"]
    async with Fleet.connect(settings=settings) as client:
        assert await attempts_in_stream(client) == 2


async def test_durable_receipts_do_not_hold_payloads(settings: FleetSettings, broker: EmbeddedBroker) -> None:
    """Finding 8: in durable mode the spool holds the event; the receipt waiting for its
    position must not hold a second copy for as long as the outage lasts."""
    await broker.stop()
    durable = settings.model_copy(update={"durable": True})
    async with Fleet.connect(settings=durable, connect_wait_s=0.2) as client:
        receipts = [client.attempts.record(agent="durable-mem", action="a", outcome="success", elapsed_s=float(i),
                                           pane_before="x" * 2000) for i in range(50)]
        assert all(r.payload is None and r.position is None for r in receipts)
        await broker.start()
        await client.flush(HANG_S)
        assert all(r.position is not None for r in receipts)


def cli_env(settings: FleetSettings) -> dict[str, str]:
    return {**os.environ, "FLEETLOG_DATA_DIR": str(settings.data_dir),
            "FLEETLOG_SPOOL_DIR": str(settings.resolved_spool_dir())}


async def test_spool_drain_obeys_the_global_timeout(settings: FleetSettings, broker: EmbeddedBroker) -> None:
    """Finding 10: `fleetlog --timeout 1 spool drain` gives the broker 1 s, not its own 30 s."""
    await broker.stop()
    proc = await asyncio.create_subprocess_exec(
        *fleetlog_cmd(), "--timeout", "1", "spool", "drain", "--nats", settings.nats_url, env=cli_env(settings),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _out, err = await asyncio.wait_for(proc.communicate(), HANG_S)
    assert proc.returncode == 5, err
    assert b"within 1s" in err, err


async def test_spool_drain_adopt_delivers_a_spool_whose_fleet_is_gone(
        broker: EmbeddedBroker, settings: FleetSettings, tmp_path: Path) -> None:
    """Finding 11: fleet X's spool, X replaced by fleet Y (streams made again): only `spool drain
    --adopt NAME` delivers it into Y; without it Y leaves it (a spool belongs to its fleet)."""
    returncode, _err = await run_agent(settings, "sigkill", "adopt-x", "durable", sig=signal.SIGKILL)
    assert returncode == -signal.SIGKILL
    [orphan] = [d for d in survey(settings.resolved_spool_dir()) if d.records]
    await broker.stop()
    other = EmbeddedBroker(tmp_path / "fleet-y", port=broker.port)
    await other.start()
    try:
        cmd = [*fleetlog_cmd(), "spool", "drain", "--nats", settings.nats_url, "--json"]
        proc = await asyncio.create_subprocess_exec(*cmd, env=cli_env(settings), stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(), HANG_S)
        assert proc.returncode == 0
        assert json.loads(out)["left_other_fleets"] == [orphan.name]
        proc = await asyncio.create_subprocess_exec(*cmd, "--adopt", orphan.name, env=cli_env(settings),
                                                    stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(), HANG_S)
        assert proc.returncode == 0
        assert json.loads(out)["delivered"] == N + 1
        async with Fleet.connect(settings=settings) as client_y:
            assert await attempts_in_stream(client_y) == N
    finally:
        await other.stop()
    assert [d for d in survey(settings.resolved_spool_dir()) if d.records] == []


async def test_record_after_close_says_so(settings: FleetSettings, broker: EmbeddedBroker) -> None:
    """Finding 5: record() after `async with` ended used to return a Receipt for an event that
    stayed queued forever; now a clear error, counted."""
    async with Fleet.connect(settings=settings) as client:
        client.attempts.record(agent="closed", action="a", outcome="success", elapsed_s=1.0)
    with pytest.raises(RuntimeError, match=r"record\(\) after close\(\)"):
        client.attempts.record(agent="closed", action="a", outcome="success", elapsed_s=2.0)
    assert client.publisher_stats().after_close == 1
