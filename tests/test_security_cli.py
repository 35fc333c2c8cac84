"""`fleetlog up --secure` and `fleetlog identities` end to end, as real processes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

from fleetlog.services.backbone.errors import FleetError
from fleetlog.services.node.broker import EmbeddedBroker, die_with_parent, free_port, probe_nats, reload_secure_broker
from fleetlog.services.node.identities import Registry

from fleetlog import Fleet

from .helpers import fleetlog_cmd, wait_until


async def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, [*fleetlog_cmd(), *args], capture_output=True, text=True,
                                   env=env, timeout=120)


async def test_up_secure_identities_add_list_revoke(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "up"
    env = {**os.environ, "FLEETLOG_DATA_DIR": str(data), "FLEETLOG_REACTORS": "false", "NO_COLOR": "1"}
    env.pop("FLEETLOG_NATS_URL", None)
    env.pop("FLEETLOG_CREDENTIALS", None)
    log = open(tmp_path / "up.log", "ab")  # noqa: ASYNC230
    proc = subprocess.Popen([*fleetlog_cmd(), "up", "--secure", "--port", str(port), "--no-http"],  # noqa: ASYNC220
                            stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent())
    url = f"nats://127.0.0.1:{port}"
    admin = data / "broker" / "credentials" / "admin-fleetlog.nk"
    try:
        async def ready() -> bool:
            if not admin.exists():
                return False
            res = await _cli({**env, "FLEETLOG_CREDENTIALS": str(admin)}, "status", "--nats", url, "--json")
            return res.returncode == 0

        await wait_until(ready, timeout_s=60, interval_s=0.3)
        info = probe_nats("127.0.0.1", port)
        assert info is not None and info.get("auth_required")  # no anonymous clients

        anonymous = await _cli(env, "--timeout", "3", "sql", "SELECT 1", "--nats", url)
        assert anonymous.returncode == 5, anonymous.stderr  # Exit.UNAVAILABLE: no connection without credentials

        creds = tmp_path / "agent-a1.nk"
        added = await _cli(env, "identities", "add", "agent", "a1", "--out", str(creds))
        assert added.returncode == 0, added.stderr
        assert "the broker reloaded its permissions" in added.stdout and oct(creds.stat().st_mode)[-3:] == "600"
        seed = creds.read_text().strip()
        assert seed.startswith("SU") and seed not in (data / "broker" / "identities.json").read_text()
        assert seed not in (data / "broker" / "nats.conf").read_text()  # the broker keeps public keys only
        again = await _cli(env, "identities", "add", "agent", "a2", "--out", str(creds))
        assert again.returncode == 2 and "never overwritten" in again.stderr  # nor a live seed lost
        as_agent = {**env, "FLEETLOG_CREDENTIALS": str(creds)}
        own = await _cli(as_agent, "emit", "attempt", "--agent", "a1", "--action", "x", "--outcome", "success",
                         "--elapsed", "1", "--nats", url)
        assert own.returncode == 0 and "spooled" not in own.stdout.lower(), (own.stdout, own.stderr)  # published
        refused = await _cli(as_agent, "--timeout", "2", "sql", "SELECT 1", "--nats", url)
        assert refused.returncode == 4 and "permission denied" in refused.stderr, refused.stderr  # Exit.REFUSED
        answered = await _cli({**env, "FLEETLOG_CREDENTIALS": str(admin)}, "sql",
                              "SELECT agent, count(*) FROM attempts GROUP BY 1", "--nats", url, "--json")
        assert answered.returncode == 0 and json.loads(answered.stdout)["rows"] == [["a1", 1]]

        bad = await _cli(env, "identities", "add", "agent", "a.b")
        assert bad.returncode == 2 and "name: 'a.b'" in bad.stderr
        listed = json.loads((await _cli(env, "identities", "list", "--json")).stdout)
        assert {(u["user"], u["role"]) for u in listed} == {
            ("admin-fleetlog", "admin"), ("service-fleetlog", "service"), ("agent-a1", "agent")}
        assert all(u["nkey"].startswith("U") and "seed" not in u for u in listed)
        revoked = await _cli(env, "identities", "revoke", "agent-a1")
        assert revoked.returncode == 0 and "revoked" in revoked.stdout
        gone = await _cli(as_agent, "--timeout", "3", "emit", "attempt", "--agent", "a1", "--action", "x",
                          "--outcome", "success", "--elapsed", "1", "--nats", url)
        assert gone.returncode == 0 and "spooled" in gone.stdout.lower(), (gone.stdout, gone.stderr)  # not stored
        after = await _cli({**env, "FLEETLOG_CREDENTIALS": str(admin)}, "sql", "SELECT count(*) FROM attempts",
                           "--nats", url, "--json")
        assert json.loads(after.stdout)["rows"] == [[1]]
        missing = await _cli(env, "identities", "revoke", "agent-a1")
        assert missing.returncode == 3
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 30)
        log.close()


async def test_serve_with_credentials_on_a_secure_broker(tmp_path: Path) -> None:
    """`fleetlog serve --credentials FILE` against a broker it did not start: without them it
    cannot connect; with the service's it folds and answers (an agent's attempt, asked by a reader)."""
    broker = EmbeddedBroker(tmp_path / "broker", port=free_port(), secure=True)
    await broker.start()
    registry = Registry(broker.data_dir)
    agent, reader = tmp_path / "a1.nk", tmp_path / "r1.nk"
    registry.add("agent", "a1", out=agent)
    registry.add("reader", "r1", out=reader)
    assert await reload_secure_broker(broker.data_dir)
    env = {**os.environ, "FLEETLOG_BATCH_WAIT_S": "0.01", "FLEETLOG_REACTORS": "false", "NO_COLOR": "1"}
    env.pop("FLEETLOG_CREDENTIALS", None)
    log = open(tmp_path / "serve.log", "ab")  # noqa: ASYNC230
    proc = subprocess.Popen(  # noqa: ASYNC220
        [*fleetlog_cmd(), "serve", "--nats", broker.url, "--data-dir", str(tmp_path / "serve"), "--no-http",
         "--credentials", str(broker.credentials_path("service-fleetlog"))],
        stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent())
    try:
        async with Fleet.connect(broker.url, credentials=reader, spool_dir=tmp_path / "sr", ensure=False) as r1:
            async def serving() -> bool:
                try:
                    await r1.status(timeout=2)
                except FleetError:
                    return False
                return True

            await wait_until(serving, timeout_s=60, interval_s=0.3)  # serve made the streams and answers
            async with Fleet.connect(broker.url, credentials=agent, spool_dir=tmp_path / "sa", ensure=False) as a1:
                a1.attempts.record(agent="a1", action="x", outcome="success", elapsed_s=1.0)
                token = await a1.flush(timeout=60)
                assert a1.publisher_stats().acked == 1
            page = await r1.attempts.query(min_seq=token)
            assert [r.agent for r in page.items] == ["a1"]
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 30)
        log.close()
        await broker.stop()
