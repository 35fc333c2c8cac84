"""Which reply subjects a fleetlog service answers (the confused-deputy guard).

NATS checks a requester's permission on the subject it asks, never on the reply subject it
names: a service that may publish anywhere and answered any reply would write for a reader
into a stream (`reply=fleet.run.<id>.state`, docs/security.md "Replies as a deputy"). So every
fleetlog service (the query service, the processors runner) answers only the two reply roots
below and drops any other request unanswered, counted and logged.
"""

from __future__ import annotations

import logging
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.micro.service import Service, ServiceConfig

__all__ = ["IMPORT_REPLY_ROOT", "REPLY_ROOT", "GuardedService", "private_reply"]

log = logging.getLogger("fleetlog.replies")

# Every fleetlog client's replies live under this root (an identity's under `_INBOX.<its
# public key>`).
REPLY_ROOT = "_INBOX."
# A client identity of a secure node asks from the CLIENTS account through a service import
# (services/node/identities.py `accounts`): nats-server rewrites the reply it named to a
# response subject of its own under `_R_.` in this account, valid for the answer(s) to that
# one request, and carries what is published there back to the original reply in CLIENTS.
# Answering one is safe: no stream here captures `_R_.`, and whatever reply the client named
# is written in CLIENTS, where nothing stores it (a client may not publish here directly).
# A FLEET identity (service, admin: trusted with `>` anyway) may name an `_R_.` reply itself;
# nothing captures it either.
IMPORT_REPLY_ROOT = "_R_."


def private_reply(msg: Any) -> bool:
    """Whether a request's reply subject is an inbox or an import's response subject (else it
    is dropped, never answered)."""
    reply = getattr(msg, "reply", "") or ""
    return isinstance(reply, str) and reply.startswith((REPLY_ROOT, IMPORT_REPLY_ROOT))


class GuardedService(Service):
    """A `nats.micro` service that answers only private replies: its endpoints ask
    `refuse_reply(req._msg)` first, and nats.micro's own PING / INFO / STATS handlers (which
    answer to the request's reply subject too) are wrapped here."""

    def __init__(self, client: Client, config: ServiceConfig) -> None:
        super().__init__(client, config)
        # Requests whose reply subject was not private: dropped unanswered.
        self.foreign_replies = 0

    def refuse_reply(self, msg: Any) -> bool:
        """True (and counted, logged) when `msg` names a reply outside the inboxes."""
        if private_reply(msg):
            return False
        self.foreign_replies += 1
        log.warning("dropped a request on %s: its reply subject %r is not an inbox (%s...) nor an import's "
                    "(%s...); not answered",
                    getattr(msg, "subject", "?"), getattr(msg, "reply", ""), REPLY_ROOT, IMPORT_REPLY_ROOT)
        return True

    async def _handle_ping_request(self, msg: Msg) -> None:
        if not self.refuse_reply(msg):
            await super()._handle_ping_request(msg)

    async def _handle_info_request(self, msg: Msg) -> None:
        if not self.refuse_reply(msg):
            await super()._handle_info_request(msg)

    async def _handle_stats_request(self, msg: Msg) -> None:
        if not self.refuse_reply(msg):
            await super()._handle_stats_request(msg)
