"""Session-processor bookkeeping: the scan of 10,000 sessions of which 100 changed, a run over
them, and marks/s.

A private nats-server and an in-process `Server` (reactors=False, as tests/conftest.py).
--users × --files session files (default 100 × 100 = 10,000, a few lines each) are written
with an mtime an hour back, and every one gets its row (`proc.session`, read_at = now), emitted
in bulk and flushed. Then:

* scan, nothing changed: `scan_unprocessed_for` p50/p99 over --scans scans; files hashed.
* scan, 100 appended (mtime now, after processed_at): surfaced by mtime, no hash needed.
* scan, 100 changed inside the 50 ms window (mtime = processed_at − 10 ms, content changed):
  each is hashed (MD5) and surfaced. Hashes are counted by wrapping `compute_file_hash`.
* `run()` of a trivial processor over the 10,000 with 100 changed, no cap: wall time, and the
  run's stats (the 100 processed and marked under the lock's fence).
* marks/s: `mark_processed` awaited one by one (each waits for its ack: the token);
  --mark-tasks tasks doing the same; `mark_locked` (fenced, awaited) one by one.

    python bench/bench_processors.py [--users 100] [--files 100] [--changed 100] [--scans 10] [--marks 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CpuMonitor, broker, emit_json, percentiles, settings_for, table, wait_service
from fleetlog.services.client.processors.files import list_session_files, select_unprocessed

from fleetlog import Fleet, ProcessorResult
from fleetlog.processors import compute_file_hash, register

EPOCH = datetime(1970, 1, 1)


def _ns(at: datetime) -> int:
    d = at - EPOCH
    return (d.days * 86_400 + d.seconds) * 1_000_000_000 + d.microseconds * 1_000


def ms(samples_s: list[float]) -> dict[str, float]:
    p = percentiles([s * 1000 for s in samples_s])
    return {k: round(v, 2) for k, v in p.items()}


class Counting:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self, path: Path) -> str:
        self.n += 1
        return compute_file_hash(path)


class Noop:
    name = "bench-noop"
    cadence_minutes = 15

    def process_session(self, session_path: Path, username: str, session_key: str, **kwargs: Any) -> ProcessorResult:
        return ProcessorResult(items_count=1)


async def scans(fleet: Fleet, root: Path, n: int, expect: int) -> dict[str, Any]:
    counting = Counting()
    fleet.processors.compute_file_hash = counting
    times: list[float] = []
    mon = CpuMonitor().start()
    for _ in range(n):
        t0 = time.perf_counter()
        found = await fleet.processors.scan_unprocessed_for("bench", root)
        times.append(time.perf_counter() - t0)
        assert len(found) == expect, (len(found), expect)
    return {"surfaced": expect, "hashes_per_scan": counting.n / n, "ms": ms(times), "cpu": mon.stop()}


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"sessions": args.users * args.files, "changed": args.changed,
                           "loadavg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="fleetlog-bench-sessions-") as tmp:
        root = Path(tmp)
        old = datetime.now(UTC).replace(tzinfo=None) - timedelta(hours=1)
        keys: list[str] = []
        for u in range(args.users):
            (root / f"user-{u:03d}").mkdir()
            for f in range(args.files):
                path = root / f"user-{u:03d}" / f"s-{f:03d}.jsonl"
                path.write_text('{"role": "user", "text": "hi"}\n' * 3)
                os.utime(path, ns=(_ns(old),) * 2)
                keys.append(f"user-{u:03d}/s-{f:03d}.jsonl")
        async with broker(prefix="fleetlog-bench-proc-") as (b, work):
            from fleetlog.services.node.server import Server

            settings = settings_for(b.url, work / "data", reactors=False)
            srv = Server(settings)
            await srv.start()
            fleet = await Fleet.connect(settings=settings)
            try:
                await wait_service(fleet)
                read_at = datetime.now(UTC).replace(tzinfo=None)
                digest = compute_file_hash(root / keys[0])  # every file has the same content
                t0 = time.perf_counter()
                for i, key in enumerate(keys):
                    fleet.emit(fleet.processors._mark_event("bench", key, key.split("/")[0], 3, digest, read_at))
                    if i % 500 == 499:
                        await asyncio.sleep(0)
                token = await fleet.flush(120)
                fleet.processors._seen = token["FLEET_PROCESSORS"]
                await fleet.processors.processed_session_files("bench")  # the view has all 10,000
                out["bulk_marks"] = {"n": len(keys), "s": round(time.perf_counter() - t0, 2),
                                     "per_s": round(len(keys) / (time.perf_counter() - t0))}

                out["scan_unchanged"] = await scans(fleet, root, args.scans, 0)
                # the scan's parts: the rows (5 requests of 2,000 keys) and the filesystem (list + stat)
                parts: dict[str, list[float]] = {"rows": [], "filesystem": []}
                for _ in range(args.scans):
                    t0 = time.perf_counter()
                    rows = await fleet.processors.get_states_for_session_files("bench", keys)
                    t1 = time.perf_counter()
                    await asyncio.to_thread(select_unprocessed, await asyncio.to_thread(list_session_files, root), rows)
                    parts["rows"].append(t1 - t0)
                    parts["filesystem"].append(time.perf_counter() - t1)
                out["scan_parts_ms"] = {k: ms(v) for k, v in parts.items()}
                step = len(keys) // args.changed
                changed = [root / keys[i * step] for i in range(args.changed)]
                for path in changed:  # appended: mtime now
                    with path.open("a") as fh:
                        fh.write('{"role": "assistant"}\n')
                out["scan_100_appended"] = await scans(fleet, root, args.scans, args.changed)
                window = read_at - timedelta(milliseconds=10)
                for path in changed:  # inside the window: only the hash can tell
                    os.utime(path, ns=(_ns(window),) * 2)
                out["scan_100_in_window"] = await scans(fleet, root, args.scans, args.changed)

                register(Noop())
                for path in changed:
                    os.utime(path, None)  # now: after processed_at
                fleet.processors.compute_file_hash = compute_file_hash
                mon = CpuMonitor().start()
                t0 = time.perf_counter()
                stats = await fleet.processors.run("bench-noop", root, max_sessions_per_run=0)
                out["run_first"] = {"s": round(time.perf_counter() - t0, 2), "stats": {k: v for k, v in stats.items()
                                                                                       if k != "errors_detail"},
                                    "cpu": mon.stop()}
                # "bench-noop" has no rows: its first run processes all 10,000; the second sees 0
                t0 = time.perf_counter()
                again = await fleet.processors.run("bench-noop", root, max_sessions_per_run=0)
                out["run_nothing_left"] = {"s": round(time.perf_counter() - t0, 2), "scanned": again["scanned"]}
                for path in changed:
                    with path.open("a") as fh:
                        fh.write('{"role": "user"}\n')
                t0 = time.perf_counter()
                third = await fleet.processors.run("bench-noop", root, max_sessions_per_run=0)
                out["run_100_changed"] = {"s": round(time.perf_counter() - t0, 2), "processed": third["processed"]}
                assert third["processed"] == args.changed, third

                # marks/s
                lat: list[float] = []
                mon = CpuMonitor().start()
                t0 = time.perf_counter()
                for i in range(args.marks):
                    t1 = time.perf_counter()
                    await fleet.processors.mark_processed("marks", f"u/{i}.jsonl", "u", 1, digest)
                    lat.append(time.perf_counter() - t1)
                dt = time.perf_counter() - t0
                out["mark_processed_sequential"] = {"n": args.marks, "per_s": round(args.marks / dt), "ms": ms(lat),
                                                    "cpu": mon.stop()}
                queue = list(range(args.marks))

                async def worker() -> None:
                    while queue:
                        i = queue.pop()
                        await fleet.processors.mark_processed("marks-c", f"u/{i}.jsonl", "u", 1, digest)

                mon = CpuMonitor().start()
                t0 = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(args.mark_tasks)))
                dt = time.perf_counter() - t0
                out["mark_processed_concurrent"] = {"n": args.marks, "tasks": args.mark_tasks,
                                                    "per_s": round(args.marks / dt), "cpu": mon.stop()}
                lock = await fleet.processors.acquire("marks-l", lease_s=600)
                assert lock is not None
                lat = []
                t0 = time.perf_counter()
                for i in range(args.marks):
                    t1 = time.perf_counter()
                    await fleet.processors.mark_locked(lock, f"u/{i}.jsonl", "u", 1, digest)
                    lat.append(time.perf_counter() - t1)
                dt = time.perf_counter() - t0
                out["mark_locked_sequential"] = {"n": args.marks, "per_s": round(args.marks / dt), "ms": ms(lat)}
                assert await fleet.processors.release(lock)
            finally:
                await fleet.close()
                await srv.stop()
    out["loadavg_end"] = os.getloadavg()
    return out


def report(r: dict[str, Any]) -> None:
    def scan_row(name: str, s: dict[str, Any]) -> tuple[Any, ...]:
        return (f"scan {r['sessions']:,} sessions, {name}", f"p50 {s['ms']['p50']} ms, p99 {s['ms']['p99']} ms",
                f"surfaced {s['surfaced']}, hashed {s['hashes_per_scan']:g} per scan", s["cpu"]["foreign_cores"])

    rows = [
        (f"bulk marks ({r['bulk_marks']['n']:,}, emit then one flush)", f"{r['bulk_marks']['per_s']:,}/s", "", ""),
        scan_row("none changed", r["scan_unchanged"]),
        ("  its parts: rows (5 requests) / list + stat", f"p50 {r['scan_parts_ms']['rows']['p50']} / "
         f"{r['scan_parts_ms']['filesystem']['p50']} ms", "", ""),
        scan_row(f"{r['changed']} appended", r["scan_100_appended"]),
        scan_row(f"{r['changed']} changed inside the 50 ms window", r["scan_100_in_window"]),
        (f"run(), a new processor over {r['sessions']:,}", f"{r['run_first']['s']} s",
         f"processed {r['run_first']['stats']['processed']:,}", r["run_first"]["cpu"]["foreign_cores"]),
        (f"run(), {r['changed']} changed since", f"{r['run_100_changed']['s']} s",
         f"processed {r['run_100_changed']['processed']}; nothing left: {r['run_nothing_left']['s']} s", ""),
        ("mark_processed() awaited, one by one", f"{r['mark_processed_sequential']['per_s']:,}/s",
         f"p50 {r['mark_processed_sequential']['ms']['p50']} ms", ""),
        (f"mark_processed() × {r['mark_processed_concurrent']['tasks']} tasks",
         f"{r['mark_processed_concurrent']['per_s']:,}/s", "", ""),
        ("mark_locked() (fenced), one by one", f"{r['mark_locked_sequential']['per_s']:,}/s",
         f"p50 {r['mark_locked_sequential']['ms']['p50']} ms", ""),
    ]
    print(table(rows, ["what", "figure", "detail", "foreign cores"]))
    print(f"load average: start {r['loadavg_start']}, end {r['loadavg_end']}")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--files", type=int, default=100)
    ap.add_argument("--changed", type=int, default=100)
    ap.add_argument("--scans", type=int, default=10)
    ap.add_argument("--marks", type=int, default=2000)
    ap.add_argument("--mark-tasks", type=int, default=16)
    args = ap.parse_args()
    t0 = time.perf_counter()
    r = await bench(args)
    report(r)
    emit_json("processors", {**r, "wall_s": round(time.perf_counter() - t0, 1), "args": vars(args)})


if __name__ == "__main__":
    asyncio.run(main())
