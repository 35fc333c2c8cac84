"""What every part of the bulk stream reader shares: server URLs, protocol constants and
errors, the transport adapter, and the reader's state.

The reader is one object split by concern over four modules:

* ``stream_wire``     (this one) URLs, errors, constants, the state and the small helpers
                      both directions need (writing a frame, resetting the consumer,
                      answering flow control);
* ``stream_parse``    the inbound protocol: slicing messages out of socket reads;
* ``stream_consumer`` connection and consumer supervision: connect, handshake, create the
                      consumer, heartbeats and PINGs, recovery after any failure;
* ``stream_reader``   the public API and the hand-out buffer.
"""

from __future__ import annotations

import asyncio
import logging
from array import array as int_array
from collections import deque
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from fleetlog.services.backbone.nkeyauth import Identity, identity_of, url_auth

__all__ = ["ReaderState", "StreamReaderError"]

log = logging.getLogger("fleetlog.services.projector.stream_reader")

_DEFAULT_PORT: Final = 4222
_CRLF: Final = b"\r\n"
_BACKOFF_MIN_S: Final = 0.05
_BACKOFF_MAX_S: Final = 1.0
_MAX_CONTROL_LINE: Final = 1024 * 1024
_SUBJECT_CACHE_MAX: Final = 65536
# Rough Python-object cost of one buffered record beyond its payload (list slots, its span's
# two ints, the reply subject, the seq).  Counted so that max_buffer_bytes bounds real
# memory, not just payload bytes.
_RECORD_OVERHEAD: Final = 200
# The socket is read straight into segments of this size (``_Wire.get_buffer``); payloads stay
# where they landed until handed out. A segment lives while a buffered record is in it.
_SEGMENT_BYTES: Final = 1024 * 1024
# A read is offered at least this much room (less left in the segment starts the next one),
# and at most _MAX_READ beyond the frame being read.
_MIN_READ: Final = 64 * 1024
_MAX_READ: Final = 256 * 1024
_INBOX_SID: Final = b"1"
_VERSION: Final = "0.2.0"


class StreamReaderError(Exception):
    """Configuration or usage errors the reader cannot recover from by retrying."""


class _ProtocolError(Exception):
    """The byte stream from the server does not parse; the connection is dropped."""


class _ApiError(Exception):
    """A JetStream API request failed (error reply, no responders, timeout)."""


@dataclass(frozen=True, slots=True)
class _Server:
    host: str
    port: int
    user: str | None
    password: str | None
    token: str | None

    @property
    def label(self) -> str:
        # Never log credentials.
        return f"nats://{self.host}:{self.port}"


def _parse_servers(servers: str | list[str]) -> list[_Server]:
    """Turn the user's server spec into connect targets, failing loudly on bad input."""
    items = servers.split(",") if isinstance(servers, str) else list(servers)
    out: list[_Server] = []
    for raw in items:
        url = raw.strip()
        if not url:
            continue
        if "://" not in url:
            url = "nats://" + url
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise StreamReaderError(f"bad NATS server URL {raw!r}: {exc}") from exc
        scheme = parts.scheme.lower()
        if scheme in ("tls", "wss", "ws"):
            raise StreamReaderError(
                f"{scheme}:// is not supported by the bulk stream reader (plain nats:// TCP only; "
                "TLS is not supported by the bulk reader)"
            )
        if scheme != "nats":
            raise StreamReaderError(f"unsupported URL scheme {scheme!r} in {raw!r}")
        if not parts.hostname:
            raise StreamReaderError(f"no host in NATS server URL {raw!r}")
        out.append(_Server(parts.hostname, port or _DEFAULT_PORT, *url_auth(parts)))
    if not out:
        raise StreamReaderError("no NATS server URL given")
    return out


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _header_value(block: bytes, name: bytes) -> bytes | None:
    """Case-insensitive lookup of one header in a raw ``NATS/1.0`` block (rare path only)."""
    lname = name.lower()
    for line in block.split(_CRLF)[1:]:
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == lname:
            return value.strip()
    return None


