"""Lag, computed when an answer is made: the stream's last seq minus what the answer saw.

The projector's own idea of what is pending comes from the last batch it folded, so a
view that stopped folding (or had not started on a burst) said `lag: 0` while the
writer's token was ahead. Here each answer asks the broker for the stream's last seq
(`$JS.API.STREAM.INFO`), shared among answers: a request joins a lookup that was sent
after it arrived, else the next one, so the figure is never older than the request.
`lag_s` is the age of the oldest event not folded (its broker timestamp), looked up only
while behind, one shared lookup per position (started beside the head lookup when the
stream was last seen ahead), so a stuck view costs one lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from datetime import UTC, datetime

import msgspec
from nats.aio.client import Client

__all__ = ["STREAM_NOT_FOUND", "StreamHeads", "last_seq_of"]


class _State(msgspec.Struct):
    last_seq: int


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _Info(msgspec.Struct):
    state: _State | None = None
    error: _ApiError | None = None


_decode_info = msgspec.json.Decoder(_Info).decode

STREAM_NOT_FOUND = 10059  # JetStream's err_code: the stream does not exist (so it holds nothing)


def last_seq_of(reply: bytes) -> int | None:
    """The last seq in a `$JS.API.STREAM.INFO` reply; None unless the broker really said.

    An error reply (`{"error": {...}}`, e.g. 503 "JetStream system temporarily unavailable")
    used to decode with a default state of 0: a node then took 0 as its catch-up target and
    joined the query group at once. Only "stream not found" means 0 (nothing to catch up).
    """
    try:
        info = _decode_info(reply)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if info.error is not None:
        return 0 if info.error.err_code == STREAM_NOT_FOUND else None
    return info.state.last_seq if info.state is not None else None


class StreamHeads:
    def __init__(self, nc: Client, timeout_s: float = 2.0) -> None:
        self.nc = nc
        self.timeout_s = timeout_s
        self._inflight: dict[str, tuple[int, asyncio.Future[int | None]]] = {}
        self._next: dict[str, asyncio.Future[int | None]] = {}
        # (stream, seq) -> the lookup of its broker timestamp (s), shared by every answer at
        # that position; a lookup that found nothing is not kept (a message may come there).
        self._born: dict[tuple[str, int], asyncio.Future[float | None]] = {}
        self._head: dict[str, int] = {}  # the last seq each stream's latest lookup gave

    async def last_seq(self, stream: str, since_ns: int) -> int | None:
        """The stream's last seq from a lookup sent at or after `since_ns` (monotonic); None if
        the broker did not say.

        At most one lookup per stream is in flight: a request that arrived after the one in
        flight was sent waits for the next, which leaves when it returns and serves every
        request that arrived meanwhile (a burst costs one lookup per round trip, not one each).
        """
        current = self._inflight.get(stream)
        if current is None or (current[1].done() and current[0] < since_ns):
            current = self._send(stream)
        elif current[0] < since_ns:
            nxt = self._next.get(stream)
            if nxt is None:
                nxt = self._next[stream] = asyncio.ensure_future(self._after(stream, current[1]))
            return await asyncio.shield(nxt)
        return await asyncio.shield(current[1])

    def _send(self, stream: str) -> tuple[int, asyncio.Future[int | None]]:
        sent = self._inflight[stream] = (time.monotonic_ns(), asyncio.ensure_future(self._info(stream)))
        return sent

    async def _after(self, stream: str, running: asyncio.Future[int | None]) -> int | None:
        with contextlib.suppress(Exception):
            await asyncio.shield(running)
        self._next.pop(stream, None)
        return await self._send(stream)[1]

    async def last_seqs(self, streams: Iterable[str], since_ns: int) -> dict[str, int | None]:
        names = sorted(set(streams))
        found = await asyncio.gather(*(self.last_seq(s, since_ns) for s in names))
        return dict(zip(names, found, strict=True))

    async def _info(self, stream: str) -> int | None:
        try:
            msg = await self.nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=self.timeout_s)
        except Exception:  # timed out, no responders, connection gone: the broker did not say
            return None
        seq = last_seq_of(msg.data)
        if seq is not None:
            self._head[stream] = seq
        return seq

    def prefetch_ages(self, folded: dict[str, int]) -> None:
        """Start the age lookups an answer at `folded` will likely need, beside its head lookup
        (no round trip after the read): only for streams last seen ahead of `folded`."""
        for stream, seq in folded.items():
            if self._head.get(stream, 0) > seq:
                self._stored_lookup(stream, seq + 1)

    async def lag(self, as_of: dict[str, int], heads: dict[str, int | None]) -> tuple[dict[str, int], dict[str, float]]:
        """(lag, lag_s) of an answer that saw `as_of`. A stream whose last seq the broker did not
        give (within `timeout_s`) is left out of both: its lag is unknown, not 0."""
        lag: dict[str, int] = {}
        for stream, seen in as_of.items():
            head = heads.get(stream)
            if head is not None:
                lag[stream] = max(0, head - seen)
        behind = [s for s, n in lag.items() if n]
        ages = await asyncio.gather(*(self.age(s, as_of[s]) for s in behind))
        lag_s = dict.fromkeys(lag, 0.0)
        lag_s.update(zip(behind, ages, strict=True))
        return lag, lag_s

    async def age(self, stream: str, folded: int) -> float:
        """Seconds since the broker stored the first message after `folded` (0 if none)."""
        born = await asyncio.shield(self._stored_lookup(stream, folded + 1))
        return 0.0 if born is None else max(0.0, time.time() - born)

    def _stored_lookup(self, stream: str, seq: int) -> asyncio.Future[float | None]:
        key = (stream, seq)
        fut = self._born.get(key)
        if fut is None or (fut.done() and (fut.cancelled() or fut.result() is None)):
            if len(self._born) > 1024:
                self._born.clear()
            fut = self._born[key] = asyncio.ensure_future(self._stored_at(stream, seq))
        return fut

    async def _stored_at(self, stream: str, seq: int) -> float | None:
        body = msgspec.json.encode({"seq": seq, "next_by_subj": ">"})
        with contextlib.suppress(Exception):
            msg = await self.nc.request(f"$JS.API.DIRECT.GET.{stream}", body, timeout=self.timeout_s)
            stamp = (msg.headers or {}).get("Nats-Time-Stamp")
            if stamp:
                return _parse_stamp(stamp)
        return None


def _parse_stamp(stamp: str) -> float:
    """RFC 3339 with nanoseconds ("2026-12-05T07:31:09.123456789Z"): Python takes microseconds."""
    head, _, frac = stamp.rstrip("Z").partition(".")
    at = datetime.fromisoformat(head).replace(tzinfo=UTC).timestamp()
    return at + (float(f"0.{frac}") if frac else 0.0)
