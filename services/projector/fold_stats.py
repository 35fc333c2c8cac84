"""Cheap in-memory counters of the fold, read by /metrics (services/dashboard/metrics.py).

Per projection: a histogram of batch sizes (events) and of fold durations (seconds, the
DuckDB transaction included), and the rejects by reason kind. Plain ints bumped on the
event loop after each batch: no lock, no I/O. A reject's reason is free text (it names the
field and the value), so it is counted by its kind, a short fixed set, to keep the label's
cardinality bounded; `fleetlog rejects` gives the full reasons.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

__all__ = ["BATCH_BUCKETS", "DURATION_BUCKETS_S", "FoldStats", "Histogram", "reject_kind"]

BATCH_BUCKETS = (1.0, 10.0, 100.0, 500.0, 1000.0, 5000.0, 10_000.0, 50_000.0)
DURATION_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# A reason's prefix (as BatchFolder writes it) -> its kind; anything else broke a projection's rule.
_KINDS = (("oversize:", "oversize"), ("invalid event:", "invalid_event"), ("not valid JSON:", "invalid_json"),
          ("event type ", "unknown_type"), ("subject mismatch:", "subject_mismatch"), ("fold failed:", "fold_failed"))


def reject_kind(reason: str) -> str:
    return next((kind for prefix, kind in _KINDS if reason.startswith(prefix)), "rule")


@dataclass
class Histogram:
    """Observations per bucket (not cumulative; the last is +Inf) and their sum."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value


@dataclass
class FoldStats:
    batch_events: dict[str, Histogram] = field(default_factory=dict)
    duration_s: dict[str, Histogram] = field(default_factory=dict)
    rejects: dict[tuple[str, str], int] = field(default_factory=dict)  # (projection, kind) -> count
    # A feed's fold loop that failed and was started again from its checkpoint (pipeline.py
    # `_fold_feed`): (projection, stream) -> count. Never 0 on a healthy node.
    restarts: dict[tuple[str, str], int] = field(default_factory=dict)

    def observe(self, projection: str, events: int, seconds: float, reasons: list[str]) -> None:
        self.batch_events.setdefault(projection, Histogram(BATCH_BUCKETS)).observe(events)
        self.duration_s.setdefault(projection, Histogram(DURATION_BUCKETS_S)).observe(seconds)
        for reason in reasons:
            key = (projection, reject_kind(reason))
            self.rejects[key] = self.rejects.get(key, 0) + 1

    def restarted(self, projection: str, stream: str) -> None:
        self.restarts[(projection, stream)] = self.restarts.get((projection, stream), 0) + 1
