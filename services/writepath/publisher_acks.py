"""The publisher's ack side: JetStream's answers to its publishes, matched by reply token.

An ack moves the receipt to its stream position and the consistency token forward; a
refusal is transient (503, no responders: a cluster's leader away, a stream being made:
held for a retry with the same Nats-Msg-Id), or final (counted; after MAX_BROKER_REFUSALS
dead-lettered), and whatever cannot be published now goes to the spool
(services/writepath/publisher_spool.py). Split from publisher.py along that seam: the
sender frames and writes; this side only reads what came back.
"""

from __future__ import annotations

import asyncio
import logging

from fleetlog.services.writepath.publisher_spool import (
    MAX_BROKER_REFUSALS,
    RETRY_EVERY_S,
    DrainChunk,
    SpoolSide,
)
from fleetlog.services.writepath.receipt import Receipt, Token
from fleetlog.services.writepath.wire import decode_ack

__all__ = ["AckSide"]

log = logging.getLogger("fleetlog.publisher")


class AckSide(SpoolSide):
    """Acks and refusals of the publisher's publishes; needs the publisher's state below."""

    _acked_max: Token
    _slot_free: asyncio.Event
    _closing: bool

    def acked_token(self) -> Token:
        return dict(self._acked_max)

    def _refused(self, receipt: Receipt, chunk: DrainChunk | None, reason: str) -> None:
        """Can never be published: set aside at once (a spooled one by the drain)."""
        receipt.attempts = MAX_BROKER_REFUSALS - 1
        self._failed(receipt, chunk, broker_refused=True, reason=reason)

    def _on_denied(self, subject: str) -> None:
        """The broker refused this identity `subject`: what is in flight there will never be
        stored, so it is dead-lettered now (never retried, never spooled for ever)."""
        for token, (receipt, chunk) in list(self._pending.items()):
            if receipt.subject == subject:
                del self._pending[token]
                reason = f"permission denied: this identity may not publish to {subject!r}"
                if chunk is not None:  # a spooled record: the drain sets it aside, with this reason
                    self._refusal_reasons[receipt.id] = reason
                self._refused(receipt, chunk, reason)
        self._slot_free.set()
        self._progress.set()

    def _on_ack(self, token: bytes, body: bytes, _headers: bytes | None) -> None:
        entry = self._pending.pop(token, None)
        if entry is None:
            return  # late ack for something already timed out and spooled
        receipt, chunk = entry
        if not body:
            # Status-only reply (503 no responders: no stream, or, on a cluster, no leader yet).
            self._failed(receipt, chunk, broker_refused=False, transient=True)
            return
        ack = decode_ack(body)
        if ack.error is not None:
            if ack.error.get("code") == 503:  # JetStream temporarily unavailable (an election)
                self._failed(receipt, chunk, broker_refused=False, transient=True)
                return
            log.warning("JetStream refused %s: %s", receipt.subject, ack.error)
            self._failed(receipt, chunk, broker_refused=True, reason=str(ack.error))
            return
        receipt.stream = ack.stream
        receipt.seq = ack.seq
        receipt.payload = None
        if self._retry_since:
            self._retry_since.pop(receipt.id, None)
            self._retry_wait = RETRY_EVERY_S
        stats = self._stats
        stats.acked += 1
        if ack.duplicate:
            stats.duplicates += 1
        if ack.seq > self._acked_max.get(ack.stream, 0):
            self._acked_max[ack.stream] = ack.seq
        if chunk is not None:
            chunk.left -= 1
            if chunk.left == 0:
                chunk.done.set()

    def _on_acks_done(self) -> None:
        self._slot_free.set()
        self._progress.set()

    def _failed(
        self, receipt: Receipt, chunk: DrainChunk | None, *, broker_refused: bool, reason: str = "",
        transient: bool = False,
    ) -> None:
        if transient and chunk is None and not self._closing and self._retry_later(receipt):
            return
        if chunk is not None:
            # Spooled records stay in the spool; the drain retries them (and counts refusals).
            chunk.failed = True
            chunk.left -= 1
            if broker_refused:
                receipt.attempts += 1
            if chunk.left == 0:
                chunk.done.set()
            return
        if broker_refused:
            receipt.attempts += 1
            if receipt.attempts >= MAX_BROKER_REFUSALS:
                self._dead_letter(receipt, reason)
                return
        self._to_spool([receipt])
