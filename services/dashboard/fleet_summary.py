"""The Fleet page's per-agent rows, kept by the dashboard and refreshed incrementally.

One `fleetlog.sql` request computes an agent's row (last action, outcome and when, the
house p95 per action over its last N): over a million attempts that costs a second or
more, too slow to wait for on every page load. So the dashboard keeps the rows: the whole
table once (at start, in the background), then at each page load only the agents with
attempts newer than the position the rows reflect (`seq > as_of`, which the view's zone
maps answer without a scan) are recomputed, through the same query restricted to them —
the same numbers, by the same SQL, on the same data path. A page waits for that refresh at
most `WAIT_S`; past it the page shows the rows as they stand (the refresh goes on, and the
live events bring the newest attempt of each agent anyway). Deletions (retention, purge)
are not new rows: the whole table is recomputed every `FULL_EVERY_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from fleetlog.services.client.fleet import Fleet

__all__ = ["MAX_AGENTS", "P95_LAST_N", "AgentSummary", "agents_sql"]

log = logging.getLogger("fleetlog.dashboard")

P95_LAST_N = 100
MAX_AGENTS = 5000
STREAM = "FLEET_ATTEMPTS"
WAIT_S = 0.25  # what a page load waits for the refresh before it shows the rows as they stand
FULL_EVERY_S = 60.0  # rows of deleted attempts go at the next full refresh


def agents_sql(last_n: int = P95_LAST_N, after_seq: int | None = None) -> str:
    """One row per agent (the sql endpoint caps rows: one per (agent, action) would not fit);
    with `after_seq`, only the agents with an attempt stored after it.

    One window (the n-th newest per agent and action, by ts_utc then seq) keeps the last N;
    the agent's newest attempt is the newest of its actions' newest, found by aggregation
    (a second window over every attempt cost as much again). A top-N aggregate
    (`max_by(elapsed_s, key, N)`) was faster still but does not spill: it ran out of the
    view's 192 MB at a million attempts. The house p95 is the sorted sample at
    max(0, floor(0.95·(n−1)))."""
    n = int(last_n)
    where = "" if after_seq is None else \
        f"WHERE agent IN (SELECT DISTINCT agent FROM attempts WHERE seq > {int(after_seq)})"
    return f"""
WITH r AS (
  SELECT agent, action, outcome, ts, elapsed_s, ts_utc, seq,
         row_number() OVER (PARTITION BY agent, action ORDER BY ts_utc DESC, seq DESC) AS nth
  FROM attempts {where}
), g AS (
  SELECT agent, action,
         list_sort(list(elapsed_s))[CAST(greatest(0, floor(0.95 * (count(*) - 1))) AS BIGINT) + 1] AS p95,
         max((ts_utc, seq)) AS newest,
         max_by(outcome, (ts_utc, seq)) AS last_outcome,
         max_by(ts, (ts_utc, seq)) AS last_ts
  FROM r WHERE nth <= {n} GROUP BY agent, action
)
SELECT agent,
       string_agg(action || ' ' || printf('%.2f', p95) || 's', ' · ' ORDER BY action) AS p95,
       max_by(action, newest) AS last_action, max_by(last_outcome, newest) AS last_outcome,
       max_by(last_ts, newest) AS last_ts
FROM g GROUP BY agent ORDER BY agent"""


class AgentSummary:
    """agent -> {p95, last_action, last_outcome, last_ts}, as of `seq` of FLEET_ATTEMPTS."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.rows: dict[str, dict[str, Any]] = {}
        self.seq: int | None = None  # None: never loaded
        self.full_at = 0.0  # time.monotonic() of the last full load
        self.refreshes = 0  # incremental refreshes (for tests and the bench)
        self._running: asyncio.Task[None] | None = None

    def warm(self) -> None:
        """Start the first full load in the background (the dashboard's start)."""
        self._refresh()

    async def current(self) -> dict[str, dict[str, Any]]:
        """The rows, refreshed first if that takes at most WAIT_S (always, the first time)."""
        task = self._refresh()
        if self.seq is None:
            await asyncio.shield(task)  # nothing to show yet: the one full load
        else:
            await asyncio.wait({task}, timeout=WAIT_S)
        return self.rows

    async def fresh(self, min_seq: int) -> dict[str, dict[str, Any]]:
        """The rows once they reflect FLEET_ATTEMPTS up to `min_seq` (the live view's re-read)."""
        while self.seq is None or self.seq < min_seq:
            running = self._running
            if running is not None and not running.done():
                with contextlib.suppress(Exception):
                    await asyncio.shield(running)
                continue
            self._running = asyncio.create_task(self._load(min_seq), name="dashboard fleet rows")
            await asyncio.shield(self._running)
        return self.rows

    async def stop(self) -> None:
        if self._running is not None:
            self._running.cancel()
            with contextlib.suppress(BaseException):
                await self._running

    def _refresh(self) -> asyncio.Task[None]:
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._load(), name="dashboard fleet rows")
            self._running.add_done_callback(_said)
        return self._running

    async def _load(self, min_seq: int = 0) -> None:
        full = self.seq is None or time.monotonic() - self.full_at >= FULL_EVERY_S
        answer = await self.fleet.sql(agents_sql(after_seq=None if full else self.seq), max_rows=MAX_AGENTS,
                                      min_seq={STREAM: min_seq} if min_seq else None)
        got = {agent: {"p95": p95, "last_action": action, "last_outcome": outcome, "last_ts": ts}
               for agent, p95, action, outcome, ts in answer.rows}
        if full:
            self.rows, self.full_at = got, time.monotonic()
        else:
            self.rows.update(got)
            self.refreshes += 1
        self.seq = answer.as_of.get(STREAM, 0)


def _said(task: asyncio.Task[None]) -> None:
    """A refresh nobody waited for that failed: logged (the next page load tries again)."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("dashboard: the Fleet rows were not refreshed: %s", task.exception())
