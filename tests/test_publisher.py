"""The no-loss publisher: offline start, spool, orphan adoption, bounded memory."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fleetlog.schemas import AttemptRecorded, new_event_id, now_iso
from fleetlog.services.node.broker import EmbeddedBroker, find_nats_server, free_port
from fleetlog.services.node.server import Server

from fleetlog import Fleet, FleetSettings, FleetUnavailable, FleetValidationError

from .helpers import wait_until


async def test_agent_starts_before_its_broker(tmp_path: Path) -> None:
    """No broker at connect: record() still works, events spool, and drain once the broker comes."""
    port = free_port()
    settings = FleetSettings(nats_url=f"nats://127.0.0.1:{port}", data_dir=tmp_path / "d",
                             spool_dir=tmp_path / "spool", batch_wait_s=0.01)
    fleet = await Fleet.connect(settings=settings)
    assert not fleet.connected
    receipts = [fleet.attempts.record(agent="early", action="a", outcome="success", elapsed_s=i) for i in range(500)]
    await asyncio.sleep(0.3)
    stats = fleet.publisher_stats()
    assert stats.acked == 0
    assert stats.spool_pending + stats.queued == 500

    broker = EmbeddedBroker(tmp_path / "broker", port=port)
    await broker.start()
    server = Server(settings)
    try:
        await server.start()
        token = await fleet.flush(timeout=60)
        page = await fleet.attempts.query(agent="early", limit=1000, min_seq=token)
        assert sorted(r.id for r in page.items) == sorted(r.id for r in receipts)
        # in order: the spool drains oldest first, so stream order = record order
        by_time = [r.id for r in sorted(page.items, key=lambda r: r.ts)]
        assert by_time == [r.id for r in receipts]
    finally:
        await fleet.close()
        await server.stop()
        await broker.stop()


async def test_spool_cap_drops_and_counts(tmp_path: Path) -> None:
    """Past the spool's disk cap events are dropped and counted; record() never raises or blocks."""
    settings = FleetSettings(nats_url=f"nats://127.0.0.1:{free_port()}", data_dir=tmp_path / "d",
                             spool_dir=tmp_path / "spool", spool_max_bytes=1 << 20, publish_queue_max=100)
    fleet = await Fleet.connect(settings=settings)
    try:
        for i in range(20_000):
            fleet.attempts.record(agent="capped", action="a", outcome="success", elapsed_s=i, extras={"pad": "x" * 200})
        await asyncio.sleep(0.5)
        stats = fleet.publisher_stats()
        assert stats.accepted == 20_000
        assert stats.dropped_spool_full > 0
        assert stats.spool_pending + stats.queued + stats.dropped_spool_full == 20_000
        spool_bytes = sum(p.stat().st_size for p in (tmp_path / "spool").rglob("seg-*.log"))
        assert spool_bytes <= 1 << 20
    finally:
        await fleet.close(timeout=0.5)


