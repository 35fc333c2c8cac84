"""Replay throughput: nats-py ordered consumer vs. fleetlog's bulk OrderedReader.

Why: the projector must replay a stream of ~1M events at >= 150k events/s; this bench
shows how fast the bulk reader drains a stream (target >= 300k records/s on 2 cores), both as
columns (`next_columns`, the projector's call) and as `StreamRecord` tuples (`next_batch`), how
it compares with nats-py's ordered push consumer on the same data, and what nats-server
itself can push to one push consumer (a raw socket drain that parses nothing).

Starts a private nats-server (JetStream, file store) in a temp dir, publishes N ~400-byte
JSON messages, then drains the stream with each client, twice:

* cold: broker restarted just before, so its block cache is empty (a replay after a quiet
  period: what the projector sees on start-up);
* warm: the same drain repeated at once (nats-server keeps blocks cached for ~10 s).

Run:  python bench/bench_stream_reader.py --n 1000000 [--msg-id]
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
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
import nats
from fleetlog.services.node.broker import EmbeddedBroker, free_port
from fleetlog.services.projector.stream_reader import OrderedReader
from nats.aio.msg import Msg

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
        "note": "x" * 200,
    }
    return msgspec.json.encode(event)


async def _publish(url: str, n: int, window: int, msg_id: bool) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream(publish_async_max_pending=window * 2)
    await js.add_stream(name=STREAM, subjects=["fleet.>"])
    t0 = time.perf_counter()
    for base in range(0, n, window):
        futs = [
            await js.publish_async(
                f"fleet.agent{i % 16}", _payload(i), headers={"Nats-Msg-Id": f"01J{i:023d}"} if msg_id else None
            )
            for i in range(base, min(n, base + window))
        ]
        await asyncio.gather(*futs)
    dt = time.perf_counter() - t0
    info = await js.stream_info(STREAM)
    assert info.state.messages == n, info.state
    hdr = " + Nats-Msg-Id header" if msg_id else ""
    print(f"published {n:,} msgs (~{len(_payload(n // 2))} B JSON{hdr}) in {dt:.1f}s ({n / dt:,.0f}/s)")
    await nc.close()


async def _bench_natspy(url: str, n: int) -> float:
    nc = await nats.connect(url)
    js = nc.jetstream()
    done = asyncio.Event()
    count = 0

    async def cb(msg: Msg) -> None:
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


async def _bench_columns(url: str, n: int) -> float:
    """What the projector does: columns, no header blocks kept."""
    reader = OrderedReader(url, STREAM, 1, keep_headers=False)
    t0 = time.perf_counter()
    await reader.start()
    got = 0
    last = 0
    while got < n:
        batch = await reader.next_columns(5000, 0.05)
        if batch is not None:
            assert batch.seqs[0] == last + 1, (batch.seqs[0], last)
            last = batch.last_seq
            got += len(batch)
    dt = time.perf_counter() - t0
    await reader.close()
    assert last == n
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


async def _bench_ceiling(url: str, n: int) -> float:
    """Server-side ceiling: the same kind of push consumer drained with no parsing at all.

    Counts frame starts in raw socket reads (no flow control, no heartbeats, so nothing needs
    answering).  Whatever this reaches is what nats-server pushes to one consumer here.
    """
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    r, w = await asyncio.open_connection(host, int(port), limit=1 << 22)
    await r.readline()  # INFO
    w.write(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"protocol":1}\r\nPING\r\n')
    await r.readline()  # PONG
    cfg = {
        "stream_name": STREAM,
        "config": {
            "deliver_policy": "all",
            "ack_policy": "none",
            "max_deliver": 1,
            "replay_policy": "instant",
            "mem_storage": True,
            "num_replicas": 1,
            "inactive_threshold": 5_000_000_000,
            "deliver_subject": "ceiling.deliver",
        },
    }
    body = msgspec.json.encode(cfg)
    t0 = time.perf_counter()
    # No SUB for the API reply: only deliveries arrive on this connection.
    w.write(
        b"SUB ceiling.deliver 2\r\nPUB $JS.API.CONSUMER.CREATE.%s ceiling.reply %d\r\n%s\r\n"
        % (STREAM.encode(), len(body), body)
    )
    frames = 0
    tail = b""
    while frames < n:
        data = await r.read(1 << 20)
        if not data:
            raise RuntimeError(f"server closed the ceiling connection after {frames} frames")
        frames += (tail + data).count(b"MSG ")  # also matches HMSG; the 3-byte tail catches split ones
        tail = data[-3:]
    dt = time.perf_counter() - t0
    w.close()
    return n / dt


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="messages to publish and read")
    ap.add_argument("--window", type=int, default=4000, help="publish_async futures gathered at once")
    ap.add_argument("--skip-natspy", action="store_true", help="only measure OrderedReader (and the ceiling)")
    ap.add_argument(
        "--msg-id", action="store_true", help="publish with a Nats-Msg-Id header (as fleetlog's publisher does)"
    )
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="fleetlog-bench-")
    broker = EmbeddedBroker(Path(tmp), port=free_port())
    await broker.start()
    try:
        await _publish(broker.url, args.n, args.window, args.msg_id)
        print(f"cores: {os.cpu_count()}, python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.2f}")
        phases: list[tuple[str, Callable[[str, int], Awaitable[float]]]] = [
            ("OrderedReader.next_columns(5000, 0.05)", _bench_columns),
            ("OrderedReader.next_batch(5000, 0.05)", _bench_reader),
            ("nats-py ordered consumer, no-op cb", _bench_natspy),
            ("ceiling: raw socket drain, no parsing", _bench_ceiling),
        ]
        if args.skip_natspy:
            del phases[2]
        rates: dict[str, tuple[float, float]] = {}
        for label, fn in phases:
            await broker.stop()
            await broker.start()
            cold = await fn(broker.url, args.n)
            warm = await fn(broker.url, args.n)
            rates[label] = (cold, warm)
            print(f"{label:40s} cold {cold:9,.0f}/s  warm {warm:9,.0f}/s  (process peak RSS {_rss_peak_mib():.0f} MiB)")
        reader = rates[phases[0][0]]
        if not args.skip_natspy:
            natspy = rates[phases[2][0]]
            print(
                f"ratio OrderedReader / nats-py: cold {reader[0] / natspy[0]:.1f}x, warm {reader[1] / natspy[1]:.1f}x"
            )
        ceiling = rates[phases[-1][0]]
        print(f"OrderedReader / server ceiling: cold {reader[0] / ceiling[0]:.0%}, warm {reader[1] / ceiling[1]:.0%}")
    finally:
        await broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
