"""Drop-in for scitex's attempt log (`scitex_agent_container.action_store`), backed by fleetlog.

Same names, signatures and return shapes, synchronous, thread-safe; every call goes through
the process's one shared `FleetSync` (fleetlog.compat.connect, else `FLEETLOG_NATS_URL`).
Like the original it never raises from `append_attempt` (a bad record or a failed write is
logged and counted: fleetlog.compat.error_counts()), and reads that fail return empty.

`root` means "a separate fleet": a root's attempts are recorded under agent
`root-<sha256(resolved root)[:16]>/<agent>`, and every read given that root sees only that
namespace (the prefix is stripped from the rows it returns). Without a root, agents are
recorded as given.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec

from fleetlog.compat._shared import shared, swallowed
from fleetlog.services.client.sync import FleetSync
from fleetlog.services.client.timeparse import parse_since

__all__ = [
    "DEFAULT_RETENTION_DAYS",
    "DEFAULT_SNAPSHOT_MAX_CHARS",
    "OUTCOMES",
    "append_attempt",
    "purge_old",
    "query",
    "stats",
    "summarize",
]

logger = logging.getLogger(__name__)

DEFAULT_RETENTION_DAYS = int(os.environ.get("SCITEX_AGENT_ACTION_RETENTION_DAYS", "30"))
DEFAULT_SNAPSHOT_MAX_CHARS = int(os.environ.get("SCITEX_AGENT_ACTION_SNAPSHOT_MAX_CHARS", "4096"))
OUTCOMES = ("success", "precondition_fail", "send_error", "completion_timeout", "skipped_by_policy")

_ROW_KEYS = ("id", "ts", "agent", "action", "outcome", "elapsed_s", "pane_before", "pane_after", "extras")
# Read-your-writes: a read after a write in this process waits for that write (flush → token).
_dirty = threading.Event()


def _namespace(root: Path | str | None) -> str:
    if root is None:
        return ""
    digest = hashlib.sha256(str(Path(root).expanduser().resolve()).encode()).hexdigest()[:16]
    return f"root-{digest}/"


def _token(sync: FleetSync) -> dict[str, int] | None:
    if not _dirty.is_set():
        return None
    _dirty.clear()
    return sync.flush() or None


def _truncate_snapshot(snap: Any, max_chars: int = DEFAULT_SNAPSHOT_MAX_CHARS) -> dict[str, Any] | None:
    """The original's `{format, text}` wrapper: None → None; a dict with 'format' kept with its
    text tail-truncated; str → "full"; anything else → its JSON dump ("json-dump", never marked)."""
    if snap is None:
        return None
    if isinstance(snap, dict) and "format" in snap:
        out = dict(snap)
        text = out.get("text", "")
        if isinstance(text, str) and len(text) > max_chars:
            out["text"] = text[-max_chars:]
            out["truncated"] = True
        return out
    if isinstance(snap, str):
        cut = len(snap) > max_chars
        return {"format": "full", "text": snap[-max_chars:] if cut else snap, **({"truncated": True} if cut else {})}
    try:
        dumped = json.dumps(snap, default=str)
    except (TypeError, ValueError):
        dumped = str(snap)
    return {"format": "json-dump", "text": dumped[-max_chars:] if len(dumped) > max_chars else dumped}


def _parse_since(since: str | datetime | None) -> str | None:
    """The original's `since`: datetime, ISO text (returned as given) or `<n><s|m|h|d>` → ISO UTC."""
    if since is None:
        return None
    if isinstance(since, datetime):
        return since.astimezone(UTC).isoformat()
    if isinstance(since, str):
        s = since.strip().lower()
        if not s:
            return None
        if s[-1] in ("s", "m", "h", "d") and s[:-1].replace(".", "", 1).isdigit():
            seconds = float(s[:-1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[s[-1]]
            return (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat()
        return since
    raise TypeError(f"Unsupported 'since' type: {type(since).__name__}")


def append_attempt(record: dict[str, Any], *, root: Path | None = None) -> None:
    """Record one attempt (fire-and-forget, as fast as `record()`). Never raises."""
    try:
        agent = str(record["agent"])
        action = str(record["action"])
        outcome = str(record["outcome"])
        elapsed_s = float(record["elapsed_s"])
    except (KeyError, TypeError, ValueError) as exc:
        swallowed(logger, "action_store.append_attempt", exc)
        return
    try:
        shared().attempts.record(
            _namespace(root) + agent, action, outcome, elapsed_s,
            pane_before=_truncate_snapshot(record.get("pane_before")),
            pane_after=_truncate_snapshot(record.get("pane_after")),
            extras=record.get("extras") or {},
            ts=record.get("ts") or None,
        )
        _dirty.set()
    except Exception as exc:
        swallowed(logger, "action_store.append_attempt", exc)


def _row(item: Any, prefix: str) -> dict[str, Any]:
    row: dict[str, Any] = msgspec.to_builtins(item) if not isinstance(item, dict) else item
    row = {k: row[k] for k in _ROW_KEYS}
    row["agent"] = str(row["agent"]).removeprefix(prefix)
    return row


def query(
    *, agent: str | None = None, action: str | None = None, outcome: str | None = None,
    since: str | datetime | None = None, limit: int = 50, offset: int = 0, root: Path | None = None,
) -> list[dict[str, Any]]:
    """Matching attempts, newest first; [] when the read fails (logged and counted)."""
    prefix = _namespace(root)
    try:
        sync = shared()
        token = _token(sync)
        if agent or not prefix:
            page = sync.attempts.query(agent=prefix + agent if agent else None, action=action or None,
                                       outcome=outcome or None, since=_parse_since(since), limit=int(limit),
                                       offset=int(offset), min_seq=token)
            return [_row(item, prefix) for item in page.items]
        # A root without an agent filter: every agent of that namespace, in the query's order.
        where = _where(prefix, action, outcome, _parse_since(since))
        answer = sync.sql(f"SELECT {', '.join(_ROW_KEYS)} FROM attempts{where} "
                          f"ORDER BY ts_utc DESC, seq DESC LIMIT {int(limit)} OFFSET {int(offset)}", min_seq=token)
        return [_row(_decoded(dict(zip(answer.columns, r, strict=True))), prefix) for r in answer.rows]
    except Exception as exc:
        swallowed(logger, "action_store.query", exc)
        return []


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _where(prefix: str, action: str | None, outcome: str | None, since: str | None) -> str:
    conds = [f"starts_with(agent, {_quote(prefix)})"]
    if action:
        conds.append(f"action = {_quote(action)}")
    if outcome:
        conds.append(f"outcome = {_quote(outcome)}")
    if since:
        conds.append(f"ts_utc >= {_quote(str(parse_since(since)))}::TIMESTAMPTZ")
    return " WHERE " + " AND ".join(conds)


def _decoded(row: dict[str, Any]) -> dict[str, Any]:
    for key in ("pane_before", "pane_after", "extras"):
        if isinstance(row.get(key), str):
            row[key] = json.loads(row[key])
    row["id"] = str(row["id"])
    return row


def stats(*, agent: str | None = None, since: str | datetime | None = None,
          root: Path | None = None) -> list[dict[str, Any]]:
    """Per-(action, outcome) count, mean and p95 elapsed; action asc, then count desc."""
    prefix = _namespace(root)
    try:
        sync = shared()
        token = _token(sync)
        if agent or not prefix:
            answer = sync.attempts.stats(agent=prefix + agent if agent else None, since=_parse_since(since),
                                         min_seq=token)
            return [msgspec.to_builtins(item) for item in answer.items]
        # p95 as the fleetlog view computes it: the sorted sample at floor(0.95·(n−1)), 1-based here.
        sql = ("SELECT action, outcome, count(*) AS count, avg(elapsed_s) AS mean_elapsed_s, "
               "list_sort(list(elapsed_s))[CAST(floor(0.95 * (count(*) - 1)) AS BIGINT) + 1] AS p95_elapsed_s "
               f"FROM attempts{_where(prefix, None, None, _parse_since(since))} "
               "GROUP BY action, outcome ORDER BY action ASC, count DESC")
        result = sync.sql(sql, min_seq=token)
        return [dict(zip(result.columns, r, strict=True)) for r in result.rows]
    except Exception as exc:
        swallowed(logger, "action_store.stats", exc)
        return []


def summarize(agent: str, *, limit: int = 100, root: Path | None = None) -> dict[str, Any]:
    """The agent's newest `limit` attempts summarised (the original's keys)."""
    try:
        sync = shared()
        summary = sync.attempts.summarize(_namespace(root) + agent, int(limit), min_seq=_token(sync))
        out: dict[str, Any] = msgspec.to_builtins(summary)
        return {k: out[k] for k in ("last_action_at", "last_action_name", "last_action_outcome",
                                    "last_action_elapsed_s", "counts", "p95_elapsed_s_by_action")}
    except Exception as exc:
        swallowed(logger, "action_store.summarize", exc)
        return {"last_action_at": "", "last_action_name": "", "last_action_outcome": "",
                "last_action_elapsed_s": None, "counts": {}, "p95_elapsed_s_by_action": {}}


def purge_old(*, days: int | None = None, root: Path | None = None) -> int:
    """Delete attempts older than `days` (default SCITEX_AGENT_ACTION_RETENTION_DAYS); the count.

    A purge is a fleet-wide fact (every namespace): `root` is accepted but does not narrow it.
    """
    try:
        sync = shared()
        _token(sync)  # what this process wrote is in the stream before the purge is
        return int(sync.attempts.purge(float(int(days) if days is not None else DEFAULT_RETENTION_DAYS)).deleted)
    except Exception as exc:
        swallowed(logger, "action_store.purge_old", exc)
        return 0
