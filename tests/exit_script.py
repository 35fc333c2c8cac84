"""An agent that records, then ends one way or another; run by tests/test_exit.py in a subprocess.

    python tests/exit_script.py WAY NATS_URL SPOOL_DIR AGENT N [durable]

It records N attempts (elapsed_s = 0..N-1, in order), one `processors.mark` (keyed by AGENT)
and one `runs.emit_event` (fire-and-forget calls; `snapshots.take` is an awaited, guarded
command since issue 11, so it is not among them), never calls close(), and
ends WAY. For the ways a signal ends it prints "ready" and blocks its event loop
(the sender cannot run: every event is still in memory when the signal comes).
"""

from __future__ import annotations

import asyncio
import sys
import time

from fleetlog import Fleet, FleetSettings, FleetSync


def settings() -> FleetSettings:
    _, _way, url, spool_dir, _agent, _n, *rest = sys.argv
    return FleetSettings(nats_url=url, spool_dir=spool_dir, data_dir=spool_dir + "-data", durable="durable" in rest)


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
    elif way == "sync-sigterm":
        fleet = FleetSync.connect(settings=settings())
        record(fleet)
        print("ready", flush=True)
        time.sleep(60)  # a plain-thread agent at work: SIGTERM ends it here (SystemExit in the main thread)
    else:
        asyncio.run(main(way))


if __name__ == "__main__":
    run()
