"""The Fleet page's per-agent rows, kept by the dashboard and refreshed incrementally.

An agent's row (last action, outcome and when, the house p95 per action over its last N)
comes from its (agent, action) pairs: over a million attempts computing them all takes a
second or more, too slow to wait for on every page load. So the dashboard keeps one small
record per pair: all of them loaded once (at start, in the background, a few hundred agents
per `fleetlog.sql` request so each answer fits), then at each page load only the pairs with
attempts newer than the position the records reflect (`seq > as_of`, which the view's zone
maps answer without a scan) are recomputed — by the same SQL, on the same data path, with
the same numbers. A page waits for that refresh at most `WAIT_S`; past it the page shows the
rows as they stand (the refresh goes on, and the live events bring each agent's newest
attempt anyway). Deletions (retention, purge) are not new rows: everything is reloaded when
a load comes `FULL_EVERY_S` after the last full one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, NamedTuple

from fleetlog.services.client.fleet import Fleet

__all__ = ["MAX_AGENTS", "P95_LAST_N", "AgentSummary", "pairs_sql"]

log = logging.getLogger("fleetlog.dashboard")

P95_LAST_N = 100
MAX_AGENTS = 5000
STREAM = "FLEET_ATTEMPTS"
WAIT_S = 0.25  # what a page load waits for the refresh before it shows the rows as they stand
FULL_EVERY_S = 60.0  # rows of deleted attempts go at the next full load
AGENTS_PER_READ = 200  # a full load's agents per request: ~20 actions each, an answer well under 1 MB
PAIRS_MAX = 10_000  # the sql endpoint's default row cap: more touched pairs than this, a full load


def pairs_sql(where: str, last_n: int = P95_LAST_N) -> str:
    """One row per (agent, action) of the attempts `where` selects: the house p95 of its last
    N elapsed (the sorted sample at max(0, floor(0.95·(n−1))), newest by ts_utc then seq),
    its newest attempt's outcome and ts, and that attempt's (epoch µs, seq) to find the
    agent's newest across its actions. One window over the selected attempts; a top-N
    aggregate (`max_by(elapsed_s, key, N)`) was faster but does not spill: it ran out of the
    view's 192 MB at a million attempts."""
    return f"""
WITH r AS (
  SELECT agent, action, outcome, ts, elapsed_s, ts_utc, seq,
         row_number() OVER (PARTITION BY agent, action ORDER BY ts_utc DESC, seq DESC) AS nth
  FROM attempts WHERE {where}
)
SELECT agent, action,
       list_sort(list(elapsed_s))[CAST(greatest(0, floor(0.95 * (count(*) - 1))) AS BIGINT) + 1] AS p95,
       max_by(outcome, (ts_utc, seq)) AS last_outcome, max_by(ts, (ts_utc, seq)) AS last_ts,
       epoch_us(max(ts_utc)) AS newest_us, max_by(seq, (ts_utc, seq)) AS newest_seq
FROM r WHERE nth <= {int(last_n)} GROUP BY agent, action ORDER BY agent, action"""


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class _Pair(NamedTuple):
    p95: float
    newest: tuple[int, int]  # (epoch µs, seq) of its newest attempt
    outcome: str
    ts: str


class AgentSummary:
    """agent -> {p95, last_action, last_outcome, last_ts}, as of `seq` of FLEET_ATTEMPTS."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.pairs: dict[str, dict[str, _Pair]] = {}  # agent -> action -> its record
        self.rows: dict[str, dict[str, Any]] = {}  # what the page shows, made from `pairs`
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
        token = {STREAM: min_seq} if min_seq else None
        if self.seq is not None and time.monotonic() - self.full_at < FULL_EVERY_S:
            touched = f"(agent, action) IN (SELECT agent, action FROM attempts WHERE seq > {int(self.seq)})"
            answer = await self.fleet.sql(pairs_sql(touched), max_rows=PAIRS_MAX, min_seq=token)
            if not answer.truncated:  # else too many pairs moved for one answer: load them all
                self._take(answer.rows, self.pairs)
                self.seq = answer.as_of.get(STREAM, 0)
                self.refreshes += 1
                self._rows()
                return
        await self.load_all(token)

    async def load_all(self, token: dict[str, int] | None = None) -> None:
        """Every pair, a few hundred agents per request (what a refresh does at start, after
        FULL_EVERY_S, or when too many pairs moved at once)."""
        started = time.monotonic()
        agents = await self.fleet.sql("SELECT DISTINCT agent FROM attempts ORDER BY agent", max_rows=MAX_AGENTS,
                                      min_seq=token)
        pairs: dict[str, dict[str, _Pair]] = {}
        seq = agents.as_of.get(STREAM, 0)  # every read below sees at least this: later pairs are refreshed
        names = [row[0] for row in agents.rows]
        for i in range(0, len(names), AGENTS_PER_READ):
            seq = min(seq, await self._load_agents(names[i:i + AGENTS_PER_READ], pairs))
        self.pairs, self.seq, self.full_at = pairs, seq, started
        self._rows()

    async def _load_agents(self, names: list[str], into: dict[str, dict[str, _Pair]]) -> int:
        """The pairs of these agents (halved until an answer holds them all); the position read."""
        answer = await self.fleet.sql(pairs_sql(f"agent IN ({', '.join(map(_quote, names))})"),
                                      max_rows=PAIRS_MAX)
        if answer.truncated and len(names) > 1:
            half = len(names) // 2
            return min(await self._load_agents(names[:half], into), await self._load_agents(names[half:], into))
        if answer.truncated:
            log.warning("dashboard: agent %r has more actions than one answer holds; its row shows the first %d",
                        names[0], len(answer.rows))
        self._take(answer.rows, into)
        return answer.as_of.get(STREAM, 0)

    @staticmethod
    def _take(rows: list[list[Any]], into: dict[str, dict[str, _Pair]]) -> None:
        for agent, action, p95, outcome, ts, newest_us, newest_seq in rows:
            into.setdefault(agent, {})[action] = _Pair(float(p95), (int(newest_us), int(newest_seq)), outcome, ts)

    def _rows(self) -> None:
        """Each agent's row from its pairs: p95 per action in action order, its newest attempt."""
        rows: dict[str, dict[str, Any]] = {}
        for agent, actions in self.pairs.items():
            last = max(actions, key=lambda a: actions[a].newest)
            rows[agent] = {"p95": " · ".join(f"{a} {actions[a].p95:.2f}s" for a in sorted(actions)),
                           "last_action": last, "last_outcome": actions[last].outcome,
                           "last_ts": actions[last].ts}
        self.rows = rows


def _said(task: asyncio.Task[None]) -> None:
    """A refresh nobody waited for that failed: logged (the next page load tries again)."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("dashboard: the Fleet rows were not refreshed: %s", task.exception())
