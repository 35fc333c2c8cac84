"""Sustained acked publish from one process (issue 2 part 10: >= 40,000 events/s).

One `Fleet` records N attempts (default 200,000; realistic fields, 2 KB pane)
and then flushes; the rate is N / (time from the first record() to flush()
returning), i.e. every event acked by JetStream (file store). The producer
yields to the event loop every --yield-every records so the sender runs while
records are made (an agent that never yields would just queue everything and
publish at flush). A second run with --pane-bytes 0 shows the small-event rate.
`--secure`: the broker as `up --secure` runs it (two accounts), the admin creates the streams,
and the client is an `agent` identity publishing through the CLIENTS account's imports (all
events then carry that agent's name).

    python bench/bench_publish.py [--n 200000] [--pane-bytes 2048] [--yield-every 100] [--secure]
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
from fleetlog.services.node.broker import EmbeddedBroker, reload_secure_broker
from fleetlog.services.node.identities import Registry

from fleetlog import Fleet

TARGET = 40_000


AGENT = "bench"  # the agent identity of a --secure run


async def secure_agent(b: EmbeddedBroker, work: Path) -> Path:
    """Streams made by the admin (an agent may not create them), then an agent identity's seed."""
    admin = await Fleet.connect(settings=settings_for(b.url, work / "admin",
                                                      credentials=b.credentials_path("admin-fleetlog")))
    await admin.close()
    seed = work / "seeds" / f"agent-{AGENT}.nk"
    Registry(b.data_dir).add("agent", AGENT, out=seed)
    assert await reload_secure_broker(b.data_dir)
    return seed


async def run(url: str, work: Path, n: int, pane_bytes: int, yield_every: int, label: str,
              broker_pid: int | None = None, credentials: Path | None = None) -> dict:
    fac = AttemptFactory(pane_bytes=pane_bytes)
    kwargs = fac.batch(0, 5000, 5000)
    if credentials is not None:  # an agent states only its own attempts
        kwargs = [{**k, "agent": AGENT} for k in kwargs]
    fleet = await Fleet.connect(settings=settings_for(url, work / f"client-{label}", credentials=credentials),
                                ensure=credentials is None)
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
    ap.add_argument("--secure", action="store_true", help="a secure broker; the client an agent identity")
    args = ap.parse_args()

    runs = []
    async with broker(secure=args.secure) as (b, work):
        creds = await secure_agent(b, work) if args.secure else None
        await run(b.url, work, 5000, args.pane_bytes, args.yield_every, "warmup", credentials=creds)
        pid = b.process.pid if b.process else None
        runs.append(await run(b.url, work, args.n, args.pane_bytes, args.yield_every, "realistic", pid, creds))
        if not args.no_small:
            runs.append(await run(b.url, work, args.n, 0, args.yield_every, "small", pid, creds))

    print(f"sustained acked publish, one process, record N then flush (target >= {TARGET:,}/s)"
          + (", secure broker, an agent identity through the accounts' imports" if args.secure else ""))
    print(table(
        [(r["label"], f"{r['n']:,}", r["pane_bytes"], f"{r['record_phase_s']:.2f}", f"{r['total_s']:.2f}",
          f"{r['events_per_s']:,}", r["mb_per_s"], "met" if r["events_per_s"] >= TARGET else "MISSED",
          r["cpu"]["client_cpu_us_per_event"], r["cpu"].get("broker_cpu_us_per_event", "?"),
          r["cpu"]["foreign_cores"]) for r in runs],
        ["run", "N", "pane B", "record s", "to flush s", "events/s", "MB/s", "target", "client CPU µs/ev",
         "broker CPU µs/ev", "foreign cores"],
    ))
    main_run = runs[0]
    emit_json("publish", {"runs": runs, "target_events_per_s": TARGET, "secure": args.secure,
                          "events_per_s": main_run["events_per_s"], "met": main_run["events_per_s"] >= TARGET})


if __name__ == "__main__":
    asyncio.run(main())
