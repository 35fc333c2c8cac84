"""One log line per burst of rejects, not one per reject.

A producer with a bug can send thousands of bad events a second; a line each would drown
the log. The node looks at its projector's reject counters (services/projector/fold_stats.py)
every `every_s` and, when they moved, logs one line: how many, by projection and kind,
and the first reason of the burst (read from the views through the query service: the
counters keep kinds only, the view keeps the reasons). At most one line per interval.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import msgspec
from fleetlog.schemas.answers import RejectsAnswer, RejectsQuery
from fleetlog.services.projector.fold_stats import FoldStats
from nats.aio.client import Client

__all__ = ["REJECT_LOG_S", "watch_reject_bursts"]

log = logging.getLogger("fleetlog.rejects")

REJECT_LOG_S = 10.0
REASONS_MAX = 500  # the burst's first reason is exact up to this many rejects in one interval
_answer = msgspec.json.Decoder(RejectsAnswer)


async def watch_reject_bursts(nc: Client, stats: Callable[[], FoldStats | None],
                              every_s: float = REJECT_LOG_S) -> None:
    """Runs until cancelled (the node's stop)."""
    seen = dict((stats() or FoldStats()).rejects)
    while True:
        await asyncio.sleep(every_s)
        now = dict((stats() or FoldStats()).rejects)
        moved = {key: n - seen.get(key, 0) for key, n in now.items() if n > seen.get(key, 0)}
        seen = now
        if not moved:
            continue
        total = sum(moved.values())
        kinds = ", ".join(f"{proj} {kind} {n}" for (proj, kind), n in sorted(moved.items()))
        log.warning("rejects: %d events refused in the last %.0fs (%s); first: %s", total, every_s, kinds,
                    await _first_reason(nc, total))


async def _first_reason(nc: Client, total: int) -> str:
    """The oldest of the newest `total` rejects (the burst's first), or why it is unknown."""
    try:
        msg = await nc.request("fleetlog.rejects", msgspec.json.encode(RejectsQuery(limit=min(total, REASONS_MAX))),
                               timeout=2.0)
        items = _answer.decode(msg.data).items
    except Exception as exc:  # the line still says how many; `fleetlog rejects` has the reasons
        return f"unknown ({type(exc).__name__}; see `fleetlog rejects`)"
    if not items:
        return "unknown (see `fleetlog rejects`)"
    first = items[-1]
    return f"{first.projection} {first.stream} seq {first.seq}: {first.reason}"
