"""Host snapshots: call costs, acked rates, the differ, queries. (Processors: bench_processors.py.)

No issue sets targets for this family yet; this bench only measures. It gets its own
private nats-server (temp dir, free port). The client publishes before any projector
runs (as in bench_publish.py); then an in-process `Server` (fleetlog.services.node.server, with
reactors=False as in tests/conftest.py) folds what was published and answers the queries.

Snapshots:

* `take()` call cost: --take-calls timed calls (perf_counter_ns) with a ~1.3 KB nested `data`
  dict (host facts, 12 services, 4 interfaces; a few leaves change from snapshot to
  snapshot) over --subjects (host, agent) subjects, yielding to the loop every 100 calls.
  The pure-CPU parts of a take (the encode-time copy of `data`, the event encode, the
  validating re-decode) and the differ's `diff_data` are also timed alone.
* acked throughput: --take-n snapshots, yielding every 100, then `flush()`; rate = N / (first
  take -> flush returned), with client and broker CPU per snapshot.
* differ: `SnapshotDiffer(nc).run_once()` in a loop on its own connection in this process,
  first alone (--diff-alone-n snapshots, before the Server starts), then next to the
  in-process Server, which folds the diffs (--diff-n more; the Server's fold transactions are
  counted and timed). diffs/s = diffs published / wall time.
* `latest()` (every subject, limit 100) and `history(host, agent, limit=10)` end to end
  through the query service, p50/p99 over --queries calls after the view caught up; then
  the same SQL straight on the view file (read-only, after the Server stopped).

    python bench/bench_families.py [--take-calls 20000] [--take-n 20000] [--diff-alone-n 3000] [--diff-n 8000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CpuMonitor, broker, emit_json, percentiles, settings_for, table, wait_service

from fleetlog import Fleet, FleetUnavailable, StaleError

T = TypeVar("T")

# -- helpers -----------------------------------------------------------------------------


class CpuPer:
    """CPU seconds of this process and of the broker between start() and stop()."""

    def __init__(self, broker_pid: int | None) -> None:
        self.me = psutil.Process()
        self.brk = psutil.Process(broker_pid) if broker_pid else None

    @staticmethod
    def _t(p: psutil.Process | None) -> tuple[float, float]:
        if p is None:
            return 0.0, 0.0
        t = p.cpu_times()
        return t.user, t.system

    def start(self) -> CpuPer:
        self.c0, self.b0 = self._t(self.me), self._t(self.brk)
        return self

    def stop(self, n: int) -> dict[str, float]:
        (cu, cs), (bu, bs) = self._t(self.me), self._t(self.brk)
        cu, cs, bu, bs = cu - self.c0[0], cs - self.c0[1], bu - self.b0[0], bs - self.b0[1]
        return {"client_cpu_us_per_op": round((cu + cs) / n * 1e6, 1),
                "client_sys_cpu_us_per_op": round(cs / n * 1e6, 1),
                "broker_cpu_us_per_op": round((bu + bs) / n * 1e6, 1)}


UNAVAILABLE: list[str] = []  # FleetUnavailable answers retried by folded() (reported in the JSON)


async def folded(call: Callable[[], Awaitable[T]], timeout: float = 300.0) -> T:
    """`call()` (a read with min_seq), again while the view is still behind (StaleError after the
    query service's bounded wait): the first reads after the Server starts wait for a catch-up.
    A FleetUnavailable (no responders) is retried too, for at most 10 s, and counted."""
    deadline = time.monotonic() + timeout
    t0 = time.monotonic()
    while True:
        try:
            return await call()
        except StaleError:
            if time.monotonic() > deadline:
                raise
        except FleetUnavailable as exc:
            UNAVAILABLE.append(f"{time.monotonic() - t0:.2f}s after the first try: {exc}")
            print(f"retrying: {UNAVAILABLE[-1]}", file=sys.stderr)
            if time.monotonic() - t0 > 10:
                raise
            await asyncio.sleep(0.2)


def code_version() -> dict[str, Any]:
    """The commit measured, and library files that differed from it when the bench started."""
    import subprocess

    root = Path(__file__).resolve().parent.parent

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=root, capture_output=True, text=True).stdout.rstrip("\n")

    dirty = [ln[3:] for ln in git("status", "--porcelain", "--", "services", "projections", "schemas",
                                   "fleetlog").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty_library_files": dirty}


def gc_collections() -> int:
    return sum(s["collections"] for s in gc.get_stats())


def us(ns: list[int]) -> dict[str, float]:
    return {k: round(v, 1) for k, v in percentiles([x / 1000 for x in ns], (50, 99, 99.9)).items()}


def ms(s: list[float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in percentiles([x * 1000 for x in s], (50, 90, 99)).items()}


def snapshot_variants(count: int, seed: int = 7) -> list[dict[str, Any]]:
    """~1 KB nested host snapshots; consecutive variants differ in a handful of leaves."""
    rng = random.Random(seed)
    services = [f"svc-{name}" for name in ("api", "worker", "cron", "db", "cache", "proxy", "agent", "logs",
                                            "metrics", "queue", "search", "auth")]
    out = []
    rss = {s: rng.randint(40, 900) for s in services}
    for v in range(count):
        if v % 10 == 0:  # now and then a service restarts
            rss[services[rng.randrange(len(services))]] = rng.randint(40, 900)
        out.append({
            "system": {"os": "Linux", "release": "6.18.44-fc", "machine": "x86_64", "hostname_len": 9},
            "cpu": {"count": 2, "load_1m": round(rng.uniform(0, 4), 1), "load_15m": round(1 + v % 3 * 0.1, 1)},
            "memory": {"total_mb": 24105, "available_mb": 23000 + rng.randrange(0, 800, 100)},
            "disk": {"/": {"total_gb": 252.0, "free_gb": round(63.4 - v * 0.001, 1)},
                     "/data": {"total_gb": 1024.0, "free_gb": 512.0}},
            "python": {"version": "3.11.7", "executable": "/work/venv/bin/python"},
            "services": {s: {"state": "running", "restarts": 0, "rss_mb": rss[s] // 50 * 50} for s in services},
            "net": {f"eth{i}": {"up": True, "mtu": 1500, "addrs": [f"10.0.{i}.{v % 4 + 10}"]} for i in range(4)},
            "uptime_h": round(100 + v * 0.02, 1),
        })
    return out


def components(variants: list[dict[str, Any]], rounds: int = 3) -> dict[str, float]:
    """Pure-CPU parts of take() and of the differ, timed alone (best of `rounds`, µs per call)."""
    import msgspec
    from fleetlog.schemas import encode_event, new_event_id, now_iso
    from fleetlog.schemas.snapshots import HostSnapshot, diff_data

    n = len(variants)

    def best(fn: Any) -> float:
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for i in range(1, n):
                fn(i)
            times.append((time.perf_counter() - t0) / (n - 1) * 1e6)
        return round(min(times), 1)

    frozen = [msgspec.json.decode(msgspec.json.encode(v)) for v in variants]
    payloads = [encode_event(HostSnapshot(id=new_event_id(), ts=now_iso(), host="h", agent="a", data=f))
                for f in frozen]
    validate = msgspec.json.Decoder(HostSnapshot).decode
    return {
        "take_copy_encode_decode": best(lambda i: msgspec.json.decode(msgspec.json.encode(dict(variants[i])))),
        "take_event_encode": best(lambda i: encode_event(HostSnapshot(
            id=new_event_id(), ts=now_iso(), host="host-00", agent="agent-0", data=frozen[i]))),
        "take_validating_decode": best(lambda i: validate(payloads[i])),
        "differ_diff_data": best(lambda i: diff_data(frozen[i - 1], frozen[i])),
    }


class FoldCounter:
    """Counts the projector's fold transactions (`Folder.apply` calls) and their wall time (fold thread)."""

    def __init__(self, srv: Any) -> None:
        self.folder = srv.projector.folder
        self.inner = self.folder.apply
        self.batches = self.events = 0
        self.seconds = 0.0
        self.folder.apply = self._apply

    def _apply(self, projection: Any, schema: str, stream: str, batch: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.inner(projection, schema, stream, batch)
        finally:
            self.seconds += time.perf_counter() - t0
            self.batches += 1
            self.events += len(batch)

    def snapshot(self) -> tuple[int, int, float]:
        return self.batches, self.events, self.seconds

    def since(self, before: tuple[int, int, float]) -> dict[str, Any]:
        b, e, s = self.batches - before[0], self.events - before[1], self.seconds - before[2]
        return {"fold_batches": b, "fold_events": e, "fold_s": round(s, 2),
                "fold_ms_per_batch": round(s / b * 1000, 2) if b else None}


def sql_alone(path: Path, projection: str, queries: list[tuple[str, str, list[list[Any]]]], calls: int = 20
              ) -> dict[str, dict[str, float]]:
    """The endpoints' SQL run straight on the view file (read-only, after the Server stopped):
    what a query costs in DuckDB alone, without the query service, NATS and JSON. Each query
    runs once per parameter list given (a call that the client sends as several requests)."""
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    try:
        row = con.execute("SELECT schema_name FROM fleetlog_generations WHERE name = ? AND state = 'live'",
                          [projection]).fetchone()
        assert row is not None
        con.execute(f'USE "{row[0]}"')
        out = {}
        for label, sql, param_lists in queries:
            for params in param_lists:
                con.execute(sql, params).fetchall()
            times = []
            for _ in range(calls):
                t0 = time.perf_counter()
                for params in param_lists:
                    con.execute(sql, params).fetchall()
                times.append(time.perf_counter() - t0)
            out[label] = ms(times)
        return out
    finally:
        con.close()


# -- snapshots -------------------------------------------------------------------------------


async def bench_snapshots(args: argparse.Namespace) -> dict[str, Any]:
    import nats
    from fleetlog.services.node.server import Server
    from fleetlog.services.reactors.snapshot_differ import SnapshotDiffer

    variants = snapshot_variants(500)
    data_bytes = sum(len(json.dumps(v, separators=(",", ":"))) for v in variants) / len(variants)
    subjects = [(f"host-{i // 5:02d}", f"agent-{i % 5}") for i in range(args.subjects)]
    ns = len(subjects)

    def pick(i: int) -> tuple[str, str, dict[str, Any]]:
        host, agent = subjects[i % ns]
        return host, agent, variants[(i // ns) % len(variants)]

    out: dict[str, Any] = {"data_bytes": round(data_bytes), "subjects": ns, "components_us": components(variants)}
    async with broker(prefix="fleetlog-bench-snap-") as (b, work):
        bpid = b.process.pid if b.process else None
        settings = settings_for(b.url, work / "data", reactors=False)
        fleet = await Fleet.connect(settings=settings)
        await fleet.flush(10)  # connected, streams ensured
        take = fleet.snapshots.take
        for i in range(2000):  # warm-up (not counted below)
            host, agent, data = pick(i)
            take(agent, data, host=host)
            if i % 100 == 99:
                await asyncio.sleep(0)
        await fleet.flush(60)
        taken = 2000

        # 1. call cost
        samples: list[int] = []
        clock = time.perf_counter_ns
        g0 = gc_collections()
        mon = CpuMonitor().start()
        for i in range(taken, taken + args.take_calls):
            host, agent, data = pick(i)
            t0 = clock()
            take(agent, data, host=host)
            samples.append(clock() - t0)
            if i % 100 == 99:
                await asyncio.sleep(0)
        out["take_call_us"] = us(samples)
        out["take_call_gc_collections"] = gc_collections() - g0
        await fleet.flush(120)
        out["take_call_cpu"] = mon.stop()
        taken += args.take_calls

        # 2. acked throughput
        cpu = CpuPer(bpid).start()
        mon = CpuMonitor().start()
        t0 = time.perf_counter()
        for i in range(taken, taken + args.take_n):
            host, agent, data = pick(i)
            take(agent, data, host=host)
            if i % 100 == 99:
                await asyncio.sleep(0)
        t_take = time.perf_counter() - t0
        token = await fleet.flush(300)
        dt = time.perf_counter() - t0
        taken += args.take_n
        stats = fleet.publisher_stats()
        assert stats.acked == taken and stats.spooled == 0 and stats.dead_lettered == 0, stats
        out["take_acked"] = {"n": args.take_n, "take_phase_s": round(t_take, 3), "total_s": round(dt, 3),
                             "per_s": round(args.take_n / dt),
                             "mb_per_s": round(args.take_n * data_bytes / dt / 1e6, 1),
                             **cpu.stop(args.take_n), "cpu": mon.stop()}

        # 3. the differ alone (no projector in the process yet) over the first --diff-alone-n snapshots
        nc = await nats.connect(b.url)
        differ = SnapshotDiffer(nc)
        await differ.start()

        async def run_differ(n: int) -> dict[str, Any]:
            p0, c0 = differ.published, differ.covered
            out0 = nc.stats["out_msgs"]
            cpu = CpuPer(bpid).start()
            mon = CpuMonitor().start()
            t0 = time.perf_counter()
            handled = 0
            while handled < n:
                got = await differ.run_once(timeout=2.0)
                if not got:
                    break
                handled += got
            dt = time.perf_counter() - t0
            published = differ.published - p0
            requests = nc.stats["out_msgs"] - out0  # direct gets, publishes, fetches and acks
            return {"handled": handled, "published": published, "covered": differ.covered - c0,
                    "messages_sent_per_snapshot": round(requests / max(1, handled), 2),
                    "s": round(dt, 2), "diffs_per_s": round(published / dt), **cpu.stop(max(1, handled)),
                    "cpu": mon.stop()}

        out["differ_alone"] = await run_differ(args.diff_alone_n)

        # 4. the in-process Server folds the snapshots; then the differ goes on next to it
        srv = Server(settings)
        t0 = time.perf_counter()
        await srv.start()
        await wait_service(fleet)
        folds = FoldCounter(srv)
        try:
            first = await folded(lambda: fleet.snapshots.latest(limit=500, min_seq=token))
            assert len(first.items) == ns, len(first.items)
            fold_s = time.perf_counter() - t0
            out["fold_snapshots"] = {"n": taken, "s": round(fold_s, 2), "per_s": round(taken / fold_s)}

            f0 = folds.snapshot()
            out["differ"] = await run_differ(args.diff_n)
            out["differ"].update(**folds.since(f0))
            out["differ"].update(snapshots_in_stream=taken, skipped=differ.skipped, failed=differ.failed)
            await differ.stop()
            js = nc.jetstream()
            diffs_last = (await js.stream_info("FLEET_DIFFS")).state.last_seq
            await nc.close()
            page = await folded(lambda: fleet.snapshots.diffs(after_seq=diffs_last - 20, limit=20,
                                                              min_seq={"FLEET_DIFFS": diffs_last}))
            out["differ"]["diff_stream_last_seq"] = diffs_last
            out["differ"]["leaves_per_diff_last_20"] = round(
                sum(len(d.added) + len(d.removed) + len(d.changed) for d in page.items) / max(1, len(page.items)), 1)

            # 5. queries over the resulting view
            for _ in range(5):
                await fleet.snapshots.latest(limit=100)
                await fleet.snapshots.history(*subjects[0], limit=10)
            lat: list[float] = []
            hist: list[float] = []
            mon = CpuMonitor().start()
            for q in range(args.queries):
                t0 = time.perf_counter()
                page_l = await fleet.snapshots.latest(limit=100)
                t1 = time.perf_counter()
                page_h = await fleet.snapshots.history(*subjects[q % ns], limit=10)
                t2 = time.perf_counter()
                lat.append(t1 - t0)
                hist.append(t2 - t1)
                assert len(page_l.items) == ns and len(page_h.items) == 10
            out["latest_ms"] = ms(lat)
            out["history_ms"] = ms(hist)
            out["queries_cpu"] = mon.stop()
            out["view_snapshots"] = taken
        finally:
            await fleet.close()
            await srv.stop()
        from fleetlog.projections.snapshots import _ROW

        out["sql_alone_ms"] = await asyncio.to_thread(sql_alone, settings.views_path(), "snapshots", [
            ("latest", f"SELECT {_ROW} FROM snapshots QUALIFY row_number() OVER (PARTITION BY host, agent"
             " ORDER BY seq DESC) = 1 ORDER BY host, agent LIMIT ?", [[101]]),
            ("history", f"SELECT {_ROW} FROM snapshots WHERE host = ? AND agent = ? AND seq < ? ORDER BY seq DESC"
             " LIMIT ?", [[*subjects[0], 1 << 62, 11]]),
        ])
    return out


# -- main ------------------------------------------------------------------------------------


def cpu_per(r: dict[str, Any], unit: str) -> str:
    return (f"client {r['client_cpu_us_per_op']} (sys {r['client_sys_cpu_us_per_op']}) / broker "
            f"{r['broker_cpu_us_per_op']} µs CPU per {unit}")


def report(snap: dict[str, Any] | None) -> None:
    rows: list[tuple[Any, ...]] = []
    if snap:
        tc, ta, comp = snap["take_call_us"], snap["take_acked"], snap["components_us"]
        d, da = snap["differ"], snap["differ_alone"]
        rows += [
            (f"snapshots.take() call (~{snap['data_bytes']} B data)", f"p50 {tc['p50']} µs, p99 {tc['p99']} µs",
             f"p99.9 {tc['p99.9']} µs, {snap['take_call_gc_collections']} gc collections",
             snap["take_call_cpu"]["foreign_cores"]),
            ("  parts alone: copy / encode / validate / diff_data", " / ".join(f"{v} µs" for v in comp.values()),
             "pure CPU, best of 3", ""),
            (f"take() × {ta['n']:,} then flush (acked)", f"{ta['per_s']:,}/s ({ta['mb_per_s']} MB/s)",
             cpu_per(ta, "op"),
             ta["cpu"]["foreign_cores"]),
            (f"view folds {snap['fold_snapshots']['n']:,} snapshots (in-process Server)",
             f"{snap['fold_snapshots']['per_s']:,}/s", f"{snap['fold_snapshots']['s']} s incl. start", ""),
            (f"differ alone, {da['handled']:,} snapshots on {snap['subjects']} subjects",
             f"{da['diffs_per_s']:,} diffs/s", f"published {da['published']:,}, covered {da['covered']}, "
             + cpu_per(da, "diff") + f"; {da['messages_sent_per_snapshot']} msgs sent per snapshot",
             da["cpu"]["foreign_cores"]),
            (f"differ next to the Server, {d['handled']:,} more",
             f"{d['diffs_per_s']:,} diffs/s; {d['fold_batches']:,} fold txns of {d['fold_ms_per_batch']} ms",
             f"published {d['published']:,}, covered {d['covered']}, " + cpu_per(d, "diff"),
             d["cpu"]["foreign_cores"]),
            (f"latest(limit=100) over {snap['view_snapshots']:,} rows",
             f"p50 {snap['latest_ms']['p50']} ms, p99 {snap['latest_ms']['p99']} ms", "",
             snap["queries_cpu"]["foreign_cores"]),
            ("history(host, agent, limit=10)",
             f"p50 {snap['history_ms']['p50']} ms, p99 {snap['history_ms']['p99']} ms",
             f"SQL alone p50: latest {snap['sql_alone_ms']['latest']['p50']} ms, "
             f"history {snap['sql_alone_ms']['history']['p50']} ms",
             snap["queries_cpu"]["foreign_cores"]),
        ]
    print(table(rows, ["what", "figure", "detail", "foreign cores"]))


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--take-calls", type=int, default=20_000)
    ap.add_argument("--take-n", type=int, default=20_000)
    ap.add_argument("--subjects", type=int, default=50)
    ap.add_argument("--diff-alone-n", type=int, default=3000,
                    help="diff (at least) this many snapshots before the in-process Server starts")
    ap.add_argument("--diff-n", type=int, default=8000, help="then (at least) this many next to the Server")
    ap.add_argument("--queries", type=int, default=200)
    args = ap.parse_args()
    t0 = time.perf_counter()
    version = code_version()
    print(f"code: {version['commit']}, library files changed since: {version['dirty_library_files'] or 'none'}")
    snap = await bench_snapshots(args)
    report(snap)
    emit_json("families", {"snapshots": snap, "wall_s": round(time.perf_counter() - t0, 1),
                           "unavailable_retries": UNAVAILABLE, "code": version,
                           "args": vars(args)})


if __name__ == "__main__":
    asyncio.run(main())
