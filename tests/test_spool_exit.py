"""The exit-safety review's findings (issue 9): each test ends a real agent process (tests/exit_script.py)
against a real broker the way the review found lossy, then counts what reached the streams."""

from __future__ import annotations

import re
import signal

from fleetlog.services.node.broker import EmbeddedBroker
from fleetlog.services.node.server import Server
from fleetlog.services.writepath.spool import survey

from fleetlog import Fleet, FleetSettings

from .test_exit import HANG_S, N, assert_all_in_view, run_agent


def recorded(err: str) -> tuple[int, int]:
    """(accepted, dropped) from the script's last exit handler."""
    match = re.search(r"RECORDED (\d+) (\d+)", err)
    assert match is not None, err
    return int(match.group(1)), int(match.group(2))


async def in_streams(settings: FleetSettings) -> int:
    """Every message in every stream, once a later client has drained the spools."""
    async with Fleet.connect(settings=settings) as client:
        assert client.connected
        await client.flush(HANG_S)
        js = (await client.nats()).jetstream()
        return sum(info.state.messages for info in await js.streams_info())


async def test_sigterm_while_recording_loses_nothing(settings: FleetSettings, broker: EmbeddedBroker) -> None:
    """Finding 1: SIGTERM lands anywhere in a busy agent, the publisher's own work included; the
    exit spill must still see every event (none between the queue and the in-flight table), and
    the process must end. The window is narrow: three agents, their counts summed."""
    total = 0
    for attempt in range(3):
        returncode, err = await run_agent(settings, "busy", f"busy-{attempt}", sig=signal.SIGTERM, busy_s=1.0)
        assert returncode == 143, err
        accepted, dropped = recorded(err)
        assert dropped == 0
        total += accepted
    assert await in_streams(settings) == total


async def test_a_second_sigterm_does_not_cut_the_exit_short(settings: FleetSettings,
                                                            broker: EmbeddedBroker) -> None:
    """Finding 1: a supervisor that sends SIGTERM twice; the second lands in the exit path (the
    agent's main() has ended, the publisher is flushing) and is ignored there."""
    returncode, err = await run_agent(settings, "busy", "busy-twice", sig=signal.SIGTERM, busy_s=1.0, again=True)
    assert returncode == 143, err
    accepted, dropped = recorded(err)
    assert dropped == 0
    assert await in_streams(settings) == accepted


async def test_sigterm_after_main_returned_keeps_its_exit_status(settings: FleetSettings, server: Server) -> None:
    """Finding 9: SIGTERM while Python waits for a non-daemon thread ends the process as SIGTERM
    does (the status a supervisor expects), everything spooled first."""
    returncode, err = await run_agent(settings, "thread-sigterm", "exit-thread", sig=signal.SIGTERM)
    assert returncode == -signal.SIGTERM, err
    await assert_all_in_view(settings, "exit-thread")


async def test_close_after_sigterm_with_everything_spooled_returns(settings: FleetSettings,
                                                                 broker: EmbeddedBroker, server: Server) -> None:
    """Finding 7: after SIGTERM the sender is gone; a close(3600) in a finally must not wait on a
    spool nobody drains (it is bounded by exit_flush_s and stops once the sender has)."""
    await broker.stop()
    returncode, err = await run_agent(settings, "close-late", "exit-close-late", sig=signal.SIGTERM)
    assert returncode == 143, err
    await broker.start()
    await assert_all_in_view(settings, "exit-close-late")


async def test_forgotten_close_delivers_instead_of_spooling(settings: FleetSettings, server: Server) -> None:
    """Finding 6: `asyncio.run` ends right after connect + record; the publisher's own connection
    may still be in its handshake: the exit flush waits for it rather than spooling."""
    returncode, err = await run_agent(settings, "return", "exit-quick")
    assert returncode == 0, err
    assert [d for d in survey(settings.resolved_spool_dir()) if d.records] == []
    await assert_all_in_view(settings, "exit-quick")


async def test_full_disk_never_reaches_the_agent(settings: FleetSettings, broker: EmbeddedBroker) -> None:
    """Finding 4: a file-size limit (ENOSPC stands behind it) while everything spools: record()
    and the exit path never raise; what was kept is delivered later, what was not is counted."""
    await broker.stop()
    returncode, err = await run_agent(settings, "fsize", "exit-fsize", n=3000)
    assert returncode == 0, err
    assert "Traceback" not in err, err
    accepted, dropped = recorded(err)
    assert accepted == 3001 and dropped > 0
    await broker.start()
    assert await in_streams(settings) == accepted - dropped


async def test_daemon_threads_recording_at_exit(settings: FleetSettings, broker: EmbeddedBroker) -> None:
    """Finding 5: FleetSync's daemon threads record on while the interpreter shuts down; whatever
    was accepted is spooled or counted as dropped, never left in memory."""
    returncode, err = await run_agent(settings, "sync-daemon", "exit-daemon")
    assert returncode == 0, err
    accepted, dropped = recorded(err)
    assert accepted > N
    assert await in_streams(settings) == accepted - dropped


async def test_daemon_loop_recording_at_exit(settings: FleetSettings, broker: EmbeddedBroker) -> None:
    """Finding 5: an application's own loop in a daemon thread keeps recording during the exit spill."""
    returncode, err = await run_agent(settings, "daemon-loop", "exit-daemon-loop")
    assert returncode == 0, err
    accepted, dropped = recorded(err)
    assert accepted > N
    assert await in_streams(settings) == accepted - dropped
