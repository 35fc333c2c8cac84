"""The attempt log's client API: `fleet.attempts.record/query/stats/summarize/purge`."""

from __future__ import annotations

import math
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

import msgspec
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
from fleetlog.services.backbone.errors import FleetValidationError
from fleetlog.services.client.attempts.panes import normalize_pane
from fleetlog.services.client.timeparse import parse_since
from fleetlog.services.writepath.publisher import Receipt, Token

if TYPE_CHECKING:
    from fleetlog.services.client.seam import FleetClient

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


# -- record(): every wire rule checked at the call, without encoding the event -------------
#
# `record()` is on the agent's hot path (issue 2 part 10: p99 < 20 µs). `Fleet.emit()`
# validates a caller-built event by encoding it and decoding it with its own type; here
# every field is built or checked in Python instead, against the same rules (read from
# the schema, so they cannot drift), and the sender encodes the event off the call.
# What could change after the call (extras, a caller's pane dict) is encoded at the call
# and carried as raw JSON, so the event records the values as they were when recorded.

_LENGTHS: Final = {
    f.name: (f.type.min_length or 0, f.type.max_length)
    for f in cast(msgspec.inspect.StructType, msgspec.inspect.type_info(AttemptRecorded)).fields
    if isinstance(f.type, msgspec.inspect.StrType)
}
_IDENTITY_MAX: Final = min(_LENGTHS["agent"][1] or 0, _LENGTHS["action"][1] or 0)
_TEXT_MAX: Final = _LENGTHS["outcome"][1] or 0
assert _LENGTHS["agent"][0] <= 1 and _LENGTHS["action"][0] <= 1 and _LENGTHS["outcome"][0] <= 1
_EMPTY_OBJECT: Final = msgspec.Raw(b"{}")
_encode_json = msgspec.json.Encoder().encode
# JSON text for one character is at most 6 bytes (`\u001f`), so 6 × len(text) + 2 bounds
# any string's encoded size; keys, punctuation, id, `v` and a float fit in this.
_FIXED_BYTES: Final = 512


def _bounded_text(field: str, value: Any) -> str:
    """A required string within the schema's length limits that UTF-8 can carry."""
    if not isinstance(value, str):
        raise FleetValidationError(field, f"must be a non-empty string, got {type(value).__name__}")
    lo, hi = _LENGTHS[field]
    if not value:
        raise FleetValidationError(field, "must be a non-empty string, got ''")
    if hi is not None and len(value) > hi:
        raise FleetValidationError(field, f"must be at most {hi} characters, got {len(value)}")
    if len(value) < lo:
        raise FleetValidationError(field, f"must be at least {lo} characters, got {len(value)}")
    _utf8(field, value)
    return value


