"""What this process's clients did, counted where it happens, for the node's `/metrics`.

A guarded write that loses its race is never stored, and a hook's run is nowhere in the
streams: only the process that did them can count them. So the client library counts
claims made, lost races, diff records published and hook runs here, process-wide (one
process may hold several `Fleet`s, and hooks run on worker threads: hence the lock). The
node's `/metrics` shows the counts of the node's own process (its reactors, scheduler,
processors and anything embedded in it); an agent's process has its own (`counts()`).
"""

from __future__ import annotations

import threading

__all__ = ["CLAIMS", "DIFFS", "HOOK_RUNS", "LOST_RACES", "count", "counts"]

CLAIMS = "claims"  # runs claimed (a guarded claim JetStream stored)
LOST_RACES = "lost_races"  # label: the write (claim, snapshot) that lost to another writer
DIFFS = "diffs"  # snapshot diff records handed to the publisher
HOOK_RUNS = "hook_runs"  # labels: hook name, outcome (ok, failed, dropped)

_lock = threading.Lock()
_counts: dict[tuple[str, tuple[str, ...]], int] = {}


def count(name: str, *labels: str, n: int = 1) -> None:
    with _lock:
        key = (name, labels)
        _counts[key] = _counts.get(key, 0) + n


def counts() -> dict[tuple[str, tuple[str, ...]], int]:
    """A copy: (name, label values) -> count since the process started."""
    with _lock:
        return dict(_counts)
