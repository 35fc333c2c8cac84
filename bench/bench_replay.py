"""Replay: fold 1,000,000 attempts from FLEET_ATTEMPTS into a fresh view (issue 2 part 10).

Targets (2 cores): fold >= 150,000 events/s and >= 70 % of the raw ordered-consumer
delivery rate measured in the same run; projector peak RSS < 400 MB.

1. load: N attempts (default 1,000,000; realistic fields: 50 agents, 20 actions,
   5 outcomes, a --pane-bytes pane (default 2048), small extras, event times spread
   over 6 days) are published into FLEET_ATTEMPTS by a bare-protocol acked publisher
   (same bytes as the SDK: `Nats-Msg-Id`, JetStream acks).
2. raw: `OrderedReader(..., keep_headers=False).next_columns(5000, 0.05)` drains the stream
   (the same reader, settings and call the projector uses); nothing else.
3. fold, in process: a fresh `Server` (new data_dir) starts; the time until
   `server.projector.live("attempts").feeds["FLEET_ATTEMPTS"].checkpoint` reaches the
   last seq is the fold time (includes startup: connect, DDL, consumer creation).
4. fold, subprocess: `fleetlog serve --nats URL --data-dir D` (fresh D), its RSS sampled
   with psutil every 50 ms until the status endpoint reports the last seq folded.

With --keep DIR the broker data (DIR/broker) and the subprocess's view (DIR/view) are
kept for bench_queries.py (`--from DIR`).

    python bench/bench_replay.py [--n 1000000] [--pane-bytes 2048] [--keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sys
import time
from pathlib import Path

import psutil
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    AttemptFactory,
    CpuMonitor,
    broker,
    emit_json,
    raw_publish_attempts,
    serve_subprocess,
    settings_for,
    stop_subprocess,
    table,
    thread_cpu,
    thread_cpu_per_event,
)
from fleetlog.services.node.server import Server
from fleetlog.services.projector.stream_reader import OrderedReader

from fleetlog import Fleet

STREAM = "FLEET_ATTEMPTS"
TARGET_FOLD = 150_000
TARGET_RATIO = 0.70
TARGET_RSS_MB = 400


async def load(url: str, work: Path, n: int, pane_bytes: int) -> tuple[int, dict]:
    fleet = await Fleet.connect(settings=settings_for(url, work / "loader"))  # ensures the streams
    await fleet.flush(10)
    info = await fleet._link.nc.jetstream().stream_info(STREAM)  # type: ignore[union-attr]
    have = info.state.messages
    stats: dict = {"reused": have}
    if have < n:
        fac = AttemptFactory(pane_bytes=pane_bytes, ts_spread_days=6)
        stats = await raw_publish_attempts(url, n - have, fac)
    info = await fleet._link.nc.jetstream().stream_info(STREAM)  # type: ignore[union-attr]
    stats["stream_bytes"] = info.state.bytes
    stats["stream_messages"] = info.state.messages
    await fleet.close()
    return info.state.last_seq, stats


async def raw_rate(url: str, last_seq: int) -> dict:
    mon = CpuMonitor().start()
    t0 = time.perf_counter()
    reader = OrderedReader([url], STREAM, 1, name="bench-raw", keep_headers=False)
    await reader.start()
    got = 0
    nbytes = 0
    last = 0
    while last < last_seq:
        batch = await reader.next_columns(5000, 0.05)
        if batch is not None:
            got += len(batch)
            last = batch.last_seq
            nbytes += pc.sum(pc.binary_length(batch.payloads)).as_py()
    dt = time.perf_counter() - t0
    await reader.close()
    return {"events": got, "seconds": round(dt, 2), "events_per_s": round(got / dt),
            "mb_per_s": round(nbytes / dt / 1e6, 1), "cpu": mon.stop()}


async def fold_in_process(url: str, data_dir: Path, last_seq: int, duckdb_threads: int | None = None) -> dict:
    me = psutil.Process()
    rss0 = me.memory_info().rss
    peak = rss0
    mon = CpuMonitor().start()
    threads0 = thread_cpu()
    t0 = time.perf_counter()
    server = Server(settings_for(url, data_dir))
    await server.start()
    if duckdb_threads:  # probe: DuckDB's work on the fold thread (threads=1; set once started)
        server.store.con.execute(f"SET threads = {int(duckdb_threads)}")
    t_started = time.perf_counter()
    feed = server.projector.live("attempts").feeds[STREAM]
    next_rss = 0.0
    while feed.checkpoint < last_seq:
        await asyncio.sleep(0.005)
        now = time.perf_counter()
        if now >= next_rss:
            peak = max(peak, me.memory_info().rss)
            next_rss = now + 0.05
    dt = time.perf_counter() - t0
    cpu = mon.stop()
    projector = server.projector
    fold_threads = {t.native_id: "fold thread" for t in projector._fold_thread._threads if t.native_id}
    fold_threads.update({t.native_id: "prepare thread" for t in projector._prepare_thread._threads if t.native_id})
    per_thread = thread_cpu_per_event(threads0, thread_cpu(fold_threads), last_seq)
    peak = max(peak, me.memory_info().rss)
    stats = server.projector.fold_stats
    batches = stats.batch_events["attempts"]
    n_batches = sum(batches.counts)
    # fold_seconds: each batch's time from its submit to its transaction's COMMIT (held batches
    # overlap); catchup_commits: transactions that held more than one batch.
    fold_busy = {"batches": n_batches, "mean_batch_events": round(batches.total / max(1, n_batches)),
                 "fold_seconds": round(stats.duration_s["attempts"].total, 2),
                 "catchup_commits": projector.folder.tx.held_commits}
    rows = server.store.cursor("attempts_g1").execute("SELECT count(*) FROM attempts").fetchone()[0]
    await server.stop()
    return {"events": last_seq, "seconds": round(dt, 2), "events_per_s": round(last_seq / dt),
            "startup_s": round(t_started - t0, 2), "rows": rows,
            "bench_process_rss_mb": {"before": round(rss0 / 1e6), "peak": round(peak / 1e6)}, "cpu": cpu,
            "cpu_us_per_event_by_thread": per_thread, "batches": fold_busy}


async def fold_subprocess(url: str, data_dir: Path, last_seq: int, log_path: Path) -> dict:
    """`fleetlog serve` in its own process; RSS sampled every 50 ms."""
    client = await Fleet.connect(settings=settings_for(url, data_dir.parent / "status-client"), ensure=False)
    mon = CpuMonitor().start()
    t0 = time.perf_counter()
    proc = serve_subprocess(url, data_dir, log_path)
    ps = psutil.Process(proc.pid)
    peak = 0
    peak_child = 0  # any process the serve starts (none today; the prepare child of issue 19 was one)
    peak_sum = 0
    samples = []
    done_at = None
    first_answer: tuple[float, int] | None = None
    next_status = 0.0

    async def sample_rss() -> None:
        nonlocal peak, peak_child, peak_sum
        while True:
            try:
                rss = ps.memory_info().rss
            except psutil.Error:
                return
            child = 0
            for c in ps.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    child += c.memory_info().rss
            peak = max(peak, rss)
            peak_child = max(peak_child, child)
            peak_sum = max(peak_sum, rss + child)
            samples.append((round(time.perf_counter() - t0, 2), round(rss / 1e6)))
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample_rss())
    try:
        while done_at is None:
            await asyncio.sleep(0.05)
            if proc.poll() is not None:
                raise RuntimeError(f"fleetlog serve exited with {proc.returncode}; see {log_path}")
            if time.perf_counter() < next_status:
                continue
            next_status = time.perf_counter() + 0.25
            try:
                st = await client.status(timeout=2)
            except Exception:
                continue
            ckpt = next((p.checkpoints.get(STREAM, 0) for p in st.projections
                         if p.name == "attempts" and p.state == "live"), 0)
            if first_answer is None:
                first_answer = (time.perf_counter(), ckpt)
            if ckpt >= last_seq:
                done_at = time.perf_counter()
        await asyncio.sleep(0.5)  # RSS just after the last batch
    finally:
        sampler.cancel()
        cpu = mon.stop()
        stop_subprocess(proc)
        await client.close()
    dt = done_at - t0
    assert first_answer is not None
    t_first, c_first = first_answer
    steady = (last_seq - c_first) / (done_at - t_first) if done_at > t_first and last_seq > c_first else None
    return {"events": last_seq, "seconds_from_spawn": round(dt, 2), "events_per_s_from_spawn": round(last_seq / dt),
            "events_per_s_after_first_status": round(steady) if steady else None,
            "peak_rss_mb": round(peak / 1e6), "peak_rss_child_mb": round(peak_child / 1e6),
            "peak_rss_with_child_mb": round(peak_sum / 1e6), "rss_samples": len(samples),
            "rss_curve_mb": samples[:: max(1, len(samples) // 40)], "cpu": cpu}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--pane-bytes", type=int, default=2048)
    ap.add_argument("--keep", type=Path, default=None, help="keep broker data and the view here")
    ap.add_argument("--skip-inprocess", action="store_true")
    ap.add_argument("--skip-subprocess", action="store_true")
    ap.add_argument("--duckdb-threads", type=int, default=None, help="in-process fold only (a probe)")
    ap.add_argument("--view-dir", type=Path, default=None,
                    help="in-process fold: write the view here (e.g. /dev/shm: the disk's share of the fold)")
    args = ap.parse_args()

    res: dict = {"n": args.n, "pane_bytes": args.pane_bytes}
    async with broker(keep=args.keep) as (b, work):
        print(f"loading {args.n:,} attempts into {STREAM} ...", flush=True)
        last_seq, res["load"] = await load(b.url, work, args.n, args.pane_bytes)
        print(f"  {res['load']}", flush=True)
        print("raw OrderedReader drain ...", flush=True)
        res["raw"] = await raw_rate(b.url, last_seq)
        print(f"  {res['raw']['events_per_s']:,} ev/s", flush=True)
        if not args.skip_inprocess:
            print("fold, in-process Server ...", flush=True)
            d = (args.view_dir or work) / "view-inprocess"
            shutil.rmtree(d, ignore_errors=True)
            res["fold_inprocess"] = await fold_in_process(b.url, d, last_seq, args.duckdb_threads)
            print(f"  {res['fold_inprocess']['events_per_s']:,} ev/s", flush=True)
            print(f"  CPU µs per event by thread: {res['fold_inprocess']['cpu_us_per_event_by_thread']}", flush=True)
            print(f"  {res['fold_inprocess']['batches']}, startup {res['fold_inprocess']['startup_s']} s", flush=True)
            res["view_file_mb"] = round((d / "views" / "fleetlog.duckdb").stat().st_size / 1e6)
            shutil.rmtree(d, ignore_errors=True)
        if not args.skip_subprocess:
            print("fold, `fleetlog serve` subprocess (RSS sampled every 50 ms) ...", flush=True)
            d = work / "view"
            shutil.rmtree(d, ignore_errors=True)
            res["fold_subprocess"] = await fold_subprocess(b.url, d, last_seq, work / "serve.log")
            fsp = res["fold_subprocess"]
            print(f"  peak RSS {fsp['peak_rss_with_child_mb']} MB (serve {fsp['peak_rss_mb']}, "
                  f"its children {fsp['peak_rss_child_mb']})", flush=True)

    raw = res["raw"]["events_per_s"]
    def loadavg(cpu: dict) -> str:
        return f"{cpu['loadavg_1m_at_start']:.1f} -> {cpu['loadavg_1m']:.1f}"

    rows = [("raw OrderedReader.next_columns(5000, 0.05)", f"{raw:,}", f"{res['raw']['seconds']:.1f}", "-", "-",
             res["raw"]["cpu"]["foreign_cores"], loadavg(res["raw"]["cpu"]))]
    fold = None
    if "fold_inprocess" in res:
        fold = res["fold_inprocess"]["events_per_s"]
        rows.append(("fold, in-process Server", f"{fold:,}", f"{res['fold_inprocess']['seconds']:.1f}",
                     f"{fold / raw:.0%}", "-", res["fold_inprocess"]["cpu"]["foreign_cores"],
                     loadavg(res["fold_inprocess"]["cpu"])))
    if "fold_subprocess" in res:
        fs = res["fold_subprocess"]
        rows.append(("fold, `fleetlog serve` subprocess", f"{fs['events_per_s_from_spawn']:,}",
                     f"{fs['seconds_from_spawn']:.1f}", f"{fs['events_per_s_from_spawn'] / raw:.0%}",
                     fs["peak_rss_with_child_mb"], fs["cpu"]["foreign_cores"], loadavg(fs["cpu"])))
    print(f"\nreplay of {last_seq:,} attempts ({res['load'].get('stream_bytes', 0) / 1e6:,.0f} MB in the stream)")
    print(table(rows, ["path", "events/s", "seconds", "of raw", "peak RSS MB", "foreign cores", "load 1m"]))
    verdict = {}
    if fold is not None:
        verdict["fold_events_per_s"] = {"value": fold, "target": TARGET_FOLD, "met": fold >= TARGET_FOLD}
        ratio = fold / raw
        verdict["fold_ratio"] = {"value": round(ratio, 3), "target": TARGET_RATIO, "met": ratio >= TARGET_RATIO}
    if "fold_subprocess" in res:
        pk = res["fold_subprocess"]["peak_rss_with_child_mb"]  # the projector: serve and any child of it
        verdict["peak_rss_mb"] = {"value": pk, "target": TARGET_RSS_MB, "met": pk < TARGET_RSS_MB}
    for k, v in verdict.items():
        print(f"{k}: {v['value']} (target {v['target']}) {'met' if v['met'] else 'MISSED'}")
    res["verdict"] = verdict
    emit_json("replay", res)


if __name__ == "__main__":
    asyncio.run(main())