async def test_spool_of_a_killed_agent_is_adopted(broker: EmbeddedBroker, settings: FleetSettings,
                                                  server: Server, tmp_path: Path) -> None:
    """An agent SIGKILLed while its broker was away leaves a spool; the next client of that
    broker (the same URL set: the spool was never stamped with a fleet) publishes it."""
    await broker.stop()
    script = textwrap.dedent(f"""
        import asyncio, os, sys
        from fleetlog import Fleet, FleetSettings
        async def main():
            s = FleetSettings(nats_url="{broker.url}", spool_dir=r"{tmp_path / 'shared-spool'}",
                              data_dir=r"{tmp_path / 'agent'}")
            fleet = await Fleet.connect(settings=s)
            for i in range(2000):
                fleet.attempts.record(agent="orphan", action="a", outcome="success", elapsed_s=i)
            while fleet.publisher_stats().spool_pending < 2000:
                await asyncio.sleep(0.05)
            print("spooled", flush=True)
            await asyncio.sleep(60)
        asyncio.run(main())
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)  # noqa: ASYNC220
    assert proc.stdout is not None
    line = await asyncio.to_thread(proc.stdout.readline)
    assert line.strip() == b"spooled"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    await broker.start()

    adopter = await Fleet.connect(settings=settings.model_copy(update={"spool_dir": tmp_path / "shared-spool"}))
    try:
        token = await adopter.flush(timeout=60)
        assert adopter.publisher_stats().spooled >= 2000
        for _ in range(100):  # the server's query service re-subscribes after the broker's restart
            try:
                await adopter.status()
                break
            except FleetUnavailable:
                await asyncio.sleep(0.2)
        summary = await adopter.attempts.summarize("orphan", limit=5000, min_seq=token)
        assert summary.counts == {"a:success": 2000}
    finally:
        await adopter.close()
    leftovers = [p for p in (tmp_path / "shared-spool").iterdir() if p.is_dir()]
    assert leftovers == []


async def test_bad_input_raises_and_publishes_nothing(fleet: Fleet) -> None:
    for kwargs, field in [
        ({"agent": "", "action": "a", "outcome": "o", "elapsed_s": 1}, "agent"),
        ({"agent": "a", "action": None, "outcome": "o", "elapsed_s": 1}, "action"),
        ({"agent": "a", "action": "b", "outcome": 3, "elapsed_s": 1}, "outcome"),
        ({"agent": "a", "action": "b", "outcome": "o", "elapsed_s": "1"}, "elapsed_s"),
        ({"agent": "a", "action": "b", "outcome": "o", "elapsed_s": -0.1}, "elapsed_s"),
        ({"agent": "a", "action": "b", "outcome": "o", "elapsed_s": float("nan")}, "elapsed_s"),
        ({"agent": "a", "action": "b", "outcome": "o", "elapsed_s": True}, "elapsed_s"),
        ({"agent": "a", "action": "b", "outcome": "o", "elapsed_s": 1, "ts": "noon"}, "ts"),
        ({"agent": "a", "action": "b", "outcome": "o", "elapsed_s": 1, "extras": {"s": object()}}, "extras"),
        ({"agent": "a", "action": "b", "outcome": "o", "elapsed_s": 1, "extras": {"x": "y" * 600_000}}, "event"),
    ]:
        try:
            fleet.attempts.record(**kwargs)
        except FleetValidationError as exc:
            assert exc.field == field, (kwargs, exc)
            assert field in str(exc)
        else:
            raise AssertionError(f"no error for {kwargs}")
    assert fleet.publisher_stats().accepted == 0


async def test_receipt_and_flush_expose_the_token(fleet: Fleet) -> None:
    receipts = [fleet.attempts.record(agent="t", action="a", outcome="success", elapsed_s=1) for _ in range(10)]
    token = await fleet.flush()
    seqs = [r.position.seq for r in receipts if r.position]
    assert len(seqs) == 10 and seqs == sorted(seqs)
    assert token["FLEET_ATTEMPTS"] == max(seqs)
    assert receipts[-1].token == {"FLEET_ATTEMPTS": max(seqs)}
    await wait_until(lambda: _true(), timeout_s=1)


async def _true() -> bool:
    return True


async def test_record_checks_every_wire_rule_at_the_call(fleet: Fleet) -> None:
    """record() no longer re-decodes the encoded event: each rule of the event's schema is
    checked in Python instead, and still names the field. Nothing is published."""
    ok: dict[str, Any] = {"agent": "a", "action": "b", "outcome": "o", "elapsed_s": 1.0}
    cases = [
        ("agent", {**ok, "agent": "x" * 257}),
        ("action", {**ok, "action": "x" * 257}),
        ("outcome", {**ok, "outcome": "x" * 1025}),
        ("ts", {**ok, "ts": "20260101"}),               # ISO (basic format) but shorter than the schema allows
        ("agent", {**ok, "agent": "bad\ud800"}),        # a lone surrogate: not encodable text
        ("outcome", {**ok, "outcome": "\udfff"}),
        ("pane_before", {**ok, "pane_before": "tail \ud800"}),
        ("pane_after", {**ok, "pane_after": {"format": "full", "text": "t", "extra": object()}}),
        ("extras", {**ok, "extras": {"k": object()}}),
        ("elapsed_s", {**ok, "elapsed_s": 10**400}),
    ]
    for field, kwargs in cases:
        with pytest.raises(FleetValidationError) as info:
            fleet.attempts.record(**kwargs)
        assert info.value.field == field, (kwargs, info.value)
    assert fleet.publisher_stats().accepted == 0
    # the limits themselves are fine
    receipt = fleet.attempts.record(agent="x" * 256, action="y" * 256, outcome="z" * 1024, elapsed_s=0,
                                    ts="2026-01-01")
    token = await fleet.flush()
    page = await fleet.attempts.query(agent="x" * 256, min_seq=token)
    assert [(r.id, r.ts, len(r.outcome)) for r in page.items] == [(receipt.id, "2026-01-01", 1024)]


async def test_record_keeps_arguments_as_they_were_at_the_call(fleet: Fleet) -> None:
    """The sender encodes later; a dict the caller changes after record() must not change the event."""
    extras: dict[str, Any] = {"n": 0, "tags": ["a"]}
    pane = {"format": "ansi", "text": "before", "meta": {"rows": 24}}
    first = fleet.attempts.record(agent="snap", action="a", outcome="success", elapsed_s=1, extras=extras,
                                  pane_before=pane)
    extras["n"] = 1
    extras["tags"].append("b")
    pane["meta"]["rows"] = 99  # type: ignore[index]
    second = fleet.attempts.record(agent="snap", action="a", outcome="success", elapsed_s=2, extras=extras)
    token = await fleet.flush()
    rows = {r.id: r for r in (await fleet.attempts.query(agent="snap", min_seq=token)).items}
    assert rows[first.id].extras == {"n": 0, "tags": ["a"]}
    assert rows[first.id].pane_before == {"format": "ansi", "text": "before", "meta": {"rows": 24}}
    assert rows[second.id].extras == {"n": 1, "tags": ["a", "b"]}


async def test_emit_of_a_caller_built_event_is_still_fully_validated(fleet: Fleet) -> None:
    """Only the typed APIs skip the validating decode; emit() of any struct keeps it."""
    bad = AttemptRecorded(id="not-a-uuid", ts=now_iso(), agent="a", action="b", outcome="o", elapsed_s=1.0)
    with pytest.raises(FleetValidationError) as info:
        fleet.emit(bad)
    assert info.value.field == "id"
    negative = AttemptRecorded(id=new_event_id(), ts=now_iso(), agent="a", action="b", outcome="o", elapsed_s=-1.0)
    with pytest.raises(FleetValidationError) as info:
        fleet.emit(negative)
    assert info.value.field == "elapsed_s"
    assert fleet.publisher_stats().accepted == 0


async def test_event_over_the_servers_max_payload_is_set_aside_not_retried(settings: FleetSettings,
                                                                         server: Server, tmp_path: Path) -> None:
    """max_event_bytes set above what the server takes: that event goes to dead-letter.jsonl at once
    (it could never be published), and the events around it are published."""
    spool = tmp_path / "big-spool"
    fleet = await Fleet.connect(settings=settings.model_copy(update={"max_event_bytes": 4 << 20,
                                                                      "spool_dir": spool}))
    try:
        before = fleet.attempts.record(agent="big", action="a", outcome="success", elapsed_s=1)
        huge = fleet.attempts.record(agent="big", action="a", outcome="success", elapsed_s=2,
                                     extras={"blob": "x" * (2 << 20)})
        after = fleet.attempts.record(agent="big", action="a", outcome="success", elapsed_s=3)
        token = await fleet.flush(timeout=30)
        stats = fleet.publisher_stats()
        assert (stats.acked, stats.dead_lettered, stats.spool_pending) == (2, 1, 0)
        assert huge.position is None and before.position is not None and after.position is not None
        [line] = (spool / "dead-letter.jsonl").read_text().splitlines()
        entry = json.loads(line)
        assert entry["id"] == huge.id and "max_payload" in entry["reason"]
        assert json.loads(entry["payload"])["extras"]["blob"] == "x" * (2 << 20)
        page = await fleet.attempts.query(agent="big", min_seq=token)
        assert sorted(r.id for r in page.items) == sorted([before.id, after.id])
    finally:
        await fleet.close()


def test_now_iso_is_the_isoformat_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """now_iso() caches the seconds prefix; its text must stay datetime.isoformat()'s, zero µs included."""
    from fleetlog.schemas import _base

    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    for ns in (1_700_000_000_000_000_000, 1_700_000_000_000_001_000, 1_700_000_000_000_999_999,
               1_700_000_000_999_999_999, 1_700_000_001_000_000_000, 1_700_000_001_123_456_789,
               1_700_000_000_500_000_000):  # and back to an earlier second
        monkeypatch.setattr(_base.time, "time_ns", lambda ns=ns: ns)
        assert now_iso() == (epoch + timedelta(microseconds=ns // 1000)).isoformat(), ns


async def test_a_lone_event_is_sent_without_flush(fleet: Fleet) -> None:
    """The sender waits a moment to batch a short run, but never for a flush."""
    receipt = fleet.attempts.record(agent="lone", action="a", outcome="success", elapsed_s=1)

    async def acked() -> bool:
        return receipt.position is not None

    await wait_until(acked, timeout_s=10, interval_s=0.01)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
async def test_publishing_to_a_tls_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tls:// URLs: the publisher's own connection upgrades to TLS like nats-py's (default SSL
    context, so the CA comes from SSL_CERT_FILE here), and every event is acked."""
    ca_key, ca_crt, key, csr, crt = (tmp_path / n for n in ("ca.key", "ca.crt", "s.key", "s.csr", "s.crt"))
    ext = tmp_path / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    for cmd in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca_crt, "-days", "2",
         "-subj", "/CN=fleetlog-test-ca"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-CAcreateserial", "-out", crt,
         "-days", "2", "-extfile", ext],
    ):
        subprocess.run(["openssl", *map(str, cmd)], check=True, capture_output=True)  # noqa: ASYNC221
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_crt))
    port = free_port()
    log = open(tmp_path / "nats.log", "wb")  # noqa: ASYNC230
    proc = subprocess.Popen([find_nats_server(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd",  # noqa: ASYNC220
                             str(tmp_path / "js"), "--tls", "--tlscert", str(crt), "--tlskey", str(key)],
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    url = f"tls://127.0.0.1:{port}"
    try:
        settings = FleetSettings(nats_url=url, data_dir=tmp_path / "d", spool_dir=tmp_path / "spool")
        fleet = await Fleet.connect(settings=settings)
        try:
            receipts = [fleet.attempts.record(agent="tls", action="a", outcome="success", elapsed_s=i)
                        for i in range(100)]
            token = await fleet.flush(timeout=60)
            assert fleet.publisher_stats().acked == 100
            assert all(r.position is not None for r in receipts)
            assert token["FLEET_ATTEMPTS"] == 100
        finally:
            await fleet.close()
    finally:
        proc.terminate()
        proc.wait(10)


async def test_publishing_with_user_and_password_in_the_url(tmp_path: Path) -> None:
    """nats://user:pass@host URLs authenticate the publisher's connection too; a wrong password
    publishes nothing and raises nothing (the events wait in the spool)."""
    port = free_port()
    proc = subprocess.Popen([find_nats_server(), "-a", "127.0.0.1", "-p", str(port), "-js",  # noqa: ASYNC220
                             "-sd", str(tmp_path / "js"), "--user", "agent", "--pass", "s3cret"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        good = FleetSettings(nats_url=f"nats://agent:s3cret@127.0.0.1:{port}", data_dir=tmp_path / "d",
                             spool_dir=tmp_path / "spool")
        fleet = await Fleet.connect(settings=good)
        try:
            fleet.attempts.record(agent="auth", action="a", outcome="success", elapsed_s=1)
            token = await fleet.flush(timeout=30)
            assert token == {"FLEET_ATTEMPTS": 1} and fleet.publisher_stats().acked == 1
        finally:
            await fleet.close()
        bad = good.model_copy(update={"nats_url": f"nats://agent:wrong@127.0.0.1:{port}"})
        fleet = await Fleet.connect(settings=bad)
        try:
            fleet.attempts.record(agent="auth", action="a", outcome="success", elapsed_s=2)
            with pytest.raises(TimeoutError):
                await fleet.flush(timeout=1.5)
            stats = fleet.publisher_stats()
            assert stats.acked == 0 and stats.spool_pending + stats.queued == 1
        finally:
            await fleet.close(timeout=0.2)
    finally:
        proc.terminate()
        proc.wait(10)
