"""Publish -> queryable latency at a steady rate (issue 19: 5,000 events/s with 2 KB panes, p50 < 50 ms, p99 < 250 ms).

A `fleetlog serve` subprocess (projector + query service, fresh view) runs against a
private nats-server. This process records attempts at a steady --rate (default 5,000/s,
paced every 5 ms; realistic fields with a --pane-bytes pane) for --seconds (default 20)
after a 2 s warm-up. Every --sample-every-th event (default 100th, i.e. 100 samples/s)
is followed: t0 just before its record(); as soon as its receipt is acked, a query
`fleet.attempts.query(agent=..., limit=1, min_seq=receipt)` is sent, which the service
answers only once the view has folded that event. Latency = reply time - t0. The
record->ack part is reported separately.

    python bench/bench_latency.py [--rate 5000] [--seconds 20] [--pane-bytes 2048]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    AttemptFactory,
    CpuMonitor,
    broker,
    emit_json,
    percentiles,
    serve_subprocess,
    settings_for,
    stop_subprocess,
    table,
    wait_service,
)
from fleetlog.services.backbone.errors import StaleError

from fleetlog import Fleet

TARGET_P50_MS = 50.0
TARGET_P99_MS = 250.0


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=int, default=5_000)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--pane-bytes", type=int, default=2048)
    ap.add_argument("--sample-every", type=int, default=100)
    args = ap.parse_args()

    fac = AttemptFactory(pane_bytes=args.pane_bytes)
    kwargs = fac.batch(0, 5000, 5000)
    samples: list[tuple[float, float, float]] = []  # (t0, t_ack, t_seen)
    stale = 0
    errors: list[str] = []
    async with broker() as (b, work):
        fleet = await Fleet.connect(settings=settings_for(b.url, work / "client"))
        await fleet.flush(10)
        proc = serve_subprocess(b.url, work / "view", work / "serve.log")
        try:
            await wait_service(fleet)
            record = fleet.attempts.record
            pending: list[tuple[float, object, str]] = []  # (t0, receipt, agent), oldest first
            queries: set[asyncio.Task[None]] = set()
            measuring = False

            async def follow(t0: float, receipt: object, agent: str, t_ack: float) -> None:
                nonlocal stale
                try:
                    await fleet.attempts.query(agent=agent, limit=1, min_seq=receipt)  # type: ignore[arg-type]
                except StaleError:
                    stale += 1
                    return
                except Exception as exc:
                    errors.append(repr(exc))
                    return
                t_seen = time.perf_counter()
                if measuring:
                    samples.append((t0, t_ack, t_seen))

            async def ack_watcher() -> None:
                while True:
                    await asyncio.sleep(0.001)
                    now = time.perf_counter()
                    keep = []
                    for item in pending:
                        t0, receipt, agent = item
                        if receipt.seq is not None:  # type: ignore[attr-defined]
                            task = asyncio.create_task(follow(t0, receipt, agent, now))
                            queries.add(task)
                            task.add_done_callback(queries.discard)
                        else:
                            keep.append(item)
                    pending[:] = keep

            watcher = asyncio.create_task(ack_watcher())
            m = len(kwargs)
            i = 0
            lag_max = 0
            mon = None
            t_start = time.perf_counter()
            t_measure = t_start + args.warmup
            t_end = t_measure + args.seconds
            n_measured_start = 0
            while True:
                now = time.perf_counter()
                if now >= t_end:
                    break
                if not measuring and now >= t_measure:
                    measuring = True
                    n_measured_start = i
                    mon = CpuMonitor().start()
                due = int((now - t_start) * args.rate)
                lag_max = max(lag_max, due - i)
                while i < due:
                    kw = kwargs[i % m]
                    if i % args.sample_every == 0:
                        t0 = time.perf_counter()
                        receipt = record(**kw)
                        pending.append((t0, receipt, kw["agent"]))
                    else:
                        record(**kw)
                    i += 1
                await asyncio.sleep(0.005)
            t_stop = time.perf_counter()
            assert mon is not None
            cpu = mon.stop()
            n_measured = i - n_measured_start
            await fleet.flush(60)
            deadline = time.monotonic() + 15
            while (pending or queries) and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            watcher.cancel()
            stats = fleet.publisher_stats()
            await fleet.close()
        finally:
            stop_subprocess(proc)

    lat = [(s - t0) * 1000 for t0, _a, s in samples]
    ack = [(a - t0) * 1000 for t0, a, _s in samples]
    after_ack = [(s - a) * 1000 for _t0, a, s in samples]
    rate = n_measured / (t_stop - t_measure)
    pl = percentiles(lat, (50, 90, 99))
    pa = percentiles(ack, (50, 90, 99))
    pq = percentiles(after_ack, (50, 90, 99))
    print(f"publish -> queryable, {rate:,.0f} events/s achieved for {args.seconds:.0f}s "
          f"({len(samples)} samples, {args.pane_bytes} B pane, producer max behind {lag_max} events)")
    print(table(
        [(name, f"{p['p50']:.1f}", f"{p['p90']:.1f}", f"{p['p99']:.1f}", f"{p['max']:.1f}")
         for name, p in (("record -> queryable", pl), ("  record -> acked", pa), ("  acked -> query answered", pq))],
        ["ms", "p50", "p90", "p99", "max"],
    ))
    met50 = pl["p50"] < TARGET_P50_MS
    met99 = pl["p99"] < TARGET_P99_MS
    print(f"p50 {pl['p50']:.1f} ms (target < {TARGET_P50_MS:.0f}) {'met' if met50 else 'MISSED'}; "
          f"p99 {pl['p99']:.1f} ms (target < {TARGET_P99_MS:.0f}) {'met' if met99 else 'MISSED'}; "
          f"stale {stale}, errors {len(errors)}; cpu {cpu}")
    emit_json("latency", {
        "rate_target": args.rate, "rate_achieved": round(rate), "seconds": args.seconds, "pane_bytes": args.pane_bytes,
        "samples": len(samples), "stale": stale, "errors": errors[:5], "producer_max_behind": lag_max,
        "record_to_queryable_ms": {k: round(v, 2) for k, v in pl.items()},
        "record_to_ack_ms": {k: round(v, 2) for k, v in pa.items()},
        "ack_to_answer_ms": {k: round(v, 2) for k, v in pq.items()},
        "publisher": {"acked": stats.acked, "spooled": stats.spooled}, "cpu": cpu,
        "met": {"p50": met50, "p99": met99},
    })


if __name__ == "__main__":
    asyncio.run(main())
