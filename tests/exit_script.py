"""An agent that records, then ends one way or another; run by tests/test_exit.py in a subprocess.

    python tests/exit_script.py WAY NATS_URL SPOOL_DIR AGENT N [durable]

It records N attempts (elapsed_s = 0..N-1, in order) and one `runs.emit_event` (the
fire-and-forget calls; `snapshots.take` is an awaited, guarded command since issue 11), never calls close(), and
ends WAY. For the ways a signal ends it prints "ready" and blocks its event loop
(the sender cannot run: every event is still in memory when the signal comes).

The ways that keep recording while the process ends ("busy", "sync-daemon", "daemon-loop")
print `RECORDED <accepted> <dropped>` on stderr from the very last exit handler, once the
recording has stopped: every accepted event not counted as dropped must reach the stream.
"""

from __future__ import annotations

import asyncio
import atexit
import resource
import signal
import sys
import threading
import time
from typing import Any

_stop = threading.Event()
_stopped = threading.Event()
_clients: list[Any] = []


def _report() -> None:
    """Registered before fleetlog is imported: runs after fleetlog's own exit hook."""
    if not _clients:
        return
    _stop.set()
    _stopped.wait(10)
    stats = _clients[0].publisher_stats()
    sys.stderr.write(f"RECORDED {stats.accepted} {stats.dropped_spool_full}\n")
    sys.stderr.flush()


atexit.register(_report)

from fleetlog import Fleet, FleetSettings, FleetSync  # noqa: E402


def settings(**extra: Any) -> FleetSettings:
    _, _way, url, spool_dir, _agent, _n, *rest = sys.argv
    return FleetSettings(nats_url=url, spool_dir=spool_dir, data_dir=spool_dir + "-data", durable="durable" in rest,
                         **extra)


def record_forever(fleet: Fleet | FleetSync) -> None:
    """A busy agent in a thread: records until the last exit handler stops it."""
    agent = sys.argv[4]
    i = 0
    while not _stop.is_set():
        fleet.attempts.record(agent=agent, action="exit-test", outcome="success", elapsed_s=float(i))
        i += 1
    _stopped.set()


def record(fleet: Fleet | FleetSync) -> None:
    agent, n = sys.argv[4], int(sys.argv[5])
    for i in range(n):
        fleet.attempts.record(agent=agent, action="exit-test", outcome="success", elapsed_s=float(i))
    fleet.runs.emit_event(f"run-{agent}", 1, "token", {"t": "x"})


def block_until_signalled() -> None:
    print("ready", flush=True)
    task = asyncio.current_task()
    for _ in range(600):  # a busy agent: blocks its loop; a SIGTERM ends it here (SystemExit)
        time.sleep(0.1)
        if task is not None and task.cancelling():  # SIGINT under asyncio.run: main cancelled
            return


async def connect() -> Fleet:
    fleet: Fleet = await Fleet.connect(settings=settings())
    return fleet


async def main(way: str) -> None:
    fleet = await Fleet.connect(settings=settings())
    record(fleet)
    if way == "raise":
        raise RuntimeError("the agent failed")
    if way in ("sigterm", "sigint", "sigkill"):
        block_until_signalled()
        await asyncio.sleep(0)  # where a cancelled main ends (SIGINT)
    if way == "busy":
        # An agent recording in a tight loop when SIGTERM comes (the signal lands anywhere,
        # the publisher's own work included).
        _clients.append(fleet)
        _stopped.set()  # nothing records once the loop has ended
        await fleet.flush()
        print("ready", flush=True)
        i = 0
        try:
            while True:
                for _ in range(300):
                    fleet.attempts.record(agent=sys.argv[4], action="exit-test", outcome="success",
                                          elapsed_s=float(i))
                    i += 1
                await asyncio.sleep(0)
        finally:
            print("stopping", flush=True)
    if way == "close-late":
        # SIGTERM with everything spooled (broker away), and a close() with a long timeout on the way out.
        try:
            print("ready", flush=True)
            await asyncio.sleep(600)
        finally:
            await fleet.close(3600)
    if way == "forget":
        # The README's runs/runtimes snippet: fire-and-forget, then main() ends without close().
        await fleet.runtimes.register(f"rt-{sys.argv[4]}")
        await fleet.runtimes.heartbeat(f"rt-{sys.argv[4]}", metadata={"load": 0.3})


def run() -> None:
    way = sys.argv[1]
    if way == "loop-closed":
        # An application's own loop, closed without close() and without cancelling the tasks.
        loop = asyncio.new_event_loop()
        loop.run_until_complete(main(way))
        loop.close()
    elif way == "after-loop":
        # The loop that ran the client ended (asyncio.run returned); the script records on.
        record(asyncio.run(connect()))
    elif way == "sync":
        fleet = FleetSync.connect(settings=settings())
        record(fleet)  # and the interpreter shuts down with the loop thread still running
    elif way == "fsize":
        # A full disk (a file-size limit stands for ENOSPC): the broker is away, events spool.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        fleet = FleetSync.connect(settings=settings(publish_queue_max=50))
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        _clients.append(fleet)
        _stopped.set()
        record(fleet)
        print("no exception", flush=True)
    elif way == "sync-daemon":
        # Daemon threads still recording when the script ends.
        fleet = FleetSync.connect(settings=settings())
        _clients.append(fleet)
        record(fleet)
        threading.Thread(target=record_forever, args=(fleet,), daemon=True).start()
        time.sleep(0.3)
    elif way == "daemon-loop":
        # The application's own loop in a daemon thread (not FleetSync), recording on it.
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()
        fleet = asyncio.run_coroutine_threadsafe(connect(), loop).result()
        _clients.append(fleet)
        record(fleet)

        async def agent() -> None:
            i = 0
            while not _stop.is_set():
                for _ in range(200):
                    fleet.attempts.record(agent=sys.argv[4], action="exit-test", outcome="success", elapsed_s=float(i))
                    i += 1
                await asyncio.sleep(0)
            _stopped.set()

        asyncio.run_coroutine_threadsafe(agent(), loop)
        time.sleep(0.3)
    elif way == "thread-sigterm":
        # main() has returned; Python waits for a non-daemon thread when SIGTERM comes.
        fleet = FleetSync.connect(settings=settings())
        record(fleet)

        def worker() -> None:
            threading.main_thread().join()  # returns once the interpreter is shutting down
            print("ready", flush=True)
            time.sleep(600)

        threading.Thread(target=worker).start()
    elif way == "sync-sigterm":
        fleet = FleetSync.connect(settings=settings())
        record(fleet)
        print("ready", flush=True)
        time.sleep(60)  # a plain-thread agent at work: SIGTERM ends it here (SystemExit in the main thread)
    else:
        asyncio.run(main(way))


if __name__ == "__main__":
    run()
