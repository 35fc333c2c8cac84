"""Drop-in for agnes' session pipeline (`services/session_pipeline`), backed by fleetlog's runner.

`run_processor(conn, processor, ...)` keeps the original's signature and calls
`processor.process_session(session_path, username, session_key, conn, user_id=...)` positionally
as the original did; fleetlog's own bookkeeping (the shared `FleetSync`, or `fleet=`) never uses
`conn`. The run is `fleet.processors.run` (its lock, scan, cap, budget and audit record).

The time budget is read as `time.monotonic()` through this module's own attribute `time`, a
private namespace, so a test that replaces `session_pipeline.time.monotonic` moves the budget
clock only, never the fleetlog client's event loop.
"""

from __future__ import annotations

import functools
import inspect
import os
import time as _time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from fleetlog.compat._shared import shared
from fleetlog.services.backbone.errors import FleetValidationError
from fleetlog.services.client.processors.files import compute_file_hash, parse_jsonl
from fleetlog.services.client.processors.registry import (
    Processor,
    ProcessorResult,
    check_processor,
    get_processor,
    list_processor_names,
)
from fleetlog.services.client.sync import FleetSync

__all__ = [
    "ProcessorResult",
    "compute_file_hash",
    "get_processor",
    "list_processor_names",
    "parse_jsonl",
    "run_processor",
]

_DEFAULT_TIME_BUDGET_SECONDS = 150.0
time = SimpleNamespace(monotonic=_time.monotonic)  # the budget clock (see the module docstring)


def _budget_clock() -> float:
    return float(time.monotonic())  # looked up per call: a test's replacement takes effect


class _WithConn:
    """The caller's processor, seen by fleetlog's runner: `conn` goes in as the 4th positional."""

    def __init__(self, processor: Any, conn: Any) -> None:
        self.name: str = processor.name
        self.cadence_minutes: float = getattr(processor, "cadence_minutes", 0)
        inner = processor.process_session
        if inspect.iscoroutinefunction(inner):
            async def process_async(session_path: Path, username: str, session_key: str, **kwargs: Any) -> Any:
                return await inner(session_path, username, session_key, conn, **kwargs)

            self.process_session: Callable[..., Any] = process_async
        else:
            self.process_session = functools.partial(_call_with_conn, inner, conn)


def _call_with_conn(inner: Callable[..., Any], conn: Any, session_path: Path, username: str, session_key: str,
                    **kwargs: Any) -> Any:
    return inner(session_path, username, session_key, conn, **kwargs)


def _is_processor(obj: Any) -> bool:
    return hasattr(obj, "process_session") and hasattr(obj, "name")


def run_processor(
    conn: Any, processor: Any = None, *, session_dir: str | Path | None = None,
    max_sessions_per_run: int | None = None, time_budget_seconds: float = _DEFAULT_TIME_BUDGET_SECONDS,
    user_resolver: Callable[[str], tuple[Any, str | None] | None] | None = None, fleet: FleetSync | None = None,
) -> dict[str, Any]:
    """One run of `processor` over session_dir (default `FLEETLOG_PROCESSOR_SESSIONS`) under its
    lock; the stats dict (processor, scanned, processed, skipped, capped, errors, items_extracted,
    errors_detail). `run_processor(processor, ...)` without a conn is accepted too (conn None)."""
    if processor is None and _is_processor(conn):
        conn, processor = None, conn
    if isinstance(processor, str) and get_processor(processor) is not None:
        processor = get_processor(processor)
    # An unknown name goes to the runner as it is: it raises UnknownProcessor naming the known ones.
    target: Processor | str = processor if isinstance(processor, str) else check_processor(_WithConn(processor, conn))
    where = session_dir if session_dir is not None else os.environ.get("FLEETLOG_PROCESSOR_SESSIONS")
    if not where:
        raise FleetValidationError("session_dir", "must be given (or FLEETLOG_PROCESSOR_SESSIONS set)")
    result: dict[str, Any] = (fleet or shared()).processors.run(
        target, Path(where), max_sessions_per_run=max_sessions_per_run, time_budget_seconds=time_budget_seconds,
        user_resolver=user_resolver, clock=_budget_clock)
    return result
