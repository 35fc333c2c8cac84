"""Host snapshots: take-time diffs, awaited take() latency, racing takers, gather(), queries.

No issue sets targets for this family; this bench only measures. It gets its own private
nats-server (temp dir, free port). The client takes snapshots before any projector runs (as
in bench_publish.py); then an in-process `Server` (fleetlog.services.node.server, with
reactors=False as in tests/conftest.py) folds them and answers the queries.

* pure CPU, best of 3: `compute_diff_fields` and `diff_changes` on consecutive ~1.3 KB nested
  snapshots (host facts, 12 services, 4 interfaces; a few leaves change each time).
* `gather()`: the container's probes on this machine (pgrep, tmux, screen as installed), p50/p99.
* `take()` awaited, one at a time: --take-calls takes over --subjects (host, agent) subjects;
  each is a direct get of the subject's last snapshot, the diff, a guarded publish, and (when
  something changed) a diff record through the publisher. p50/p99 µs.
* concurrent: one take per subject at once (asyncio.gather), --take-n in all; takes/s.
* racing: --racers clients (own connections) taking --race-n snapshots each of ONE agent at
  once; takes/s and the lost races (WrongLastSequence retries) per take.
* the Server folds everything; `latest(agent, host)`, `all_latest(limit=100)` and
  `history(agent, host, limit=10)` through the query service, p50/p99 over --queries calls.

    python bench/bench_families.py [--take-calls 3000] [--take-n 6000] [--racers 10] [--race-n 100]
"""

from __future__ import annotations

import argparse
import asyncio
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
    """The diff rules alone (best of `rounds`, µs per call)."""
    import msgspec
    from fleetlog.schemas.snapshots import compute_diff_fields, diff_changes

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
    return {
        "compute_diff_fields": best(lambda i: compute_diff_fields(frozen[i - 1], frozen[i])),
        "diff_changes": best(lambda i: diff_changes(frozen[i - 1], frozen[i])),
        "fields_per_diff": round(sum(len(compute_diff_fields(frozen[i - 1], frozen[i])) for i in range(1, n))
                                 / (n - 1), 1),
    }


# -- snapshots -------------------------------------------------------------------------------


