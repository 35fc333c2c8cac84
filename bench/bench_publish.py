"""Sustained acked publish from one process (issue 2 part 10: >= 40,000 events/s).

One `Fleet` records N attempts (default 200,000; realistic fields, 2 KB pane)
and then flushes; the rate is N / (time from the first record() to flush()
returning), i.e. every event acked by JetStream (file store). The producer
yields to the event loop every --yield-every records so the sender runs while
records are made (an agent that never yields would just queue everything and
publish at flush). A second run with --pane-bytes 0 shows the small-event rate.

    python bench/bench_publish.py [--n 200000] [--pane-bytes 2048] [--yield-every 100]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import AttemptFactory, CpuMonitor, broker, emit_json, settings_for, table

from fleetlog import Fleet

TARGET = 40_000


async def run(url: str, work: Path, n: int, pane_bytes: int, yield_every: int, label: str,
              broker_pid: int | None = None) -> dict:
    fac = AttemptFactory(pane_bytes=pane_bytes)
    kwargs = fac.batch(0, 5000, 5000)
    fleet = await Fleet.connect(settings=settings_for(url, work / f"client-{label}"))
    await fleet.flush(10)  # connected, streams ensured
    record = fleet.attempts.record
    m = len(kwargs)
    me = psutil.Process()
    brk = psutil.Process(broker_pid) if broker_pid else None
    c0 = me.cpu_times()
    b0 = brk.cpu_times() if brk else None
    mon = CpuMonitor().start()
    t0 = time.perf_counter()
    for i in range(n):
        record(**kwargs[i % m])
        if i % yield_every == yield_every - 1:
            await asyncio.sleep(0)
    t_rec = time.perf_counter() - t0
    token = await fleet.flush(300)
    dt = time.perf_counter() - t0
    cpu = mon.stop()
    c1 = me.cpu_times()
    cpu["client_cpu_us_per_event"] = round((c1.user + c1.system - c0.user - c0.system) / n * 1e6, 1)
    if brk and b0:
        b1 = brk.cpu_times()
        cpu["broker_cpu_us_per_event"] = round((b1.user + b1.system - b0.user - b0.system) / n * 1e6, 1)
    stats = fleet.publisher_stats()
    await fleet.close()
    assert stats.acked == n and stats.spooled == 0 and stats.dead_lettered == 0, stats
    payload = len(kwargs[0]["pane_before"] or "") + 300
    return {"label": label, "n": n, "pane_bytes": pane_bytes, "approx_event_bytes": payload,
            "record_phase_s": round(t_rec, 3), "total_s": round(dt, 3), "events_per_s": round(n / dt),
            "mb_per_s": round(n * payload / dt / 1e6, 1), "token": token, "cpu": cpu}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--pane-bytes", type=int, default=2048)
    ap.add_argument("--yield-every", type=int, default=100)
    ap.add_argument("--no-small", action="store_true", help="skip the small-event (no pane) run")
    args = ap.parse_args()

    runs = []
    async with broker() as (b, work):
        await run(b.url, work, 5000, args.pane_bytes, args.yield_every, "warmup")
        pid = b.process.pid if b.process else None
        runs.append(await run(b.url, work, args.n, args.pane_bytes, args.yield_every, "realistic", pid))
        if not args.no_small:
            runs.append(await run(b.url, work, args.n, 0, args.yield_every, "small", pid))

    print(f"sustained acked publish, one process, record N then flush (target >= {TARGET:,}/s)")
    print(table(
        [(r["label"], f"{r['n']:,}", r["pane_bytes"], f"{r['record_phase_s']:.2f}", f"{r['total_s']:.2f}",
          f"{r['events_per_s']:,}", r["mb_per_s"], "met" if r["events_per_s"] >= TARGET else "MISSED",
          r["cpu"]["client_cpu_us_per_event"], r["cpu"].get("broker_cpu_us_per_event", "?"),
          r["cpu"]["foreign_cores"]) for r in runs],
        ["run", "N", "pane B", "record s", "to flush s", "events/s", "MB/s", "target", "client CPU µs/ev",
         "broker CPU µs/ev", "foreign cores"],
    ))
    main_run = runs[0]
    emit_json("publish", {"runs": runs, "target_events_per_s": TARGET,
                          "events_per_s": main_run["events_per_s"], "met": main_run["events_per_s"] >= TARGET})


if __name__ == "__main__":
    asyncio.run(main())
