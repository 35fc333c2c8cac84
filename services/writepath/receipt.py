"""What the write path hands back: a `Receipt` per event, its `Position` once acked, the
consistency `Token`, and the publisher's counters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import msgspec
from fleetlog.schemas import Event, encode_event

__all__ = ["Position", "PublisherStats", "Receipt", "Token"]

# A consistency token: for each stream, a sequence the reader must have folded.
Token = dict[str, int]

class Position(NamedTuple):
    stream: str
    seq: int


class Receipt(msgspec.Struct, gc=False, eq=False):
    """What `record()`/`emit()` return: the event id now, its stream position once acked.

    Not tracked by the garbage collector (`gc=False`; it is never part of a cycle): every
    `record()` makes one, and each tracked allocation brings the next collection closer,
    which lands as a pause inside some caller's `record()` (measured: with the collector
    off, async `record()` p99 fell from 38.7 to 20.8 µs). Compared and hashed by identity.
    """

    id: str
    subject: str
    # Encoded by the sender when only the event is given; dropped once acked.
    payload: bytes | None
    attempts: int = 0
    event: Event | None = None
    stream: str | None = None
    seq: int | None = None
    deadline: float = 0.0

    def encoded(self) -> bytes:
        payload = self.payload
        if payload is None:
            assert self.event is not None
            payload = self.payload = encode_event(self.event)
            self.event = None
        return payload

    @property
    def position(self) -> Position | None:
        """(stream, seq) once JetStream acked the event (None while queued or spooled)."""
        if self.stream is None or self.seq is None:
            return None
        return Position(self.stream, self.seq)

    @property
    def token(self) -> Token | None:
        pos = self.position
        return None if pos is None else {pos.stream: pos.seq}

    def __repr__(self) -> str:
        return f"Receipt(id={self.id!r}, position={self.position!r})"


@dataclass
class PublisherStats:
    accepted: int = 0
    acked: int = 0
    duplicates: int = 0
    retried: int = 0  # publishes sent again after a transient refusal (no stream leader for a moment)
    spooled: int = 0
    dropped_spool_full: int = 0
    dead_lettered: int = 0
    after_close: int = 0  # record() after close(): refused with RuntimeError
    queued: int = 0
    inflight: int = 0
    spool_pending: int = 0


