"""What a family API needs of the client: the one seam between `Fleet` and the families.

`Fleet` satisfies it; a family API is typed against it, so the families never import
`Fleet` (which builds them) and a test or another client shape can stand in for it.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

import msgspec
from fleetlog.schemas import Event
from fleetlog.services.backbone.config import FleetSettings
from fleetlog.services.writepath.receipt import Receipt, Token
from nats.aio.client import Client

__all__ = ["FleetClient", "session_token"]

S = TypeVar("S")


class FleetClient(Protocol):
    """Write (emit), wait (flush), ask (request), and reach NATS for guarded commands."""

    settings: FleetSettings

    def emit(self, event: Event) -> Receipt:
        """Validate, then enqueue an event; never blocks."""

    def emit_validated(self, event: Event, subject: str | None = None) -> Receipt:
        """Enqueue an event whose fields the family API has already checked against every wire rule."""

    async def flush(self, timeout: float | None = 30.0) -> Token:
        """Wait until everything enqueued is acked; the consistency token."""

    async def nats(self, timeout: float = 2.0) -> Client:
        """The live NATS connection (for guarded publishes and direct gets)."""

    async def request(self, subject: str, body: msgspec.Struct, reply_type: type[S], timeout: float = 10.0) -> S:
        """One query-service request; errors come back as typed exceptions."""


def session_token(min_seq: Token | Receipt | None, stream: str, seen: int) -> dict[str, int] | None:
    """The `min_seq` a read sends: the caller's token, else this client's own last write (session
    consistency: a client reads its own commands), else none (answer at once)."""
    if isinstance(min_seq, Receipt):
        return min_seq.token
    if min_seq is not None:
        return dict(min_seq)
    return {stream: seen} if seen else None