def _split_ack(reply: bytes) -> tuple[bytes | None, int, int, bytes, bytes]:
    """Fields of a ``$JS.ACK`` reply subject: (head or None, stream seq, consumer seq, ts, pending).

    Forms: ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>``
    (9 tokens, what nats-server 2.x sends) and
    ``$JS.ACK.<domain>.<acchash>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>``
    optionally followed by a random token (11/12 tokens).  The head (everything before the
    stream sequence) is constant for one consumer because max_deliver=1 pins the delivery
    count, so the parser's fast path compares it; it is None for the 12-token form.
    """
    t = reply.split(b".")
    if len(t) == 9:
        i = 5
    elif len(t) in (11, 12):
        i = 7
    else:
        raise _ProtocolError(f"unrecognised JetStream reply subject {reply!r}")
    head = b".".join(t[:i]) if len(t) in (9, 11) else None
    return head, int(t[i]), int(t[i + 1]), t[i + 2], t[i + 3]


class _Wire(asyncio.BufferedProtocol):
    """Thin transport adapter, tagged with a generation: the socket is read straight into the
    reader's segment (no `bytes` per read, no join of a frame split across reads)."""

    def __init__(self, reader: ReaderState, gen: int) -> None:
        self._reader = reader
        self._gen = gen
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._reader._recv_buffer(self._gen)

    def buffer_updated(self, nbytes: int) -> None:
        self._reader._on_data(self._gen, nbytes)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        self._reader._on_lost(self._gen, exc)


