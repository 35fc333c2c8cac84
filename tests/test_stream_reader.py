"""OrderedReader against a real nats-server: order, completeness, restarts, flow control.

Why: the reader is the spine of the exactly-once projector, so every test here checks the
exact sequence of records handed out (no gaps, no duplicates, stream order) rather than
counts alone.  No mocks, no timing asserts: deadlines only bound how long a test waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import nats
import pytest
from fleetlog.services.node.broker import EmbeddedBroker, die_with_parent, find_nats_server, free_port
from fleetlog.services.projector.stream_reader import OrderedReader, StreamReaderError, StreamRecord
from nats.js import JetStreamContext

STREAM = "EVENTS"
T = TypeVar("T")


def _payload(i: int, size: int = 120) -> bytes:
    body = f'{{"i":{i},"pad":"'.encode()
    return body + b"x" * max(0, size - len(body) - 2) + b'"}'


@pytest.fixture
async def js(broker: EmbeddedBroker) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(broker.url)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


async def _publish(
    js: JetStreamContext,
    first: int,
    n: int,
    subject: Callable[[int], str] = lambda i: f"ev.a{i % 3}",
    size: int = 120,
    headers_every: int = 0,
    msg_ids: bool = False,
) -> None:
    """Acked JetStream publishes, gathered in windows so 20k messages take a second or two.

    With msg_ids every message carries Nats-Msg-Id, so retrying a failed window cannot
    duplicate messages (JetStream de-duplicates within its window).
    """
    window = 2000
    for base in range(first, first + n, window):
        futs = []
        for i in range(base, min(first + n, base + window)):
            hdrs = (
                {"Nats-Msg-Id": f"m-{i}", "X-I": str(i)}
                if msg_ids or (headers_every and i % headers_every == 0)
                else None
            )
            futs.append(await js.publish_async(subject(i), _payload(i, size), headers=hdrs))
        await asyncio.gather(*futs)


async def _drain(reader: OrderedReader, n: int, timeout_s: float = 90.0, batch: int = 1000) -> list[StreamRecord]:
    """Collect exactly n records (fails if they do not arrive before the deadline)."""
    out: list[StreamRecord] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while len(out) < n:
        assert loop.time() < deadline, f"only {len(out)}/{n} records; last_error={reader.last_error}"
        out.extend(await reader.next_batch(min(batch, n - len(out)), 0.2))
    return out


async def _assert_nothing_more(reader: OrderedReader) -> None:
    for _ in range(3):
        extra = await reader.next_batch(1000, 0.2)
        assert extra == [], f"unexpected extra records {[r.seq for r in extra][:10]}"


@contextlib.asynccontextmanager
async def _reader(*args: object, **kwargs: object) -> AsyncIterator[OrderedReader]:
    reader = OrderedReader(*args, **kwargs)  # type: ignore[arg-type]
    await reader.start()
    try:
        yield reader
    finally:
        await reader.close()


def _check_payloads(records: list[StreamRecord], seqs: list[int]) -> None:
    # In these streams message i (1-based publish order) has stream seq i.
    assert [r.seq for r in records] == seqs
    for r in records:
        assert r.data == _payload(r.seq), r.seq
        assert r.subject == f"ev.a{r.seq % 3}"
        assert r.ts_ns > 1_500_000_000 * 10**9


@pytest.mark.parametrize("start_seq", [1, 12_345])
async def test_reads_20k_in_order_exactly_once(broker: EmbeddedBroker, js: JetStreamContext, start_seq: int) -> None:
    await js.add_stream(name=STREAM, subjects=["ev.>"])
    await _publish(js, 1, 20_000, headers_every=97)
    async with _reader(broker.url, STREAM, start_seq) as reader:
        assert reader.connected
        assert reader.last_seq == start_seq - 1
        records = await _drain(reader, 20_001 - start_seq)
        await _assert_nothing_more(reader)
        _check_payloads(records, list(range(start_seq, 20_001)))
        assert reader.last_seq == 20_000
        # pending counts down to 0 at the end of the stream.
        assert records[-1].pending == 0
        assert records[0].pending == 20_000 - start_seq
        with_headers = [r for r in records if r.headers is not None]
        assert [r.seq for r in with_headers] == [s for s in range(start_seq, 20_001) if s % 97 == 0]
        for r in with_headers:
            assert r.headers is not None
            assert r.headers.startswith(b"NATS/1.0\r\n") and r.headers.endswith(b"\r\n\r\n")
            assert f"X-I: {r.seq}\r\n".encode() in r.headers


async def test_columns_match_records_and_nothing_handed_out_stays_buffered(
    broker: EmbeddedBroker, js: JetStreamContext
) -> None:
    """next_columns (the projector's call) hands out the same messages as next_batch, in
    columns; a partial take leaves only the rest in the buffer (the projector's memory
    bound depends on it); max_bytes bounds a batch by payload size."""
    await js.add_stream(name=STREAM, subjects=["ev.>"])
    await _publish(js, 1, 5000, headers_every=7)
    async with _reader(broker.url, STREAM, 1, keep_headers=False) as reader:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while len(reader._seqs) < 5000:  # everything buffered, nothing handed out yet
            assert loop.time() < deadline
            await asyncio.sleep(0.05)
        first = await reader.next_columns(1200, 0.2)
        assert first is not None and first.seqs == list(range(1, 1201))
        assert first.headers is None
        assert len(reader._seqs) == len(reader._spans) // 2 == len(reader._replies) == 3800
        assert reader._seqs[0] == 1201
        small = await reader.next_columns(1000, 0.2, max_bytes=10 * 120)
        assert small is not None and small.seqs == list(range(1201, 1211))
        rest = await reader.next_columns(10_000, 0.2)
        assert rest is not None and len(reader._seqs) == 0
        batches = [first, small, rest]
        records = [r for b in batches for r in b.records()]
        _check_payloads(records, list(range(1, 5001)))
        assert all(r.headers is None for r in records)
        assert [r.pending for r in records] == [5000 - s for s in range(1, 5001)]
        assert rest.pending() == 0 and rest.ts_ns() == records[-1].ts_ns
        assert [b.seqs for b in batches] == [[r.seq for r in b.records()] for b in batches]
        assert [b.data for b in batches] == [[r.data for r in b.records()] for b in batches]
        assert await reader.next_columns(10, 0.2) is None


async def test_start_beyond_end_tails_new_messages(broker: EmbeddedBroker, js: JetStreamContext) -> None:
    await js.add_stream(name=STREAM, subjects=["ev.>"])
    await _publish(js, 1, 100)
    async with _reader(broker.url, STREAM, 101) as tail, _reader(broker.url, STREAM, 200) as far:
        assert await tail.next_batch(10, 0.3) == []
        await _publish(js, 101, 50)
        _check_payloads(await _drain(tail, 50), list(range(101, 151)))
        # A start far past the end hands out nothing before its start sequence.
        assert await far.next_batch(10, 0.3) == []
        await _publish(js, 151, 100)
        _check_payloads(await _drain(far, 51), list(range(200, 251)))
        _check_payloads(await _drain(tail, 100), list(range(151, 251)))
        await _assert_nothing_more(far)
        await _assert_nothing_more(tail)


async def test_start_below_first_available_starts_at_first(broker: EmbeddedBroker, js: JetStreamContext) -> None:
    await js.add_stream(name=STREAM, subjects=["ev.>"])
    await _publish(js, 1, 300)
    await js.purge_stream(STREAM, seq=120)  # keeps 120..300
    async with _reader(broker.url, STREAM, 1) as reader:
        records = await _drain(reader, 181)
        _check_payloads(records, list(range(120, 301)))
        await _assert_nothing_more(reader)


async def test_stream_sequence_gaps_are_normal(broker: EmbeddedBroker, js: JetStreamContext) -> None:
    await js.add_stream(name=STREAM, subjects=["ev.>"])
    await _publish(js, 1, 50)
    for seq in (5, 6, 30):
        await js.delete_msg(STREAM, seq)
    async with _reader(broker.url, STREAM, 1) as reader:
        records = await _drain(reader, 47)
        _check_payloads(records, [s for s in range(1, 51) if s not in (5, 6, 30)])
        await _assert_nothing_more(reader)


async def test_filter_subjects(broker: EmbeddedBroker, js: JetStreamContext) -> None:
    await js.add_stream(name=STREAM, subjects=["ev.>"])
    await _publish(js, 1, 3000)  # subjects ev.a0, ev.a1, ev.a2 round robin
    async with (
        _reader(broker.url, STREAM, 1, filter_subjects=["ev.a1"]) as one,
        _reader(broker.url, STREAM, 1, filter_subjects=["ev.a0", "ev.a2"]) as two,
    ):
        got_one = await _drain(one, 1000)
        got_two = await _drain(two, 2000)
        _check_payloads(got_one, [s for s in range(1, 3001) if s % 3 == 1])
        _check_payloads(got_two, [s for s in range(1, 3001) if s % 3 != 1])
        await _assert_nothing_more(one)
        await _assert_nothing_more(two)


async def test_stream_created_after_start(broker: EmbeddedBroker, js: JetStreamContext) -> None:
    async with _reader(broker.url, STREAM, 1) as reader:
        assert reader.connected
        assert await reader.next_batch(10, 0.5) == []
        assert reader.last_error is not None and "stream not found" in reader.last_error.lower()
        await js.add_stream(name=STREAM, subjects=["ev.>"])
        await _publish(js, 1, 500)
        _check_payloads(await _drain(reader, 500), list(range(1, 501)))


async def test_broker_sigkill_restart_exactly_once(broker: EmbeddedBroker, tmp_path: Path) -> None:
    nc = await nats.connect(broker.url)
    js = nc.jetstream()
    await js.add_stream(name=STREAM, subjects=["ev.>"])
    await _publish(js, 1, 20_000)
    await nc.close()

    async with _reader(broker.url, STREAM, 1, idle_heartbeat_s=0.5) as reader:
        first = await _drain(reader, 7_000, batch=500)
        # Kill while the rest of the stream is in flight or buffered locally.
        broker.kill()
        first.extend(await reader.next_batch(500, 0.2))  # whatever was already buffered
        await broker.start()

        nc = await _connect_when_ready(broker.url)
        js = nc.jetstream()
        await _retry(lambda: _publish(js, 20_001, 5_000, msg_ids=True))
        await nc.close()

        rest = await _drain(reader, 25_000 - len(first))
        records = first + rest
        _check_payloads(records, list(range(1, 25_001)))
        await _assert_nothing_more(reader)
        assert reader.connected


async def test_flow_control_slow_consumer_bounded_memory(broker: EmbeddedBroker, js: JetStreamContext) -> None:
    await js.add_stream(name=STREAM, subjects=["ev.>"])
    await _publish(js, 1, 20_000, size=1000)  # ~20 MB, far above the buffer cap
    cap = 256 * 1024
    # The socket read size (256 KiB in asyncio's selector transport) is the only overshoot.
    bound = cap + 2 * 256 * 1024
    peak = 0
    records: list[StreamRecord] = []
    async with _reader(broker.url, STREAM, 1, max_buffer_bytes=cap, idle_heartbeat_s=0.5) as reader:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120
        while len(records) < 20_000:
            assert loop.time() < deadline, f"only {len(records)} records; last_error={reader.last_error}"
            peak = max(peak, reader.buffered_bytes)
            records.extend(await reader.next_batch(100, 0.2))
            await asyncio.sleep(0.002)  # a slow consumer
        await _assert_nothing_more(reader)
    assert [r.seq for r in records] == list(range(1, 20_001))
    assert all(r.data == _payload(r.seq, 1000) for r in records)
    assert 0 < peak <= bound, peak


async def test_large_messages_span_many_socket_reads(broker: EmbeddedBroker, js: JetStreamContext) -> None:
    await js.add_stream(name=STREAM, subjects=["ev.>"])
    sizes = [900_000, 10, 700_000, 3, 1_000_000 - 200]
    for i, size in enumerate(sizes, start=1):
        await js.publish(f"ev.a{i % 3}", _payload(i, size))
    async with _reader(broker.url, STREAM, 1) as reader:
        records = await _drain(reader, len(sizes))
        assert [r.seq for r in records] == [1, 2, 3, 4, 5]
        assert [r.data for r in records] == [_payload(i, size) for i, size in enumerate(sizes, start=1)]
        await _assert_nothing_more(reader)


async def test_consumer_deleted_externally_is_recreated(broker: EmbeddedBroker, js: JetStreamContext) -> None:
    await js.add_stream(name=STREAM, subjects=["ev.>"])
    await _publish(js, 1, 100)
    async with _reader(broker.url, STREAM, 1, idle_heartbeat_s=0.2) as reader:
        first = await _drain(reader, 100)
        infos = await js.consumers_info(STREAM)
        assert len(infos) == 1
        await js.delete_consumer(STREAM, infos[0].name)
        # Heartbeats stop; the watchdog recreates the consumer from last seq + 1.
        await _publish(js, 101, 100)
        rest = await _drain(reader, 100)
        _check_payloads(first + rest, list(range(1, 201)))
        await _assert_nothing_more(reader)
        names = [c.name for c in await js.consumers_info(STREAM)]
        assert infos[0].name not in names


async def test_close_deletes_consumer_and_leaves_no_tasks(broker: EmbeddedBroker, js: JetStreamContext) -> None:
    await js.add_stream(name=STREAM, subjects=["ev.>"])
    await _publish(js, 1, 2000)
    before = {t for t in asyncio.all_tasks() if not t.done()}
    reader = OrderedReader(broker.url, STREAM, 1)
    await reader.start()
    assert len(await js.consumers_info(STREAM)) == 1
    await _drain(reader, 1000)
    waiter = asyncio.create_task(reader.next_batch(10**6, 30.0))  # blocked when close() comes
    await asyncio.sleep(0.05)
    await reader.close()
    await asyncio.wait_for(waiter, 5)  # woken by close(), not left hanging
    await reader.close()  # idempotent
    assert not reader.connected
    leftover = {t for t in asyncio.all_tasks() if not t.done()} - before - {asyncio.current_task()}
    assert leftover == set()
    assert await js.consumers_info(STREAM) == []
    with pytest.raises(StreamReaderError):
        await reader.next_batch(1, 0.1)


async def test_broker_down_at_start_then_up(tmp_path: Path) -> None:
    port = free_port()
    reader = OrderedReader(f"nats://127.0.0.1:{port}", STREAM, 1, connect_timeout_s=0.5)
    await reader.start()  # does not raise: retries in the background
    try:
        assert not reader.connected
        assert await reader.next_batch(5, 0.2) == []
        late = EmbeddedBroker(tmp_path / "late", port=port)
        await late.start()
        try:
            nc = await nats.connect(late.url)
            js = nc.jetstream()
            await js.add_stream(name=STREAM, subjects=["ev.>"])
            await _publish(js, 1, 200)
            await nc.close()
            _check_payloads(await _drain(reader, 200), list(range(1, 201)))
        finally:
            await late.stop()
    finally:
        await reader.close()


async def test_server_list_tries_in_order(broker: EmbeddedBroker, js: JetStreamContext) -> None:
    await js.add_stream(name=STREAM, subjects=["ev.>"])
    await _publish(js, 1, 50)
    dead = f"nats://127.0.0.1:{free_port()}"
    for servers in (f"{dead},{broker.url}", [dead, broker.url]):
        async with _reader(servers, STREAM, 1, connect_timeout_s=0.5) as reader:
            _check_payloads(await _drain(reader, 50), list(range(1, 51)))


class _LossyProxy:
    """A TCP relay in front of the real server that can lose deliveries or go silent.

    Why: a healthy nats-server on loopback never loses a message, so the reader's gap
    detection (consumer sequence, heartbeat ``Nats-Last-Consumer``) and its dead-connection
    detection (unanswered PINGs) can only be exercised by a faulty network between them.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.drop_cseqs: set[int] = set()  # drop each of these consumer sequences once
        self.dropped: list[int] = []
        self.connections = 0
        self._frozen: list[asyncio.Event] = []
        self._conn_tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> _LossyProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.close()  # both loops of each relay then see EOF and end
        await asyncio.gather(*self._conn_tasks, return_exceptions=True)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def freeze_current(self) -> None:
        """Existing connections stop forwarding in both directions but stay open."""
        for ev in self._frozen:
            ev.set()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conn_tasks.add(task)
        self.connections += 1
        frozen = asyncio.Event()
        self._frozen.append(frozen)
        sr, sw = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [cw, sw]
        try:
            await asyncio.gather(self._up(cr, sw, frozen), self._down(sr, cw, frozen))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (cw, sw):
                w.close()
            self._conn_tasks.discard(task)

    @staticmethod
    async def _up(cr: asyncio.StreamReader, sw: asyncio.StreamWriter, frozen: asyncio.Event) -> None:
        while data := await cr.read(65536):
            if not frozen.is_set():
                sw.write(data)
        sw.close()

    async def _down(self, sr: asyncio.StreamReader, cw: asyncio.StreamWriter, frozen: asyncio.Event) -> None:
        while True:
            line = await sr.readuntil(b"\r\n")
            frame = line
            args = line.split()
            if args and args[0] in (b"MSG", b"HMSG"):
                frame += await sr.readexactly(int(args[-1]) + 2)
                reply = args[3] if len(args) == (5 if args[0] == b"MSG" else 6) else b""
                if reply.startswith(b"$JS.ACK."):
                    cseq = int(reply.split(b".")[6])
                    if cseq in self.drop_cseqs:
                        self.drop_cseqs.discard(cseq)
                        self.dropped.append(cseq)
                        continue
            if not frozen.is_set():
                cw.write(frame)


async def test_lost_delivery_mid_stream_is_detected_and_refetched(broker: EmbeddedBroker, js: JetStreamContext) -> None:
    await js.add_stream(name=STREAM, subjects=["ev.>"])
    await _publish(js, 1, 3000)
    async with _LossyProxy(broker.port) as proxy:
        proxy.drop_cseqs = {1200, 2500}  # the second applies to the recreated consumer
        async with _reader(proxy.url, STREAM, 1) as reader:
            records = await _drain(reader, 3000)
            _check_payloads(records, list(range(1, 3001)))
            await _assert_nothing_more(reader)
        assert proxy.dropped == [1200, 2500]


async def test_lost_last_delivery_is_detected_by_heartbeat(broker: EmbeddedBroker, js: JetStreamContext) -> None:
    await js.add_stream(name=STREAM, subjects=["ev.>"])
    await _publish(js, 1, 100)
    async with _LossyProxy(broker.port) as proxy:
        proxy.drop_cseqs = {100}  # nothing follows it: only the idle heartbeat can reveal the gap
        async with _reader(proxy.url, STREAM, 1, idle_heartbeat_s=0.3) as reader:
            records = await _drain(reader, 100)
            _check_payloads(records, list(range(1, 101)))
            await _assert_nothing_more(reader)
        assert proxy.dropped == [100]


async def test_silent_dead_connection_is_replaced(broker: EmbeddedBroker, js: JetStreamContext) -> None:
    await js.add_stream(name=STREAM, subjects=["ev.>"])
    await _publish(js, 1, 2000)
    async with _LossyProxy(broker.port) as proxy:
        async with _reader(proxy.url, STREAM, 1, idle_heartbeat_s=0.3) as reader:
            first = await _drain(reader, 2000)
            proxy.freeze_current()  # socket stays open, nothing flows: only PINGs can tell
            await _publish(js, 2001, 1000)
            rest = await _drain(reader, 1000)
            _check_payloads(first + rest, list(range(1, 3001)))
            await _assert_nothing_more(reader)
        assert proxy.connections >= 2


@contextlib.contextmanager
def _nats_with_args(tmp_path: Path, *args: str) -> Iterator[int]:
    """A throwaway nats-server with extra flags (auth); the shared fixture has none."""
    port = free_port()
    proc = subprocess.Popen(
        [find_nats_server(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(tmp_path / f"js{port}"), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent(),
    )
    try:
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
                break
            assert proc.poll() is None
            time.sleep(0.05)
        yield port
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(
    ("server_args", "creds", "good", "bad"),
    [
        (("--user", "fl", "--pass", "s3cr:et"), {"user": "fl", "password": "s3cr:et"}, "fl:s3cr%3Aet@", "fl:nope@"),
        (("--auth", "tok123"), {"token": "tok123"}, "tok123@", "wrong@"),
    ],
)
async def test_auth_in_url(
    tmp_path: Path, server_args: tuple[str, ...], creds: dict[str, str], good: str, bad: str
) -> None:
    with _nats_with_args(tmp_path, *server_args) as port:
        nc = await nats.connect(f"nats://127.0.0.1:{port}", **creds)  # type: ignore[arg-type]
        js = nc.jetstream()
        await js.add_stream(name=STREAM, subjects=["ev.>"])
        await _publish(js, 1, 20)
        await nc.close()
        async with _reader(f"nats://{good}127.0.0.1:{port}", STREAM, 1) as reader:
            _check_payloads(await _drain(reader, 20), list(range(1, 21)))
        async with _reader(f"nats://{bad}127.0.0.1:{port}", STREAM, 1, connect_timeout_s=0.5) as reader:
            assert await reader.next_batch(5, 0.3) == []
            assert not reader.connected
            assert reader.last_error is not None and "authorization" in reader.last_error.lower()


@pytest.mark.parametrize(
    "url", ["tls://127.0.0.1:4222", "nats://127.0.0.1:4222,tls://h:1", "http://x:1", "nats://:4222", ""]
)
async def test_unsupported_or_bad_urls_raise(url: str) -> None:
    reader = OrderedReader(url, STREAM)
    with pytest.raises(StreamReaderError) as err:
        await reader.start()
    if url.startswith("tls"):
        assert "TLS is not supported" in str(err.value)
    await reader.close()


def test_reply_subject_forms() -> None:
    """nats-server 2.x sends the 9-token form; the 11/12-token (domain, account hash) forms parse too."""
    reader = OrderedReader("nats://127.0.0.1:1", STREAM)
    v1 = b"$JS.ACK.EVENTS.c1.1.42.7.1700000000000000001.9"
    v2 = b"$JS.ACK.dom.ACCHASH.EVENTS.c1.1.42.7.1700000000000000001.9"
    for reply in (v1, v2, v2 + b".r4nd0m"):
        assert reader._ack_fields(reply) == (42, 7, b"1700000000000000001", b"9")
    with pytest.raises(Exception, match="unrecognised"):
        reader._ack_fields(b"$JS.ACK.EVENTS.c1.1.42")


async def _connect_when_ready(url: str) -> nats.NATS:
    async def attempt() -> nats.NATS:
        nc = await nats.connect(url, allow_reconnect=False, connect_timeout=1)
        try:
            await nc.jetstream().account_info()
        except Exception:
            await nc.close()
            raise
        return nc

    return await _retry(attempt)


async def _retry(fn: Callable[[], Awaitable[T]], attempts: int = 100) -> T:
    for i in range(attempts):
        try:
            return await fn()
        except Exception:
            if i == attempts - 1:
                raise
            await asyncio.sleep(0.1)
    raise AssertionError("unreachable")
