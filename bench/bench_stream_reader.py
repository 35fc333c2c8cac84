"""Replay throughput: nats-py ordered consumer vs. fleetlog's bulk OrderedReader.

Why: the projector must replay a stream of ~1M events at >= 150k events/s; this bench
shows whether the bulk reader clears that bar (target >= 300k records/s on 2 cores) and
how it compares with nats-py's ordered push consumer on the same data.

Starts a private nats-server (JetStream, file store) in a temp dir, publishes N ~400-byte
JSON messages, then drains the stream with each reader.  Run:

    python bench/bench_stream_reader.py --n 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import nats
from fleetlog.services.broker import EmbeddedBroker, free_port
from fleetlog.services.stream_reader import OrderedReader

STREAM = "BENCH"


def _rss_peak_mib() -> float:
    # ru_maxrss is KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _payload(i: int) -> bytes:
    event = {
        "kind": "tool_call.finished",
        "agent_id": f"agent-{i % 97:04d}",
        "run_id": f"run-{i // 1000:08d}",
        "seq": i,
        "ts": 1_700_000_000_000 + i,
        "tool": "shell.exec",
        "status": "ok",
        "duration_ms": i % 5000,
        "tokens": {"prompt": i % 4096, "completion": i % 1024},
        "note": "x" * 170,
    }
    return msgspec.json.encode(event)


async def _publish(url: str, n: int, window: int) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream(publish_async_max_pending=window * 2)
    await js.add_stream(name=STREAM, subjects=["fleet.>"])
    t0 = time.perf_counter()
    for base in range(0, n, window):
        futs = [await js.publish_async(f"fleet.agent{i % 16}", _payload(i)) for i in range(base, min(n, base + window))]
        await asyncio.gather(*futs)
    dt = time.perf_counter() - t0
    info = await js.stream_info(STREAM)
    assert info.state.messages == n, info.state
    print(f"published {n:,} msgs ({len(_payload(0))} B each) in {dt:.1f}s ({n / dt:,.0f}/s)")
    await nc.close()


async def _bench_natspy(url: str, n: int) -> float:
    nc = await nats.connect(url)
    js = nc.jetstream()
    done = asyncio.Event()
    count = 0

    async def cb(msg: nats.aio.msg.Msg) -> None:
        nonlocal count
        count += 1
        if count >= n:
            done.set()

    t0 = time.perf_counter()
    sub = await js.subscribe("fleet.>", cb=cb, ordered_consumer=True, pending_msgs_limit=-1, pending_bytes_limit=-1)
    await done.wait()
    dt = time.perf_counter() - t0
    with contextlib.suppress(Exception):
        await sub.unsubscribe()
    await nc.close()
    return n / dt


async def _bench_reader(url: str, n: int) -> float:
    reader = OrderedReader(url, STREAM, 1)
    t0 = time.perf_counter()
    await reader.start()
    got = 0
    last = 0
    while got < n:
        batch = await reader.next_batch(5000, 0.05)
        if batch:
            assert batch[0].seq == last + 1, (batch[0].seq, last)
            last = batch[-1].seq
            got += len(batch)
    dt = time.perf_counter() - t0
    await reader.close()
    assert last == n
    return n / dt


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="messages to publish and read")
    ap.add_argument("--window", type=int, default=4000, help="publish_async futures gathered at once")
    ap.add_argument("--skip-natspy", action="store_true", help="only measure OrderedReader")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="fleetlog-bench-")
    broker = EmbeddedBroker(Path(tmp), port=free_port())
    await broker.start()
    url = broker.url
    try:
        await _publish(url, args.n, args.window)
        print(f"cores: {os.cpu_count()}, python {sys.version.split()[0]}")
        rss0 = _rss_peak_mib()
        reader_rate = await _bench_reader(url, args.n)
        rss_reader = _rss_peak_mib()
        print(f"OrderedReader.next_batch(5000, 0.05): {reader_rate:12,.0f} records/s  (peak RSS {rss_reader:.0f} MiB)")
        if not args.skip_natspy:
            natspy_rate = await _bench_natspy(url, args.n)
            rss = _rss_peak_mib()
            print(f"nats-py ordered consumer (no-op cb):  {natspy_rate:12,.0f} msgs/s     (peak RSS {rss:.0f} MiB)")
            print(f"ratio OrderedReader / nats-py: {reader_rate / natspy_rate:.1f}x")
        print(f"peak RSS before reading {rss0:.0f} MiB, after OrderedReader {rss_reader:.0f} MiB")
    finally:
        await broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
