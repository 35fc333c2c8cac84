"""Nothing recorded is lost when the process ends (issue 9; docs/architecture.md "Write path 1").

Each test runs tests/exit_script.py in a real subprocess against the test broker: it records
N attempts and a runs.emit_event (the fire-and-forget writes), never calls
close(), and ends one way; then every event must be in the view, after a later client has
drained whatever was spooled. Bounds on how long a subprocess may take are generous (it is a
hang, not a slow machine, that they catch); nothing asserts a duration.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest
from fleetlog.services.node.broker import EmbeddedBroker
from fleetlog.services.node.server import Server
from fleetlog.services.writepath.spool import survey

from fleetlog import Fleet, FleetSettings, FleetUnavailable

from .helpers import fleetlog_cmd, wait_until

SCRIPT = str(Path(__file__).with_name("exit_script.py"))
N = 300
HANG_S = 90.0  # a generous bound: a process still running after this hangs


async def run_agent(settings: FleetSettings, way: str, agent: str, *extra: str,
                    sig: signal.Signals | None = None, n: int = N, busy_s: float = 0.0,
                    again: bool = False) -> tuple[int, str]:
    """Run the script; send `sig` once it says it is ready (and `busy_s` later: it works on
    meanwhile), and with `again` once more when it says it is stopping; its exit code and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, SCRIPT, way, settings.nats_url, str(settings.resolved_spool_dir()), agent, str(n), *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        if sig is not None:
            line = await asyncio.wait_for(proc.stdout.readline(), HANG_S)
            assert line.strip() == b"ready", line
            await asyncio.sleep(busy_s)
            proc.send_signal(sig)
            if again:
                line = await asyncio.wait_for(proc.stdout.readline(), HANG_S)
                assert line.strip() == b"stopping", line
                proc.send_signal(sig)
        _out, err = await asyncio.wait_for(proc.communicate(), HANG_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"the agent ({way}) did not exit within {HANG_S}s") from None
    assert proc.returncode is not None
    return proc.returncode, err.decode(errors="replace")


async def counts(client: Fleet, agent: str) -> list[int] | None:
    """(attempts, distinct attempt ids) of `agent` in the views."""
    try:
        answer = await client.sql(
            f"SELECT (SELECT count(*) FROM attempts WHERE agent = '{agent}'),"
            f" (SELECT count(DISTINCT id) FROM attempts WHERE agent = '{agent}')"
        )
    except FleetUnavailable:  # the query service re-subscribes after a broker restart
        return None
    return [int(v) for v in answer.rows[0]]


async def assert_all_in_view(settings: FleetSettings, *agents: str, n: int = N) -> None:
    """A later client (it adopts this fleet's orphaned spools) delivers; every event is in the
    view exactly once, attempts in the order they were recorded; no spool keeps anything."""
    async with Fleet.connect(settings=settings) as client:
        await client.flush(HANG_S)
        for agent in agents:

            async def complete(agent: str = agent) -> list[int] | None:
                c = await counts(client, agent)
                return c if c is not None and c[0] >= n else None

            assert await wait_until(complete, HANG_S) == [n, n]
            order = await client.sql(f"SELECT elapsed_s FROM attempts WHERE agent = '{agent}' ORDER BY seq")
            assert [row[0] for row in order.rows] == [float(i) for i in range(n)]
    left = [d for d in survey(settings.resolved_spool_dir()) if d.records]
    assert left == []


@pytest.mark.parametrize(
    ("way", "sig", "code"),
    [
        ("return", None, 0),  # asyncio.run(main()) returns; no close()
        ("raise", None, 1),  # an unhandled exception ends main()
        ("sigterm", signal.SIGTERM, 143),  # the supervisor stops it: our handler, not SIG_DFL's silent death
        ("sigint", signal.SIGINT, None),  # Ctrl-C (Python re-raises SIGINT: the code is the signal's)
        ("loop-closed", None, 0),  # the application's own loop closed without cancelling anything
        ("after-loop", None, 0),  # recorded after the client's loop ended
        ("sync", None, 0),  # FleetSync: the interpreter shuts down with the loop thread running
        ("sync-sigterm", signal.SIGTERM, 143),  # FleetSync stopped by its supervisor
    ],
)
async def test_every_event_survives_the_end(settings: FleetSettings, server: Server, way: str,
                                            sig: signal.Signals | None, code: int | None) -> None:
    agent = f"exit-{way}"
    returncode, err = await run_agent(settings, way, agent, sig=sig)
    if code is not None:
        assert returncode == code, err
    await assert_all_in_view(settings, agent)


async def test_durable_mode_survives_sigkill(settings: FleetSettings, server: Server) -> None:
    """With `durable`, record() returned only once the event was in the spool file: SIGKILL
    (nothing runs at all) loses nothing; the next client delivers the dead agent's spool."""
    returncode, _err = await run_agent(settings, "sigkill", "exit-durable", "durable", sig=signal.SIGKILL)
    assert returncode == -signal.SIGKILL
    orphans = [d for d in survey(settings.resolved_spool_dir()) if d.records]
    assert [(d.records, d.live) for d in orphans] == [(N + 1, False)]
    await assert_all_in_view(settings, "exit-durable")


