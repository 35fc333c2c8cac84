"""Scoped state (issue 4): set -> get-with-token latency under load, and sizes after overwrites.

Part 1 — latency. A `fleetlog serve` subprocess (projector + query service, fresh view)
runs against a private nats-server. A second process publishes attempts at a steady
--load-rate (default 10,000 events/s, the background load from another family). This
process, after a warm-up, loops: t0; `w = await fleet.state.set(...)`; `await
fleet.state.get(..., min_seq=w)` (answered only once the view folded the write); t1.
Reported: set (guarded write, acked), get-with-token, and the whole set -> get.

Part 2 — sizes. Against a fresh broker and view, --overwrites (default 100,000) sets
over --keys (default 1,000) keys through the API (--writers concurrent tasks, each key
written by one task at a time), then the view is waited for. Reported: write rate,
FLEET_STATE messages and bytes (compacted: one message per key), the view's rows and
the DuckDB file size after a clean stop (checkpointed), with the table's share of it.

    python bench/bench_state.py [--load-rate 10000] [--seconds 20] [--overwrites 100000] [--keys 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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

from fleetlog import Fleet

CTX = {"runner_id": "bench-runner", "bot_id": "bot-1", "workspace_id": "ws-1", "conversation_id": "conv-1",
       "actor_id": "user-1"}
BIND = {"binding_id": "bench-binding"}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


# -- the background load (its own process) ------------------------------------------------


async def load(url: str, rate: int, seconds: float, window: int = 20_000) -> None:
    """Attempts at a steady `rate`, as acked JetStream publishes over a bare protocol client.

    The same bytes `fleet.attempts.record()` publishes (pre-encoded, a fresh event id per
    publish, `Nats-Msg-Id` header, reply subject for the ack), without the SDK's per-event
    Python cost: on this shared 2-core machine the SDK path alone could not hold 10,000/s
    next to the projector it loads.
    """
    from urllib.parse import urlsplit

    from _common import attempt_payloads
    from fleetlog.schemas import new_event_id

    templates = attempt_payloads(AttemptFactory(pane_bytes=512), 0, 2000, 2000)
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 4222)
    await reader.readline()  # INFO
    writer.write(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true,'
                 b'"protocol":1,"echo":false}\r\nPING\r\nSUB _INBOX.sload.* 1\r\n')
    acked = errors = sent = 0
    finished = asyncio.Event()
    stop_at: int | None = None

    async def read_acks() -> None:
        nonlocal acked, errors
        while data := await reader.read(1 << 20):
            acked += data.count(b"MSG _INBOX.sload.")
            errors += data.count(b'"error"')
            if b"PING\r\n" in data:
                writer.write(b"PONG\r\n")
            if stop_at is not None and acked >= stop_at:
                finished.set()

    task = asyncio.create_task(read_acks())
    t_start = time.perf_counter()
    while (now := time.perf_counter()) - t_start < seconds:
        due = int((now - t_start) * rate)
        out = []
        while sent < due and sent - acked < window:
            old_id, subject, payload = templates[sent % len(templates)]
            eid = new_event_id()
            hdr = b"NATS/1.0\r\nNats-Msg-Id: %s\r\n\r\n" % eid.encode()
            body = payload.replace(old_id.encode(), eid.encode(), 1)
            out.append(b"HPUB %s _INBOX.sload.x %d %d\r\n%s%s\r\n" % (
                subject.encode(), len(hdr), len(hdr) + len(body), hdr, body))
            sent += 1
        writer.write(b"".join(out))
        await writer.drain()
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - t_start
    stop_at = sent
    if acked < sent:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(finished.wait(), 30)
    task.cancel()
    writer.close()
    print(f"LOAD {sent} {sent / elapsed:.0f} acked={acked} errors={errors}", flush=True)


# -- part 1 ------------------------------------------------------------------------------------


async def latency(args: argparse.Namespace) -> dict[str, Any]:
    async with broker() as (b, work):
        fleet = await Fleet.connect(settings=settings_for(b.url, work / "client"))
        proc = serve_subprocess(b.url, work / "view", work / "serve.log")
        loader = None
        try:
            await wait_service(fleet)
            loader = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--role", "load", "--url", b.url, "--load-rate", str(args.load_rate),
                "--seconds", str(args.seconds + args.warmup + 2), stdout=asyncio.subprocess.PIPE)
            t_end = time.perf_counter() + args.warmup
            samples: list[tuple[float, float, float]] = []
            n = 0
            mon: CpuMonitor | None = None
            load_avg_before = uptime()
            while True:
                now = time.perf_counter()
                if mon is None and now >= t_end:
                    mon = CpuMonitor().start()
                    t_end = now + args.seconds
                elif mon is not None and now >= t_end:
                    break
                key = f"k{n % 100}"
                t0 = time.perf_counter()
                w = await fleet.state.set("conversation", key, {"n": n}, context=CTX, binding=BIND)
                t1 = time.perf_counter()
                value = await fleet.state.get("conversation", key, context=CTX, binding=BIND, min_seq=w)
                t2 = time.perf_counter()
                assert value == {"n": n}, (value, n)
                if mon is not None:
                    samples.append((t0, t1, t2))
                n += 1
                await asyncio.sleep(max(0.0, 0.01 - (t2 - t0)))  # ~100 samples/s
            assert mon is not None
            cpu = mon.stop()
            load_avg_after = uptime()
            out = (await asyncio.wait_for(loader.communicate(), 120))[0].decode()
            load_line = next((ln for ln in out.splitlines() if ln.startswith("LOAD")), "LOAD ? ?")
            await fleet.close()
        finally:
            if loader is not None and loader.returncode is None:
                loader.kill()
            stop_subprocess(proc)
    total = percentiles([(c - a) * 1000 for a, _b, c in samples], (50, 90, 99))
    set_ms = percentiles([(b_ - a) * 1000 for a, b_, _c in samples], (50, 90, 99))
    get_ms = percentiles([(c - b_) * 1000 for _a, b_, c in samples], (50, 90, 99))
    load_parts = load_line.split()
    return {"samples": len(samples), "load_rate_target": args.load_rate, "load_events": load_parts[1],
            "load_rate_achieved": load_parts[2], "set_to_get_ms": total, "set_ms": set_ms,
            "get_with_token_ms": get_ms, "cpu": cpu, "uptime_before": load_avg_before, "uptime_after": load_avg_after}


# -- part 2 ------------------------------------------------------------------------------------


async def sizes(args: argparse.Namespace) -> dict[str, Any]:
    import nats

    async with broker() as (b, work):
        fleet = await Fleet.connect(settings=settings_for(b.url, work / "client"))
        proc = serve_subprocess(b.url, work / "view", work / "serve.log")
        try:
            await wait_service(fleet)
            per_writer = args.overwrites // args.writers
            top = 0

            async def writer(w: int) -> None:
                nonlocal top
                keys = [f"key-{k:04d}" for k in range(w, args.keys, args.writers)]
                for i in range(per_writer):
                    key = keys[i % len(keys)]
                    res = await fleet.state.set("actor", key, {"i": i, "w": w, "pad": "x" * args.value_bytes},
                                                context=CTX, binding=BIND)
                    top = max(top, res.seq)

            mon = CpuMonitor().start()
            t0 = time.perf_counter()
            await asyncio.gather(*(writer(w) for w in range(args.writers)))
            t_written = time.perf_counter()
            scope_key = fleet.state.scope_key("actor", context=CTX, binding=BIND)
            page = await fleet.state.list(scope_key, limit=1, min_seq={"FLEET_STATE": top})
            t_folded = time.perf_counter()
            cpu = mon.stop()
            assert page.keys, page
            nc = await nats.connect(b.url)
            info = (await nc.jetstream().stream_info("FLEET_STATE")).state
            await nc.close()
            await fleet.close()
        finally:
            stop_subprocess(proc)  # SIGTERM: the projector commits and the file is checkpointed on close
        view = await asyncio.to_thread(view_size, work / "view" / "views" / "fleetlog.duckdb")
    n = per_writer * args.writers
    return {"overwrites": n, "keys": args.keys, "writers": args.writers, "value_bytes": args.value_bytes,
            "write_s": round(t_written - t0, 2), "writes_per_s": round(n / (t_written - t0)),
            "fold_wait_after_last_write_s": round(t_folded - t_written, 3),
            "stream_messages": info.messages, "stream_bytes": info.bytes, "stream_last_seq": info.last_seq,
            **view, "cpu": cpu, "uptime": uptime()}


def view_size(path: Path) -> dict[str, int]:
    """Rows of the live state table, the file's size, and the blocks the table occupies."""
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    try:
        def one(sql: str) -> int:
            row = con.execute(sql).fetchone()
            assert row is not None
            return int(row[0])

        schema = con.execute("SELECT schema_name FROM fleetlog_generations WHERE name = 'state' AND state = 'live'"
                             ).fetchone()
        assert schema is not None
        rows = one(f'SELECT count(*) FROM "{schema[0]}".state')
        blocks = one(f"SELECT count(DISTINCT block_id) FROM pragma_storage_info('{schema[0]}.state') WHERE persistent")
        block_size = one("SELECT block_size FROM pragma_database_size()")
    finally:
        con.close()
    return {"view_rows": rows, "view_file_bytes": path.stat().st_size, "state_table_blocks": blocks,
            "state_table_bytes_approx": blocks * block_size}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", default="bench", choices=("bench", "load"))
    ap.add_argument("--url")
    ap.add_argument("--load-rate", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--overwrites", type=int, default=100_000)
    ap.add_argument("--keys", type=int, default=1_000)
    ap.add_argument("--writers", type=int, default=20)
    ap.add_argument("--value-bytes", type=int, default=100)
    ap.add_argument("--skip", choices=("latency", "sizes"), default=None)
    args = ap.parse_args()
    if args.role == "load":
        await load(args.url, args.load_rate, args.seconds)
        return
    results: dict[str, Any] = {}
    if args.skip != "latency":
        lat = results["latency"] = await latency(args)
        print(f"set -> get-with-token under {lat['load_rate_achieved']} attempts/s of background load "
              f"({lat['samples']} samples)")
        print(table([(name, *(f"{lat[k][p]:.2f}" for p in ("p50", "p90", "p99", "max")))
                     for name, k in (("set -> get(min_seq)", "set_to_get_ms"), ("  set (guarded, acked)", "set_ms"),
                                     ("  get with token", "get_with_token_ms"))],
                    ["ms", "p50", "p90", "p99", "max"]))
        print(f"cpu {lat['cpu']}\nuptime before: {lat['uptime_before']}\nuptime after:  {lat['uptime_after']}")
    if args.skip != "sizes":
        sz = results["sizes"] = await sizes(args)
        print(f"{sz['overwrites']:,} overwrites over {sz['keys']:,} keys by {sz['writers']} writers: "
              f"{sz['write_s']} s ({sz['writes_per_s']:,}/s); view caught up {sz['fold_wait_after_last_write_s']} s "
              f"after the last ack")
        print(f"FLEET_STATE: {sz['stream_messages']:,} messages, {sz['stream_bytes']:,} bytes "
              f"(last seq {sz['stream_last_seq']:,})")
        print(f"view: {sz['view_rows']:,} rows; DuckDB file {sz['view_file_bytes']:,} bytes "
              f"(state table ~{sz['state_table_bytes_approx']:,} bytes in {sz['state_table_blocks']} blocks)")
        print(f"cpu {sz['cpu']}\nuptime: {sz['uptime']}")
    emit_json("state", results)


if __name__ == "__main__":
    asyncio.run(main())