async def bench_snapshots(args: argparse.Namespace) -> dict[str, Any]:
    from fleetlog.services.client.snapshots import take as snapshot_take
    from fleetlog.services.client.snapshots.gather import gather
    from fleetlog.services.node.server import Server

    variants = snapshot_variants(500)
    data_bytes = sum(len(json.dumps(v, separators=(",", ":"))) for v in variants) / len(variants)
    subjects = [(f"host-{i // 5:02d}", f"agent-{i % 5}") for i in range(args.subjects)]
    ns = len(subjects)
    out: dict[str, Any] = {"data_bytes": round(data_bytes), "subjects": ns, "components_us": components(variants)}
    samples: list[int] = []
    clock = time.perf_counter_ns
    for _ in range(20):
        t0 = clock()
        gather("bench-agent")
        samples.append(clock() - t0)
    out["gather_us"] = us(samples)

    # Lost races, counted where the taker retries (the guarded publish raising WrongLastSequence).
    races = [0]
    wrong = snapshot_take.WrongLastSequence
    publish = snapshot_take.Guarded.publish

    async def counting(self: Any, *a: Any, **kw: Any) -> Any:
        try:
            return await publish(self, *a, **kw)
        except wrong:
            races[0] += 1
            raise

    snapshot_take.Guarded.publish = counting  # type: ignore[method-assign]
    async with broker(prefix="fleetlog-bench-snap-") as (b, work):
        bpid = b.process.pid if b.process else None
        settings = settings_for(b.url, work / "data", reactors=False)
        fleet = await Fleet.connect(settings=settings)
        await fleet.flush(10)  # connected, streams ensured
        take = fleet.snapshots.take
        taken = 0

        def pick(i: int) -> tuple[str, str, dict[str, Any]]:
            host, agent = subjects[i % ns]
            return host, agent, variants[(i // ns) % len(variants)]

        for i in range(200):  # warm-up (not counted below)
            host, agent, data = pick(i)
            await take(agent, data, host=host)
        taken += 200

        # 1. one at a time
        samples = []
        cpu = CpuPer(bpid).start()
        mon = CpuMonitor().start()
        for i in range(taken, taken + args.take_calls):
            host, agent, data = pick(i)
            t0 = clock()
            await take(agent, data, host=host)
            samples.append(clock() - t0)
        out["take_us"] = us(samples)
        out["take_cpu"] = {**cpu.stop(args.take_calls), "cpu": mon.stop()}
        taken += args.take_calls

        # 2. one take per subject at once
        cpu = CpuPer(bpid).start()
        mon = CpuMonitor().start()
        t0 = time.perf_counter()
        for start in range(taken, taken + args.take_n, ns):
            await asyncio.gather(*(take(a, d, host=h) for h, a, d in map(pick, range(start, start + ns))))
        token = await fleet.flush(300)
        dt = time.perf_counter() - t0
        taken += args.take_n
        out["take_concurrent"] = {"n": args.take_n, "s": round(dt, 2), "per_s": round(args.take_n / dt),
                                  **cpu.stop(args.take_n), "cpu": mon.stop()}

        # 3. racers on one agent
        racers = [await Fleet.connect(settings=settings, name=f"racer-{i}") for i in range(args.racers)]
        r0 = races[0]
        mon = CpuMonitor().start()
        t0 = time.perf_counter()

        async def race(k: int, client: Fleet) -> None:
            for j in range(args.race_n):
                await client.snapshots.take("raced", variants[(k * args.race_n + j) % len(variants)], host="race")

        await asyncio.gather(*(race(k, c) for k, c in enumerate(racers)))
        for c in racers:
            await c.flush(60)
        dt = time.perf_counter() - t0
        n_race = args.racers * args.race_n
        out["take_racing"] = {"racers": args.racers, "n": n_race, "s": round(dt, 2), "per_s": round(n_race / dt),
                              "lost_races_per_take": round((races[0] - r0) / n_race, 2), "cpu": mon.stop()}
        for c in racers:
            await c.close()
        taken += n_race
        token = await fleet.flush(60)

        # 4. the in-process Server folds them; queries over the view
        srv = Server(settings)
        t0 = time.perf_counter()
        await srv.start()
        await wait_service(fleet)
        try:
            first = await folded(lambda: fleet.snapshots.all_latest(limit=500, min_seq=token))
            assert len(first.items) == ns + 1, len(first.items)
            fold_s = time.perf_counter() - t0
            out["fold_snapshots"] = {"n": taken, "s": round(fold_s, 2), "per_s": round(taken / fold_s)}
            lat: list[float] = []
            every: list[float] = []
            hist: list[float] = []
            mon = CpuMonitor().start()
            for q in range(args.queries):
                host, agent = subjects[q % ns]
                t0 = time.perf_counter()
                one = await fleet.snapshots.latest(agent, host)
                t1 = time.perf_counter()
                page_l = await fleet.snapshots.all_latest(limit=100)
                t2 = time.perf_counter()
                page_h = await fleet.snapshots.history(agent, host, limit=10)
                t3 = time.perf_counter()
                lat.append(t1 - t0)
                every.append(t2 - t1)
                hist.append(t3 - t2)
                assert one is not None and len(page_l.items) == ns + 1 and len(page_h.items) == 10
            out["latest_ms"], out["all_latest_ms"], out["history_ms"] = ms(lat), ms(every), ms(hist)
            out["queries_cpu"] = mon.stop()
            out["view_snapshots"] = taken
        finally:
            await fleet.close()
            await srv.stop()
            snapshot_take.Guarded.publish = publish  # type: ignore[method-assign]
    return out


# -- main ------------------------------------------------------------------------------------


def cpu_per(r: dict[str, Any], unit: str) -> str:
    return (f"client {r['client_cpu_us_per_op']} (sys {r['client_sys_cpu_us_per_op']}) / broker "
            f"{r['broker_cpu_us_per_op']} µs CPU per {unit}")


def report(snap: dict[str, Any] | None) -> None:
    rows: list[tuple[Any, ...]] = []
    if snap:
        comp, tk, tc, tr = snap["components_us"], snap["take_us"], snap["take_concurrent"], snap["take_racing"]
        rows += [
            (f"compute_diff_fields / diff_changes (~{snap['data_bytes']} B snapshots)",
             f"{comp['compute_diff_fields']} / {comp['diff_changes']} µs",
             f"{comp['fields_per_diff']} fields per diff; pure CPU, best of 3", ""),
            ("gather() (the container's probes)", f"p50 {snap['gather_us']['p50']} µs",
             f"p99 {snap['gather_us']['p99']} µs", ""),
            ("take() awaited, one at a time", f"p50 {tk['p50']} µs, p99 {tk['p99']} µs",
             cpu_per(snap["take_cpu"], "take"), snap["take_cpu"]["cpu"]["foreign_cores"]),
            (f"take() one per subject at once, {tc['n']:,}", f"{tc['per_s']:,}/s", cpu_per(tc, "take"),
             tc["cpu"]["foreign_cores"]),
            (f"{tr['racers']} racers on one agent, {tr['n']:,} takes", f"{tr['per_s']:,}/s",
             f"{tr['lost_races_per_take']} lost races per take", tr["cpu"]["foreign_cores"]),
            (f"view folds {snap['fold_snapshots']['n']:,} snapshots (in-process Server)",
             f"{snap['fold_snapshots']['per_s']:,}/s", f"{snap['fold_snapshots']['s']} s incl. start", ""),
            ("latest(agent, host) / all_latest(limit=100) / history(limit=10)",
             f"p50 {snap['latest_ms']['p50']} / {snap['all_latest_ms']['p50']} / {snap['history_ms']['p50']} ms",
             f"p99 {snap['latest_ms']['p99']} / {snap['all_latest_ms']['p99']} / {snap['history_ms']['p99']} ms",
             snap["queries_cpu"]["foreign_cores"]),
        ]
    print(table(rows, ["what", "figure", "detail", "foreign cores"]))


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--take-calls", type=int, default=3000)
    ap.add_argument("--take-n", type=int, default=6000)
    ap.add_argument("--subjects", type=int, default=50)
    ap.add_argument("--racers", type=int, default=10)
    ap.add_argument("--race-n", type=int, default=100)
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
