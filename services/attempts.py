"""The attempt log's client API: `fleet.attempts.record/query/stats/summarize/purge`."""

from __future__ import annotations

import math
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from fleetlog.schemas import AttemptRecorded, new_event_id, now_iso, parse_ts
from fleetlog.schemas.attempts import (
    AttemptPage,
    AttemptsPurgeRequest,
    AttemptsQuery,
    AttemptStats,
    AttemptStatsQuery,
    AttemptSummary,
    AttemptSummaryQuery,
    PurgeResult,
)

from .errors import FleetValidationError
from .panes import normalize_pane
from .publisher import Receipt, Token
from .timeparse import parse_since

if TYPE_CHECKING:
    from .client import Fleet

__all__ = ["AttemptsAPI", "AttemptsSyncAPI"]

T = TypeVar("T")
MinSeq = Token | Receipt | None


def _token(min_seq: MinSeq) -> dict[str, int] | None:
    if isinstance(min_seq, Receipt):
        return min_seq.token
    return dict(min_seq) if min_seq else None


def _required_text(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise FleetValidationError(field, f"must be a non-empty string, got {type(value).__name__}")
    if not value:
        raise FleetValidationError(field, "must be a non-empty string, got ''")
    return value


def _optional_filter(field: str, value: str | None) -> str | None:
    if value is None:
        return None
    return _required_text(field, value)


class AttemptsAPI:
    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet

    def record(
        self,
        agent: str,
        action: str,
        outcome: str,
        elapsed_s: float,
        *,
        pane_before: Any = None,
        pane_after: Any = None,
        extras: dict[str, Any] | None = None,
        ts: str | datetime | None = None,
    ) -> Receipt:
        """Record one attempt. Returns at once (fire-and-forget); raises only for bad input."""
        _required_text("agent", agent)
        _required_text("action", action)
        _required_text("outcome", outcome)
        if isinstance(elapsed_s, bool) or not isinstance(elapsed_s, int | float):
            raise FleetValidationError("elapsed_s", f"must be a number >= 0, got {type(elapsed_s).__name__}")
        if not math.isfinite(elapsed_s) or elapsed_s < 0:
            raise FleetValidationError("elapsed_s", f"must be a finite number >= 0, got {elapsed_s!r}")
        if ts is None:
            ts_text = now_iso()
        elif isinstance(ts, datetime):
            ts_text = ts.isoformat()
        elif isinstance(ts, str):
            try:
                parse_ts(ts)
            except ValueError as exc:
                raise FleetValidationError("ts", str(exc).removeprefix("ts: ")) from None
            ts_text = ts  # stored exactly as given
        else:
            raise FleetValidationError("ts", f"must be an ISO-8601 string or a datetime, got {type(ts).__name__}")
        if extras is None:
            extras = {}
        elif not isinstance(extras, dict):
            raise FleetValidationError("extras", f"must be a dict, got {type(extras).__name__}")
        max_chars = self._fleet.settings.pane_max_chars
        event = AttemptRecorded(
            id=new_event_id(),
            ts=ts_text,
            agent=agent,
            action=action,
            outcome=outcome,
            elapsed_s=float(elapsed_s),
            pane_before=normalize_pane("pane_before", pane_before, max_chars),
            pane_after=normalize_pane("pane_after", pane_after, max_chars),
            extras=extras,
        )
        return self._fleet.emit(event)

    async def query(
        self,
        agent: str | None = None,
        action: str | None = None,
        outcome: str | None = None,
        since: datetime | str | None = None,
        limit: int = 50,
        offset: int = 0,
        *,
        min_seq: MinSeq = None,
    ) -> AttemptPage:
        """Attempts newest first (event time, then arrival)."""
        req = AttemptsQuery(
            agent=_optional_filter("agent", agent),
            action=_optional_filter("action", action),
            outcome=_optional_filter("outcome", outcome),
            since=parse_since(since),
            limit=_int_in("limit", limit, 1, 10_000),
            offset=_int_in("offset", offset, 0, None),
            min_seq=_token(min_seq),
        )
        return await self._fleet.request("fleetlog.attempts.query", req, AttemptPage)

    async def stats(
        self, agent: str | None = None, since: datetime | str | None = None, *, min_seq: MinSeq = None
    ) -> AttemptStats:
        """count, mean and p95 elapsed per (action, outcome); action asc, then count desc."""
        req = AttemptStatsQuery(agent=_optional_filter("agent", agent), since=parse_since(since),
                                min_seq=_token(min_seq))
        return await self._fleet.request("fleetlog.attempts.stats", req, AttemptStats)

    async def summarize(self, agent: str, limit: int = 100, *, min_seq: MinSeq = None) -> AttemptSummary:
        """The agent's newest `limit` attempts summarised."""
        req = AttemptSummaryQuery(agent=_required_text("agent", agent), limit=_int_in("limit", limit, 1, 10_000),
                                  min_seq=_token(min_seq))
        return await self._fleet.request("fleetlog.attempts.summary", req, AttemptSummary)

    async def purge(self, days: float) -> PurgeResult:
        """Delete attempts older than `days` from the view (recorded as a fact: rebuilds agree)."""
        if isinstance(days, bool) or not isinstance(days, int | float) or not math.isfinite(days) or days < 0:
            raise FleetValidationError("days", f"must be a number >= 0, got {days!r}")
        return await self._fleet.request("fleetlog.attempts.purge", AttemptsPurgeRequest(days=float(days)),
                                         PurgeResult, timeout=30.0)


def _int_in(field: str, value: Any, lo: int, hi: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FleetValidationError(field, f"must be an integer, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise FleetValidationError(field, f"must be {bound}, got {value}")
    return value


class AttemptsSyncAPI:
    """The same API for `FleetSync`: record stays non-blocking, queries block."""

    def __init__(self, api: AttemptsAPI, run: Callable[[Coroutine[Any, Any, Any]], Any]) -> None:
        self._api = api
        self._run = run
        self.record = api.record

    def query(self, *args: Any, **kwargs: Any) -> AttemptPage:
        result: AttemptPage = self._run(self._api.query(*args, **kwargs))
        return result

    def stats(self, *args: Any, **kwargs: Any) -> AttemptStats:
        result: AttemptStats = self._run(self._api.stats(*args, **kwargs))
        return result

    def summarize(self, *args: Any, **kwargs: Any) -> AttemptSummary:
        result: AttemptSummary = self._run(self._api.summarize(*args, **kwargs))
        return result

    def purge(self, days: float) -> PurgeResult:
        result: PurgeResult = self._run(self._api.purge(days))
        return result
