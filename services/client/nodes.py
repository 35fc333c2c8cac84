"""Every fleetlog node's own status (`fleetlog status --nodes`).

`fleetlog.status` is answered by one node of the `fleetlog-status` group, whichever NATS
picks. To see each node — one still catching up is in no query group — ask every
instance of the `fleetlog` micro service to identify itself (`$SRV.PING.fleetlog`, which
all answer), then each node on its own subject `fleetlog.node.<id>.status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from fleetlog.schemas.answers import StatusAnswer, StatusQuery, node_status_subject
from fleetlog.services.backbone.errors import FleetValidationError
from fleetlog.services.client.seam import FleetClient

__all__ = ["PING_ANSWER_WINDOW_S", "node_statuses"]

# How long a ping's answers are carried back to a client identity on a secure node (the
# `response_threshold` of the `$SRV.PING.fleetlog` export, services/node/identities.py): longer
# would let a pinging client hold the broker's reply mappings longer. A node answers a ping at
# once; a client identity waiting longer than this only waits for answers that cannot come.
PING_ANSWER_WINDOW_S = 2.0


async def node_statuses(client: FleetClient, wait_s: float = 1.0, expect: int | None = None) -> list[StatusAnswer]:
    """The status of each node that answered a ping within `wait_s` (or once `expect` have),
    serving ones first. On a secure node a client identity gets the answers of the first
    PING_ANSWER_WINDOW_S only (trusted identities, and open nodes, all of them)."""
    if not wait_s > 0:
        raise FleetValidationError("wait_s", "must be > 0 seconds")
    nc = await client.nats()
    inbox = nc.new_inbox()
    ids: list[str] = []
    sub = await nc.subscribe(inbox)
    try:
        await nc.publish("$SRV.PING.fleetlog", b"", reply=inbox)  # a core subject, no stream
        deadline = asyncio.get_running_loop().time() + wait_s
        while (left := deadline - asyncio.get_running_loop().time()) > 0 and len(ids) != expect:
            try:
                msg = await sub.next_msg(timeout=left)
            except Exception:  # nats' TimeoutError: nobody else answered
                break
            with contextlib.suppress(ValueError, KeyError):
                ids.append(str(json.loads(msg.data)["id"]))
    finally:
        await sub.unsubscribe()
    answers = await asyncio.gather(
        *(client.request(node_status_subject(node), StatusQuery(), StatusAnswer) for node in sorted(set(ids))),
        return_exceptions=True,
    )
    found = [a for a in answers if isinstance(a, StatusAnswer)]
    return sorted(found, key=lambda a: (a.node_state != "serving", a.node))