async def test_forgotten_close_after_runs_and_runtimes_exits(settings: FleetSettings, server: Server) -> None:
    """The README's runs/runtimes snippet without close(): asyncio.run used to hang at shutdown."""
    returncode, err = await run_agent(settings, "forget", "exit-forget")
    assert returncode == 0, err
    await assert_all_in_view(settings, "exit-forget")


async def test_broker_away_at_exit_is_drained_in_order_later(broker: EmbeddedBroker, settings: FleetSettings,
                                                             server: Server) -> None:
    await broker.stop()
    returncode, err = await run_agent(settings, "return", "exit-away")
    assert returncode == 0, err
    spooled = [d for d in survey(settings.resolved_spool_dir()) if d.records]
    assert [(d.records, d.fleet, d.urls) for d in spooled] == [(N + 1, None, [broker.url])]
    await broker.start()
    await assert_all_in_view(settings, "exit-away")


async def test_a_spool_is_never_drained_into_another_fleet(broker: EmbeddedBroker, settings: FleetSettings,
                                                           tmp_path: Path) -> None:
    """Fleet X's spool (stamped at connect), then fleet Y behind the very same URL: Y leaves it;
    X, back, gets every event."""
    returncode, _err = await run_agent(settings, "sigkill", "exit-x", "durable", sig=signal.SIGKILL)
    assert returncode == -signal.SIGKILL
    [orphan] = [d for d in survey(settings.resolved_spool_dir()) if d.records]
    assert orphan.fleet is not None and orphan.records == N + 1
    await broker.stop()
    other = EmbeddedBroker(tmp_path / "fleet-y", port=broker.port)
    await other.start()
    try:
        async with Fleet.connect(settings=settings) as client_y:
            assert client_y.connected
            assert client_y.foreign_spools == [orphan.name]
            await client_y.flush(HANG_S)
            info = await (await client_y.nats()).jetstream().stream_info("FLEET_ATTEMPTS")
            assert info.state.messages == 0
    finally:
        await other.stop()
    assert [(d.name, d.records) for d in survey(settings.resolved_spool_dir()) if d.records] == [
        (orphan.name, N + 1)]
    await broker.start()
    async with Fleet.connect(settings=settings) as client_x:
        assert client_x.foreign_spools == []
        await client_x.flush(HANG_S)
        info = await (await client_x.nats()).jetstream().stream_info("FLEET_ATTEMPTS")
        assert info.state.messages == N
    assert [d for d in survey(settings.resolved_spool_dir()) if d.records] == []


async def test_two_drainers_share_a_spool_dir(broker: EmbeddedBroker, settings: FleetSettings,
                                              server: Server) -> None:
    """Two orphaned spools, two `fleetlog spool drain` at once: each spool is delivered once."""
    await broker.stop()
    for agent in ("exit-a", "exit-b"):
        returncode, err = await run_agent(settings, "return", agent)
        assert returncode == 0, err
    assert sorted(d.records for d in survey(settings.resolved_spool_dir())) == [N + 1, N + 1]
    await broker.start()
    cmd = [*fleetlog_cmd(), "spool", "drain", "--nats", settings.nats_url, "--json",
           "--spool-dir", str(settings.resolved_spool_dir())]
    env = {**os.environ, "FLEETLOG_DATA_DIR": str(settings.data_dir)}
    procs = [await asyncio.create_subprocess_exec(*cmd, env=env, stdout=asyncio.subprocess.PIPE)
             for _ in range(2)]
    delivered = 0
    for proc in procs:
        out, _ = await asyncio.wait_for(proc.communicate(), HANG_S)
        assert proc.returncode == 0, out
        delivered += int(__import__("json").loads(out)["delivered"])
    assert delivered == 2 * (N + 1)  # no spool was adopted (and published) twice
    await assert_all_in_view(settings, "exit-a", "exit-b")


async def test_emit_attempt_with_the_broker_away_spools(broker: EmbeddedBroker, settings: FleetSettings,
                                                        server: Server) -> None:
    await broker.stop()
    env = {**os.environ, "FLEETLOG_DATA_DIR": str(settings.data_dir),
           "FLEETLOG_SPOOL_DIR": str(settings.resolved_spool_dir())}
    proc = await asyncio.create_subprocess_exec(
        *fleetlog_cmd(), "emit", "attempt", "--nats", settings.nats_url, "--agent", "exit-cli", "--action", "a",
        "--outcome", "success", "--elapsed", "1.5", env=env, stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), HANG_S)
    assert proc.returncode == 0
    assert out.startswith(b"spooled ")
    await broker.start()
    async with Fleet.connect(settings=settings) as client:
        await client.flush(HANG_S)

        async def one() -> list[int] | None:
            c = await counts(client, "exit-cli")
            return c if c is not None and c[0] >= 1 else None

        assert await wait_until(one, HANG_S) == [1, 1]