def _utf8(field: str, text: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise FleetValidationError(field, f"is not valid text ({exc.reason} at {exc.start})") from None


def _raw_json(field: str, value: Any) -> msgspec.Raw:
    try:
        return msgspec.Raw(_encode_json(value))
    except (TypeError, ValueError, OverflowError) as exc:
        raise FleetValidationError(field, f"value is not JSON-serializable: {exc}") from None


def _elapsed(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FleetValidationError("elapsed_s", f"must be a number >= 0, got {type(value).__name__}")
    try:
        elapsed = float(value)
    except OverflowError:
        elapsed = math.inf
    if not math.isfinite(elapsed) or elapsed < 0:
        raise FleetValidationError("elapsed_s", f"must be a finite number >= 0, got {value!r}")
    return elapsed


def _ts_text(ts: Any) -> str:
    if isinstance(ts, datetime):
        return ts.isoformat()
    if isinstance(ts, str):
        try:
            parse_ts(ts)
        except ValueError as exc:
            raise FleetValidationError("ts", str(exc).removeprefix("ts: ")) from None
        return _bounded_text("ts", ts)  # stored exactly as given
    raise FleetValidationError("ts", f"must be an ISO-8601 string or a datetime, got {type(ts).__name__}")


def _checked_pane(field: str, value: Any, max_chars: int) -> tuple[Any, int]:
    """The normalised pane, ready for the sender to encode, and a bound of its JSON size."""
    pane = normalize_pane(field, value, max_chars)
    if pane is None:
        return None, 4
    if isinstance(value, dict) and "format" in value:
        # A caller's dict (any keys and values besides format/text): encoded now.
        raw = _raw_json(field, pane)
        return raw, len(raw)
    text: str = pane["text"]
    _utf8(field, text)  # json-dump texts are ASCII; a caller's string may hold lone surrogates
    return pane, 64 + 6 * len(text)


def _optional_filter(field: str, value: str | None) -> str | None:
    if value is None:
        return None
    return _required_text(field, value)


class AttemptsAPI:
    def __init__(self, fleet: FleetClient) -> None:
        self._fleet = fleet
        self._subjects: dict[str, dict[str, str]] = {}  # agent -> action -> subject, bounded

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
        # Fast paths first (plain short ASCII strings, a float, a str pane); anything else
        # takes the general checks, which raise naming the field.
        if not (type(agent) is str and type(action) is str and type(outcome) is str
                and 0 < len(agent) <= _IDENTITY_MAX and 0 < len(action) <= _IDENTITY_MAX
                and 0 < len(outcome) <= _TEXT_MAX and agent.isascii() and action.isascii() and outcome.isascii()):
            _bounded_text("agent", agent)
            _bounded_text("action", action)
            _bounded_text("outcome", outcome)
        if type(elapsed_s) is float and 0.0 <= elapsed_s < math.inf:
            elapsed = elapsed_s
        else:
            elapsed = _elapsed(elapsed_s)
        ts_text = now_iso() if ts is None else _ts_text(ts)
        if extras is None:
            extras_raw = _EMPTY_OBJECT
        elif type(extras) is dict or isinstance(extras, dict):
            extras_raw = _raw_json("extras", extras) if extras else _EMPTY_OBJECT
        else:
            raise FleetValidationError("extras", f"must be a dict, got {type(extras).__name__}")
        fleet = self._fleet
        settings = fleet.settings
        max_chars = settings.pane_max_chars
        if pane_before is None:
            before: Any = None
            before_max = 4
        elif type(pane_before) is str and len(pane_before) <= max_chars and pane_before.isascii():
            before = {"format": "full", "text": pane_before}  # normalize_pane of a short string
            before_max = 64 + 6 * len(pane_before)
        else:
            before, before_max = _checked_pane("pane_before", pane_before, max_chars)
        if pane_after is None:
            after: Any = None
            after_max = 4
        else:
            after, after_max = _checked_pane("pane_after", pane_after, max_chars)
        event = AttemptRecorded(
            id=new_event_id(),
            ts=ts_text,
            agent=agent,
            action=action,
            outcome=outcome,
            elapsed_s=elapsed,
            pane_before=before,
            pane_after=after,
            extras=cast(dict[str, Any], extras_raw),
        )
        size_max = (_FIXED_BYTES + before_max + after_max + len(extras_raw)
                    + 6 * (len(agent) + len(action) + len(outcome) + len(ts_text)))
        if size_max > settings.max_event_bytes:
            return fleet.emit(event)  # near the cap: encode now, exactly, and refuse it if oversize
        by_action = self._subjects.get(agent)
        subject = None if by_action is None else by_action.get(action)
        if subject is None:
            subject = self._subject(event)
        return fleet.emit_validated(event, subject)

    def _subject(self, event: AttemptRecorded) -> str:
        subjects = self._subjects
        if len(subjects) >= 1024:
            subjects.clear()  # bounded: agents and actions repeat
        by_action = subjects.setdefault(event.agent, {})
        if len(by_action) >= 1024:
            by_action.clear()
        subject = by_action[event.action] = event.subject()
        return subject

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
