"""Run ledger (issue 3): claims/s with 8 concurrent claimer processes, and append_event throughput.

Targets on this 2-core machine: >= 1,000 claims/s with 8 claimers over 10,000 queued runs,
0 double claims; fire-and-forget append_event for one run >= 20,000 events/s.

A private nats-server and `fleetlog serve` (projector + query service) in their own
processes; 10,000 runs created with mixed priorities; 8 claimer processes
(tests/run_claimer.py) start together and claim until nothing is left. Then one
holder appends N result events to its run with `emit_event` (fire-and-forget) and
flushes; the rate is N / (first emit -> last ack), and the fold rate is N / (first
emit -> the view holds all N).

    python bench/bench_runs.py [--runs 10000] [--claimers 8] [--events 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    broker,
    emit_json,
    percentiles,
    serve_subprocess,
    settings_for,
    stop_subprocess,
    table,
    wait_service,
)

from fleetlog import Fleet

CLAIMER = Path(__file__).resolve().parent.parent / "tests" / "run_claimer.py"


async def claim_race(fleet: Fleet, url: str, work: Path, runs: int, claimers: int,
                     serve_pid: int) -> dict[str, Any]:
    priorities = (0, 1, 5, 9)
    ids = [f"run-{i:06d}" for i in range(runs)]
    t0 = time.perf_counter()
    for start in range(0, runs, 500):
        await asyncio.gather(*(
            fleet.runs.create(r, "runner", status="queued", priority=priorities[i % 4])
            for i, r in enumerate(ids[start:start + 500], start)
        ))
    create_s = time.perf_counter() - t0
    start_at = time.time() + 3.0
    import psutil

    serve, nats_proc = psutil.Process(serve_pid), _nats_process()
    cpu0 = (serve.cpu_times(), nats_proc.cpu_times() if nats_proc else None)
    argv = [[sys.executable, str(CLAIMER), url, f"rt-{n}", str(work / f"claims-{n}.json"), str(work / f"spool-{n}"),
             str(start_at)] for n in range(claimers)]
    procs = [subprocess.Popen(a) for a in argv]  # noqa: ASYNC220 - started here, waited for in threads
    for p in procs:
        await asyncio.to_thread(p.wait)
    results = [json.loads((work / f"claims-{n}.json").read_text()) for n in range(claimers)]
    claimed = [c[0] for r in results for c in r["claims"]]
    serve_cpu = sum(serve.cpu_times()[:2]) - sum(cpu0[0][:2])
    nats_cpu = sum(nats_proc.cpu_times()[:2]) - sum(cpu0[1][:2]) if nats_proc and cpu0[1] else None
    latencies_ms = [c[3] * 1000 for r in results for c in r["claims"]]
    wall = max(r["elapsed_s"] for r in results)
    conflicts = sum(r["conflicts"] for r in results)
    lat = percentiles(latencies_ms, (50, 99))
    return {
        "runs": runs, "claimers": claimers, "create_per_s": round(runs / create_s),
        "claimed": len(claimed), "distinct": len(set(claimed)), "double_claims": len(claimed) - len(set(claimed)),
        "missing": runs - len(set(claimed)), "claims_per_s": round(len(claimed) / wall),
        "conflicts": conflicts, "conflicts_per_claim": round(conflicts / max(1, len(claimed)), 3),
        "fetches": sum(r["fetches"] for r in results),
        "skipped_proposals": sum(r["stale_candidates"] for r in results),
        "claimer_cpu_s": round(sum(r["cpu_s"] for r in results), 1),
        "serve_cpu_s": round(serve_cpu, 1), "nats_cpu_s": None if nats_cpu is None else round(nats_cpu, 1),
        "claim_ms_p50": round(lat["p50"], 2), "claim_ms_p99": round(lat["p99"], 2),
    }


def _nats_process() -> Any:
    import os

    import psutil

    for child in psutil.Process(os.getpid()).children():
        if "nats-server" in child.name():
            return child
    return None


async def append_rate(fleet: Fleet, n: int) -> dict[str, Any]:
    await fleet.runs.create("append-bench", "runner", status="queued", priority=100)
    claim = await fleet.runs.claim_next("rt-append", lease_s=3600)
    assert claim is not None and claim.run_id == "append-bench"
    t0 = time.perf_counter()
    for seq in range(n):
        fleet.runs.emit_event("append-bench", seq, "token", {"i": seq}, fence=claim.fence)
    emitted = time.perf_counter() - t0
    token = await fleet.flush(timeout=300)
    acked = time.perf_counter() - t0
    page = await fleet.runs.events("append-bench", after_sequence=n - 2, min_seq=token)
    folded = time.perf_counter() - t0
    assert [e.sequence for e in page.items] == [n - 1]
    return {
        "events": n, "emit_us_per_call": round(emitted / n * 1e6, 2), "acked_per_s": round(n / acked),
        "folded_per_s": round(n / folded),
    }


async def main(args: argparse.Namespace) -> None:
    async with broker(prefix="fleetlog-bench-runs-") as (b, work):
        proc = serve_subprocess(b.url, work / "serve", work / "serve.log")
        fleet = await Fleet.connect(settings=settings_for(b.url, work / "client"))
        try:
            await wait_service(fleet)
            race = await claim_race(fleet, b.url, work, args.runs, args.claimers, proc.pid)
            appends = await append_rate(fleet, args.events)
        finally:
            await fleet.close()
            stop_subprocess(proc)
    print(table([[k, v] for k, v in race.items()], ["claim race", "value"]))
    print(table([[k, v] for k, v in appends.items()], ["append_event (fire-and-forget)", "value"]))
    emit_json("runs", {"race": race, "append": appends})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--claimers", type=int, default=8)
    parser.add_argument("--events", type=int, default=100_000)
    asyncio.run(main(parser.parse_args()))
