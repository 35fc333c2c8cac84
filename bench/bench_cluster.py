"""R1 on one node vs R3 on a 3-node loopback cluster (issue 17), in the same run: acked publish
rate and claim rate; and R3 with `sync_interval: always` (every write fsynced) for its cost.

Per setup: the broker(s) on free ports in a temp dir, streams created with the setup's
replicas, `fleetlog serve` in its own process (projector + query service). Publish: one
client records N attempts fire-and-forget and flushes; the rate is N / (first record ->
last ack). Claims: R runs created queued, C claimer processes (tests/run_claimer.py) start
together and claim until nothing is left; the rate is R / the slowest claimer's time.
Everything shares the machine's 2 cores: 3 nats-servers, serve, the client, the claimers.

    python bench/bench_cluster.py [--attempts 100000] [--runs 2000] [--claimers 8]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit_json, machine, serve_subprocess, settings_for, stop_subprocess, table, wait_service
from fleetlog.services.node.broker import EmbeddedBroker, die_with_parent, free_port
from fleetlog.services.node.cluster import LocalCluster

from fleetlog import Fleet

CLAIMER = Path(__file__).resolve().parent.parent / "tests" / "run_claimer.py"
SETUPS = (("R1, one node", 1, False), ("R3, 3-node cluster", 3, False), ("R3, sync_interval always", 3, True))


@contextlib.asynccontextmanager
async def nats_for(work: Path, replicas: int, sync_always: bool) -> AsyncIterator[str]:
    if replicas == 1:
        b = EmbeddedBroker(work / "broker", port=free_port())
        await b.start()
        try:
            yield b.url
        finally:
            await b.stop()
        return
    nodes = LocalCluster(work / "cluster", 3, free_port(), sync_always=sync_always)
    await nodes.start(timeout_s=120)
    try:
        yield nodes.nats_url
    finally:
        await nodes.stop()


async def one_setup(work: Path, replicas: int, sync_always: bool, attempts: int, runs: int,
                    claimers: int) -> dict[str, Any]:
    async with nats_for(work, replicas, sync_always) as url:
        settings = settings_for(url, work / "client", stream_replicas=replicas)
        fleet = await Fleet.connect(settings=settings, name="bench-cluster")  # creates the streams
        serve = serve_subprocess(url, work / "serve", work / "serve.log")
        try:
            await wait_service(fleet, timeout=120)
            t0 = time.perf_counter()
            for i in range(attempts):
                fleet.attempts.record(agent=f"agent-{i % 50}", action=f"action-{i % 20}", outcome="success",
                                      elapsed_s=i % 97 / 10)
                if i % 1000 == 0:
                    await asyncio.sleep(0)
            await fleet.flush(timeout=600)
            publish_s = time.perf_counter() - t0
            for start in range(0, runs, 200):
                await asyncio.gather(*(fleet.runs.create(f"run-{i:05d}", "runner", status="queued", priority=i % 4)
                                       for i in range(start, min(start + 200, runs))))
            start_at = time.time() + 3.0
            procs = [subprocess.Popen([sys.executable, str(CLAIMER), url, f"rt-{n}", str(work / f"c{n}.json"),  # noqa: ASYNC220
                                       str(work / f"spool{n}"), str(start_at)], preexec_fn=die_with_parent())
                     for n in range(claimers)]
            for p in procs:
                await asyncio.to_thread(p.wait, 900)
            results = [json.loads((work / f"c{n}.json").read_text()) for n in range(claimers)]
        finally:
            await fleet.close()
            stop_subprocess(serve)
    claimed = sum(len(r["claims"]) for r in results)
    return {
        "publish_per_s": attempts / publish_s,
        "claims_per_s": claimed / max(r["elapsed_s"] for r in results),
        "claimed": claimed,
        "conflicts": sum(r["conflicts"] for r in results),
        "load_after": os.getloadavg()[0],
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attempts", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=2_000)
    ap.add_argument("--claimers", type=int, default=8)
    args = ap.parse_args()
    results: dict[str, Any] = {"machine": machine(), "load_before": os.getloadavg()[0]}
    rows = []
    for label, replicas, sync_always in SETUPS:
        work = Path(tempfile.mkdtemp(prefix="fleetlog-bench-cluster-"))
        try:
            r = await one_setup(work, replicas, sync_always, args.attempts, args.runs, args.claimers)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        results[label] = r
        rows.append((label, f"{r['publish_per_s']:,.0f}", f"{r['claims_per_s']:,.0f}", r["claimed"],
                     r["conflicts"], f"{r['load_after']:.2f}"))
    print(table(rows, ("setup", "acked publish/s", "claims/s", "claimed", "conflicts", "load 1m after")))
    emit_json("bench_cluster", results)


if __name__ == "__main__":
    asyncio.run(main())
