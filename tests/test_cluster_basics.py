"""Replicated streams on a real loopback cluster: the replicas setting, `up --cluster`, status,
several URLs, and guarded reads that see the writer's own write on R3."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from fleetlog.services.backbone.guarded import Guarded
from fleetlog.services.backbone.link import connect_once
from fleetlog.services.backbone.streams import ReplicasRefused, ensure_streams, stream_placements
from fleetlog.services.node.broker import EmbeddedBroker, die_with_parent, free_port, probe_nats
from fleetlog.services.node.server import Server

from fleetlog import Fleet, FleetSettings

from .cluster_helpers import cluster_settings, running_cluster
from .helpers import cli_runner, fleetlog_cmd, wait_until


async def test_replicas_setting_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETLOG_STREAM_REPLICAS", "3")
    monkeypatch.setenv("FLEETLOG_NATS_URL", "nats://a:4222, nats://b:4222,nats://c:4222")
    s = FleetSettings()
    assert s.stream_replicas == 3
    assert s.servers() == ["nats://a:4222", "nats://b:4222", "nats://c:4222"]
    monkeypatch.delenv("FLEETLOG_STREAM_REPLICAS")
    assert FleetSettings().stream_replicas == 1


async def test_r3_on_one_server_is_refused_naming_the_setting(broker: EmbeddedBroker, tmp_path: Path) -> None:
    nc = await connect_once([broker.url], "r3-single")
    try:
        with pytest.raises(ReplicasRefused, match="FLEETLOG_STREAM_REPLICAS") as err:
            await ensure_streams(nc, FleetSettings(nats_url=broker.url, data_dir=tmp_path, stream_replicas=3))
        assert "stream_replicas=3" in str(err.value)
        # R1 still works on the same server, and its streams stay R1.
        await ensure_streams(nc, FleetSettings(nats_url=broker.url, data_dir=tmp_path))
        assert {p.replicas for p in await stream_placements(nc)} == {1}
    finally:
        await nc.close()


async def test_existing_r1_streams_are_scaled_to_r3_in_place(tmp_path: Path) -> None:
    async with running_cluster(tmp_path) as nodes:
        nc = await connect_once(nodes.urls, "scale")
        try:
            s = cluster_settings(nodes, tmp_path)
            await ensure_streams(nc, s.model_copy(update={"stream_replicas": 1}))
            placements = await stream_placements(nc)
            assert {p.replicas for p in placements} == {1}
            js = nc.jetstream()
            ack = await js.publish("fleet.state.put.scale.k", b"{}", headers={"Nats-Msg-Id": "scale-1"})
            await ensure_streams(nc, s)  # now R3: the same streams, scaled
            placements = await stream_placements(nc)
            assert {p.replicas for p in placements} == {3}, placements
            names = {n.name for n in nodes.nodes}

            async def led() -> bool:  # each scaled stream elects a leader among the three
                return all(p.leader in names and not p.lagging for p in await stream_placements(nc))

            await wait_until(led, timeout_s=120, interval_s=0.2)
            # A client that does not set the replicas (default 1) leaves them alone.
            await ensure_streams(nc, FleetSettings(nats_url=nodes.nats_url, data_dir=tmp_path / "other"))
            assert {p.replicas for p in await stream_placements(nc)} == {3}
            info = await js.stream_info(ack.stream)
            assert info.state.messages == 1  # nothing lost in the scaling
        finally:
            await nc.close()


async def test_status_shows_replicas_leader_and_lagging_peers(tmp_path: Path) -> None:
    async with running_cluster(tmp_path) as nodes:
        srv = Server(cluster_settings(nodes, tmp_path))
        await srv.start()
        try:
            res = await cli_runner(nodes.nats_url, tmp_path)("status")
            assert res.returncode == 0, res.stderr
            assert "replicas" in res.stdout and "leader" in res.stdout and "lagging" in res.stdout
            row = next(line for line in res.stdout.splitlines() if "FLEET_ATTEMPTS" in line)
            assert re.search(r"\b3\b.*fleetlog-[123]", row), row
            # A node away: its peers' rows name it as lagging (offline or behind).
            victim = next(i for i in range(3) if f"fleetlog-{i + 1}" not in row)
            nodes.kill(victim)

            async def lagging() -> bool:
                out = await cli_runner(nodes.nats_url, tmp_path)("status")
                rows = [ln for ln in out.stdout.splitlines() if "FLEET_ATTEMPTS" in ln]
                return bool(rows) and f"fleetlog-{victim + 1} (" in rows[0]

            await wait_until(lagging, timeout_s=120, interval_s=1.0)
            await nodes.restart(victim, timeout_s=120)
        finally:
            await srv.stop()


async def test_guarded_reads_see_their_own_writes_on_r3(tmp_path: Path) -> None:
    """Reads of a replicated stream go to its leader: right after each acked guarded write, the
    last message of the subject is that write (a follower's direct get could still show the one before)."""
    async with running_cluster(tmp_path) as nodes:
        nc = await connect_once(nodes.urls, "ryw")
        try:
            await ensure_streams(nc, cluster_settings(nodes, tmp_path))
            g = Guarded(nc)
            subject = "fleet.state.put.ryw.counter"
            expected = 0
            for i in range(300):
                _, seq, dup = await g.publish(subject, b'{"i": %d}' % i, msg_id=f"ryw-{i}", expected_last_seq=expected)
                assert not dup
                last = await g.last("FLEET_STATE", subject)
                assert last is not None and last.seq == seq and last.data == b'{"i": %d}' % i
                expected = seq
            got = await g.get("FLEET_STATE", expected)
            assert got is not None and got.subject == subject
            assert await g.next("FLEET_STATE", subject, expected + 1) is None
        finally:
            await nc.close()


async def test_up_cluster_starts_three_nodes_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    """Twice over the same data dir: the second cluster (other route ports) keeps the first one's events."""
    port = free_port()
    for round_no in (1, 2):
        await _up_round(tmp_path, port, tmp_path / f"up-{round_no}.log", expect=round_no)


async def _up_round(tmp_path: Path, port: int, log_path: Path, expect: int) -> None:
    env = {**os.environ, "FLEETLOG_DATA_DIR": str(tmp_path / "up"), "FLEETLOG_REACTORS": "false"}
    with open(log_path, "wb") as log:  # noqa: ASYNC230 - once, before anything runs
        proc = subprocess.Popen([*fleetlog_cmd(), "up", "--cluster", "3", "--port", str(port)],  # noqa: ASYNC220
                                stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent())
    try:
        async def urls() -> list[str]:
            text = log_path.read_text()  # noqa: ASYNC240 - a small log file
            found = re.findall(r"cluster node fleetlog-\d on (nats://[\d.:]+)", text)
            return found if len(found) == 3 else []

        found = await wait_until(urls, timeout_s=120, interval_s=0.2)
        assert found[0] == f"nats://127.0.0.1:{port}"  # the first node on --port
        nats_url = ",".join(found)
        await wait_until(lambda: _said(log_path, "fleetlog serving"), timeout_s=120, interval_s=0.2)
        fleet = await Fleet.connect(nats_url, data_dir=tmp_path / "client", spool_dir=tmp_path / "client-spool")
        try:
            fleet.attempts.record(agent="a", action="b", outcome="success", elapsed_s=1.0)
            token = await fleet.flush(timeout=60)
            page = await fleet.attempts.stats(min_seq=token)  # answered by the services of `up`
            assert sum(s.count for s in page.items) == expect
            nc = await fleet.nats()
            assert {p.replicas for p in await stream_placements(nc)} == {3}
        finally:
            await fleet.close()
    finally:
        proc.send_signal(signal.SIGINT)
        code = await asyncio.to_thread(proc.wait, 60)
    assert code == 0, log_path.read_text()[-2000:]  # noqa: ASYNC240
    for url in found:  # every node stopped with it
        assert probe_nats("127.0.0.1", int(url.rsplit(":", 1)[1])) is None


async def _said(log_path: Path, text: str) -> bool:
    return text in log_path.read_text()  # noqa: ASYNC240 - a small log file
