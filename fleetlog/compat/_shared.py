"""The one background `FleetSync` the synchronous drop-ins share, and the count of errors
they swallow where the original store swallowed them (logged and counted, never raised)."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Any

from fleetlog.services.client.sync import FleetSync

__all__ = ["close", "connect", "error_counts", "shared", "swallowed"]

_lock = threading.Lock()
_sync: FleetSync | None = None
_errors: Counter[str] = Counter()


def connect(nats_url: str | None = None, **kwargs: Any) -> FleetSync:
    """Open the process's shared connection (FleetSync.connect's arguments); replaces any open one.

    Without this call the first drop-in call connects to `FLEETLOG_NATS_URL` (FleetSettings' env).
    """
    global _sync
    sync = FleetSync.connect(nats_url, **kwargs)
    with _lock:
        old, _sync = _sync, sync
    if old is not None:
        old.close()
    return sync


def shared() -> FleetSync:
    """The shared connection, opened from the environment on first use (thread-safe)."""
    global _sync
    sync = _sync
    if sync is not None:
        return sync
    with _lock:
        if _sync is None:
            _sync = FleetSync.connect()
        return _sync


def close(timeout: float = 10.0) -> None:
    """Flush and close the shared connection (the next call opens a new one)."""
    global _sync
    with _lock:
        sync, _sync = _sync, None
    if sync is not None:
        sync.close(timeout)


def swallowed(logger: logging.Logger, where: str, exc: BaseException) -> None:
    """Where the original store never raised: log the reason and count it by call site."""
    with _lock:
        _errors[where] += 1
    logger.warning("%s: %s: %s", where, type(exc).__name__, exc)


def error_counts() -> dict[str, int]:
    """Errors swallowed so far, by call site (e.g. `action_store.append_attempt`)."""
    with _lock:
        return dict(_errors)
