"""`fleet.attempts.record()` hot-path latency (issue 2 part 10: p99 < 20 µs).

Times every call with perf_counter_ns: N calls (default 200,000) with realistic
fields (50 agents, 20 actions, 5 outcomes, a 2 KB pane string, small extras,
default ts = now), in two settings:

  async   `Fleet` on the caller's event loop; the caller yields to the loop every
          --yield-every calls so the background sender publishes meanwhile (the
          sender's work is not timed, only the record() calls).
  thread  `FleetSync`: the caller is a plain thread, the client's loop (sender,
          acks) runs in its daemon thread and competes for the GIL.

Everything is flushed (acked by JetStream) at the end and checked.

Then the durable write path (issue 9), async `Fleet`, in two more settings:

  durable        `durable=True`: record() returns once the encoded event is written to
                 the spool file (one write(2): survives SIGKILL); the sender publishes
                 from the spool.
  durable+fsync  the same and an fsync per record (survives power loss).

For those, throughput is also given: calls per second of the record phase, and events
per second until everything is acked.

    python bench/bench_record.py [--n 200000] [--pane-bytes 2048] [--durable-n 50000] [--fsync-n 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import AttemptFactory, CpuMonitor, broker, emit_json, percentiles, settings_for, table
from fleetlog.services.client.sync import FleetSync

from fleetlog import Fleet

TARGET_P99_US = 20.0


def control(n: int, k: int) -> list[float]:
    """Machine-jitter control: a fixed pure-Python workload (sum(range(k))) timed the same way."""
    pc = time.perf_counter_ns
    lat = [0.0] * n
    for i in range(n):
        t0 = pc()
        sum(range(k))
        lat[i] = (pc() - t0) / 1000
    return lat


def _timer_overhead_ns() -> float:
    pc = time.perf_counter_ns
    n = 100_000
    t0 = pc()
    for _ in range(n):
        a = pc()
        b = pc()
    del a, b
    return (pc() - t0) / n / 2


async def bench_async(url: str, work: Path, n: int, kwargs: list[dict], yield_every: int,
                      **settings: object) -> tuple[list[float], dict]:
    durable = bool(settings.get("durable"))
    name = "client-async" + ("-durable" if durable else "") + ("-fsync" if settings.get("durable_fsync") else "")
    fleet = await Fleet.connect(settings=settings_for(url, work / name, **settings))
    record = fleet.attempts.record
    pc = time.perf_counter_ns
    lat = [0.0] * n
    m = len(kwargs)
    gc0 = gc.get_stats()
    t_start = time.perf_counter()
    for i in range(n):
        kw = kwargs[i % m]
        t0 = pc()
        record(**kw)
        lat[i] = (pc() - t0) / 1000
        if i % yield_every == yield_every - 1:
            await asyncio.sleep(0)
    t_rec = time.perf_counter() - t_start
    await fleet.flush(120)
    t_all = time.perf_counter() - t_start
    stats = fleet.publisher_stats()
    gcs = sum(s["collections"] for s in gc.get_stats()) - sum(s["collections"] for s in gc0)
    await fleet.close()
    assert stats.acked == n and stats.spooled == (n if durable else 0) and stats.spool_pending == 0, stats
    return lat, {"record_phase_s": t_rec, "to_flush_s": t_all, "gc_collections": gcs, "acked": stats.acked,
                 "record_calls_per_s": round(n / t_rec), "acked_ev_per_s": round(n / t_all)}


def bench_thread(url: str, work: Path, n: int, kwargs: list[dict]) -> tuple[list[float], dict]:
    fs = FleetSync.connect(settings=settings_for(url, work / "client-thread"))
    record = fs.attempts.record
    pc = time.perf_counter_ns
    lat = [0.0] * n
    m = len(kwargs)
    t_start = time.perf_counter()
    for i in range(n):
        kw = kwargs[i % m]
        t0 = pc()
        record(**kw)
        lat[i] = (pc() - t0) / 1000
    t_rec = time.perf_counter() - t_start
    fs.flush(120)
    t_all = time.perf_counter() - t_start
    stats = fs.publisher_stats()
    fs.close()
    assert stats.acked == n and stats.spooled == 0, stats
    return lat, {"record_phase_s": t_rec, "to_flush_s": t_all, "acked": stats.acked}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--pane-bytes", type=int, default=2048)
    ap.add_argument("--yield-every", type=int, default=100, help="async mode: yield to the loop every K calls")
    ap.add_argument("--warmup", type=int, default=2000)
    ap.add_argument("--durable-n", type=int, default=50_000, help="calls in durable mode (0: skip)")
    ap.add_argument("--fsync-n", type=int, default=5_000, help="calls in durable+fsync mode (0: skip)")
    args = ap.parse_args()

    fac = AttemptFactory(pane_bytes=args.pane_bytes)
    kwargs = fac.batch(0, 5000, 5000)
    overhead = _timer_overhead_ns()
    results: dict = {"n": args.n, "pane_bytes": args.pane_bytes, "timer_overhead_ns": round(overhead, 1)}
    rows = []
    async with broker() as (b, work):
        # Warm-up (imports, caches, connection) on a throwaway client.
        await bench_async(b.url, work, args.warmup, kwargs, args.yield_every)
        ctl = percentiles(control(args.n // 2, 700))
        results["control"] = {k: round(v, 2) for k, v in ctl.items()}
        rows.append(("control sum(range(700))", ctl))
        mon = CpuMonitor().start()
        lat, extra = await bench_async(b.url, work, args.n, kwargs, args.yield_every)
        extra["cpu"] = mon.stop()
        pa = percentiles(lat)
        results["async"] = {**{k: round(v, 2) for k, v in pa.items()}, **extra,
                            "calls_over_20us": sum(1 for x in lat if x > 20)}
        rows.append(("async Fleet", pa))
        mon = CpuMonitor().start()
        lat_t, extra_t = await asyncio.to_thread(bench_thread, b.url, work, args.n, kwargs)
        extra_t["cpu"] = mon.stop()
        pt = percentiles(lat_t)
        results["thread"] = {**{k: round(v, 2) for k, v in pt.items()}, **extra_t,
                             "calls_over_20us": sum(1 for x in lat_t if x > 20)}
        rows.append(("thread FleetSync", pt))
        for mode, n_mode, extra_settings in (
            ("durable", args.durable_n, {"durable": True}),
            ("durable_fsync", args.fsync_n, {"durable": True, "durable_fsync": True}),
        ):
            if not n_mode:
                continue
            mon = CpuMonitor().start()
            lat_d, extra_d = await bench_async(b.url, work, n_mode, kwargs, args.yield_every, **extra_settings)
            extra_d["cpu"] = mon.stop()
            pd = percentiles(lat_d)
            results[mode] = {**{k: round(v, 2) for k, v in pd.items()}, **extra_d, "n": n_mode}
            rows.append((f"async {mode.replace('_', '+')} ({n_mode:,})", pd))

    print(f"record() latency, {args.n:,} calls, {args.pane_bytes} B pane (timer overhead {overhead:.0f} ns)")
    print(table(
        [(name, f"{p['p50']:.1f}", f"{p['p99']:.1f}", f"{p['p99.9']:.1f}", f"{p['max']:.0f}", f"{p['mean']:.1f}",
          ("met" if p["p99"] < TARGET_P99_US else "MISSED")
          if not name.startswith(("control", "async durable")) else "-")
         for name, p in rows],
        ["mode", "p50 µs", "p99 µs", "p99.9 µs", "max µs", "mean µs", "p99<20µs"],
    ))
    for mode in ("async", "thread"):
        r = results[mode]
        print(f"{mode}: record phase {r['record_phase_s']:.2f}s, to flush {r['to_flush_s']:.2f}s, "
              f"{r['calls_over_20us']} calls > 20 µs; cpu {r['cpu']}")
    for mode in ("async", "durable", "durable_fsync"):
        if mode in results:
            r = results[mode]
            print(f"{mode}: {r['record_calls_per_s']:,} record() calls/s, {r['acked_ev_per_s']:,} ev/s acked")
    results["target_p99_us"] = TARGET_P99_US
    results["met"] = all(results[m]["p99"] < TARGET_P99_US for m in ("async", "thread"))
    emit_json("record", results)


if __name__ == "__main__":
    asyncio.run(main())