class ReaderState:
    """The reader's state, and the helpers the inbound and supervision halves both use."""

    def __init__(
        self,
        servers: str | list[str],
        stream: str,
        start_seq: int,
        *,
        filter_subjects: list[str] | None,
        max_buffer_bytes: int,
        idle_heartbeat_s: float,
        connect_timeout_s: float,
        name: str,
        keep_headers: bool,
    ) -> None:
        if not stream or any(c in stream for c in " \t\r\n.*>"):
            raise ValueError(f"invalid stream name {stream!r}")
        if start_seq < 1:
            raise ValueError("start_seq must be >= 1")
        if max_buffer_bytes <= 0:
            raise ValueError("max_buffer_bytes must be > 0")
        if idle_heartbeat_s <= 0 or connect_timeout_s <= 0:
            raise ValueError("idle_heartbeat_s and connect_timeout_s must be > 0")
        self._servers_spec = servers
        self._servers: list[_Server] = []
        self._identity: Identity | None = identity_of(servers)  # signs CONNECT, roots the inbox
        self._stream = stream
        self._filters = list(filter_subjects) if filter_subjects else []
        self._max_buffer = max_buffer_bytes
        self._low_water = max_buffer_bytes // 2
        self._hb_s = idle_heartbeat_s
        self._connect_timeout = connect_timeout_s
        self._api_timeout = max(1.0, 2.0 * connect_timeout_s)
        self._name = name

        # Lifecycle.
        self._task: asyncio.Task[None] | None = None
        self._first_outcome: asyncio.Future[None] | None = None
        self._closing = False
        self._closed = False
        self._fatal: StreamReaderError | None = None
        self._last_error: str | None = None
        self._wakeup = asyncio.Event()

        # Per-connection state (reset by _reset_connection_state).
        self._gen = 0
        self._wire: _Wire | None = None
        self._transport: asyncio.Transport | None = None
        self._ready_conn = False
        self._hs_info: asyncio.Future[dict[str, Any]] | None = None
        self._hs_pong: asyncio.Future[None] | None = None
        # The read buffer: the socket writes into `_seg` from `_fill`; frames before `_pos`
        # are parsed. `_need`: bytes from `_pos` the next frame needs at least.
        self._seg = bytearray()  # the first read starts a segment
        self._fill = 0
        self._pos = 0
        self._need = 0
        self._paused = False
        self._pings_out = 0
        self._inbox = ""
        self._requests: dict[bytes, asyncio.Future[bytes]] = {}
        self._req_n = 0
        self._sid_n = 1

        # Consumer state.
        self._deliver_sid: bytes | None = None
        self._consumer_name: str | None = None
        self._need_consumer = True
        self._expected_cseq = 1
        self._ack_head: bytes | None = None
        self._fc_pending: deque[tuple[int, bytes]] = deque()
        self._last_activity = 0.0

        # Record buffer, one list per column: validated, in order, not yet handed out.
        # Columns instead of one tuple per record: no per-record container object for the
        # garbage collector to track. A payload is not copied out of the segment it was read
        # into: `_spans` holds its (start, end) there, and `_segs` each segment still holding
        # buffered records with how many ([segment, count], in stream order). The hand-out
        # gathers them into one Arrow array (stream_reader).
        self._keep_headers = keep_headers
        self._seqs: list[int] = []
        self._subjs: list[str] = []
        self._spans = int_array("i")  # C ints: no int object per offset
        self._segs: deque[list[Any]] = deque()
        # Segments no record is in any more, read into again: a new one is zero-filled (1 MiB
        # written, its pages faulted in: 0.1-0.2 µs per 2.4 KB event on the event loop). Kept
        # while the segments in use and the spares together stay within what the buffer holds
        # (+ 2): a hand-out frees several at once, and the next reads take them back.
        self._spare: list[bytearray] = []
        self._spare_max = max(4, max_buffer_bytes // _SEGMENT_BYTES + 2)
        self._replies: list[bytes] = []  # the $JS.ACK subject: stream time and pending, read lazily
        self._hdrs: list[bytes | None] = []  # filled only with keep_headers
        self._parsed_total = 0  # records ever buffered
        self._handed_total = 0  # records ever handed out
        self._bytes_in = 0  # cumulative accounted bytes appended
        self._bytes_out = 0  # cumulative accounted bytes released
        self._marks: deque[tuple[int, int]] = deque()  # (parsed_total, bytes_in) per chunk
        self._last_buffered_seq = start_seq - 1
        self._last_seq = start_seq - 1
        self._subjects: dict[bytes, str] = {}
        self._waiter: asyncio.Future[None] | None = None
        self._want = 0

    # -- implemented by the inbound half (stream_parse) -------------------------
    def _recv_buffer(self, gen: int) -> memoryview:
        raise NotImplementedError

    def _on_data(self, gen: int, nbytes: int) -> None:
        raise NotImplementedError

    def _on_lost(self, gen: int, exc: Exception | None) -> None:
        raise NotImplementedError

    # -- shared helpers ----------------------------------------------------------
    @property
    def connected(self) -> bool:
        """True while the TCP connection is up and the NATS handshake has completed."""
        return self._ready_conn and self._transport is not None and not self._transport.is_closing()

    def _write(self, data: bytes) -> None:
        t = self._transport
        if t is not None and not t.is_closing():
            t.write(data)

    def _answer_flow_control(self) -> None:
        """Reply to flow-control requests whose preceding records have all been handed out."""
        fcp = self._fc_pending
        while fcp and fcp[0][0] <= self._handed_total:
            self._write(b"PUB %s 0\r\n\r\n" % fcp.popleft()[1])

    def _reset_consumer(self, why: str) -> None:
        """Drop the live consumer (synchronously); the supervisor recreates it."""
        if self._deliver_sid is not None:
            self._write(b"UNSUB %s\r\n" % self._deliver_sid)
        self._deliver_sid = None
        self._need_consumer = True
        self._fc_pending.clear()
        if not self._closing:
            self._last_error = why
            log.info("stream reader %s: resetting consumer: %s", self._stream, why)
        self._wakeup.set()

    def _ack_fields(self, reply: bytes) -> tuple[int, int, bytes, bytes]:
        """Slow path for a ``$JS.ACK`` reply subject: validate its form, learn its head."""
        head, sseq, cseq, ts, pending = _split_ack(reply)
        if head is not None:
            self._ack_head = head
        return sseq, cseq, ts, pending
