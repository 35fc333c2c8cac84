"""The bulk reader's segments (issue 19, fourth round): payloads read into segments, handed out
as Arrow, segments read into again.

Why: the reader no longer copies each payload into its own `bytes`; it keeps (start, end) in the
segment the socket wrote it to, gathers a batch's payloads into Arrow at hand-out, and reuses a
segment once none of its records is buffered. A wrong span, a frame split across segments, or a
segment written again while a handed-out batch still reads it would corrupt payloads; with
segments of a few KB every one of those edges is crossed many times here. Real nats-server, no
timing asserts.
"""

from __future__ import annotations

import asyncio

import nats
import pytest
from fleetlog.services.node.broker import EmbeddedBroker
from fleetlog.services.projector import stream_parse
from fleetlog.services.projector.stream_reader import OrderedReader, StreamBatch

STREAM = "SEGS"
# Sizes that straddle the 4 KB test segments: empty, small, a few KB, more than a segment.
SIZES = (0, 1, 37, 700, 3000, 4095, 9000)


def _payload(i: int) -> bytes:
    size = SIZES[i % len(SIZES)]
    return (f"{i}:".encode() + bytes([65 + i % 26]) * size)[:size] if size else b""


async def test_payloads_survive_small_segments_and_their_reuse(
    broker: EmbeddedBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stream_parse, "_SEGMENT_BYTES", 4096)
    monkeypatch.setattr(stream_parse, "_MIN_READ", 1024)
    n = 3000
    nc = await nats.connect(broker.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name=STREAM, subjects=["seg.>"])
        for base in range(0, n, 500):
            futs = [await js.publish_async(f"seg.s{i % 5}", _payload(i)) for i in range(base, base + 500)]
            await asyncio.gather(*futs)
    finally:
        await nc.close()

    reader = OrderedReader([broker.url], STREAM, 1, keep_headers=False, max_buffer_bytes=64 * 1024)
    await reader.start()
    batches: list[StreamBatch] = []
    spares_seen = 0
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        got = 0
        sizes = (1, 7, 50, 333)
        while got < n:
            assert loop.time() < deadline, f"only {got} of {n}; last_error={reader.last_error}"
            batch = await reader.next_columns(sizes[len(batches) % len(sizes)], 0.2)
            if batch is None:
                continue
            batches.append(batch)  # kept: later reads must not write into what it reads
            got += len(batch)
            spares_seen = max(spares_seen, len(reader._spare))
        assert await reader.next_columns(10, 0.2) is None
        assert not reader._segs and not reader._spans  # nothing handed out stays referenced
    finally:
        await reader.close()

    seqs = [s for b in batches for s in b.seqs]
    assert seqs == list(range(1, n + 1))
    payloads = [p for b in batches for p in b.payloads.to_pylist()]
    assert payloads == [_payload(i) for i in range(n)]
    assert [p for b in batches for p in b.data] == payloads
    assert [s for b in batches for s in b.subjects] == [f"seg.s{i % 5}" for i in range(n)]
    # The edges were crossed: batches spanning several segments, and segments read into again.
    assert max(b.payloads.num_chunks for b in batches) > 1
    assert spares_seen > 0


async def test_a_big_frame_followed_by_less_than_its_size_is_not_held_back(broker: EmbeddedBroker) -> None:
    """Review of the fourth round: after a 600 KB frame, what it still `_need`ed stayed set, so
    the next small frames waited for 600 KB more bytes (in practice until an idle heartbeat;
    here the heartbeat is 60 s away and the reader must deliver within 30)."""
    nc = await nats.connect(broker.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="BIG", subjects=["big.>"])
        for i in range(5):
            await js.publish("big.x", b"small %d" % i)
        await js.publish("big.x", b"B" * 600_000)
        for i in range(5):
            await js.publish("big.x", b"small after %d" % i)
    finally:
        await nc.close()
    reader = OrderedReader([broker.url], "BIG", 1, name="big", keep_headers=False, idle_heartbeat_s=60.0)
    await reader.start()
    got: list[bytes] = []
    try:
        for _ in range(300):
            batch = await reader.next_columns(100, 0.1)
            if batch is not None:
                got += batch.payloads.to_pylist()
            if len(got) >= 11:
                break
    finally:
        await reader.close()
    assert [len(p) for p in got] == [7] * 5 + [600_000] + [13] * 5
