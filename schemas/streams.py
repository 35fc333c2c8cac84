"""The stream table (DESIGN §2), declared once. `fleetlog.services.backbone.streams` ensures it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["DAY_S", "STREAMS", "StreamSpec", "stream_for_subject"]

DAY_S: Final = 86_400.0


@dataclass(frozen=True)
class StreamSpec:
    """One JetStream stream: what it holds and how long it keeps it.

    `max_age_s` None means no age limit; `max_msgs_per_subject` 1 makes the
    stream a compacted table (last message per subject), N keeps the last N.
    `max_age_setting` names the `FleetSettings` field that overrides max_age_s.
    """

    name: str
    subjects: tuple[str, ...]
    holds: str
    max_age_s: float | None = None
    max_msgs_per_subject: int = -1
    max_age_setting: str | None = None
    duplicate_window_s: float = 120.0


STREAMS: Final[tuple[StreamSpec, ...]] = (
    StreamSpec(
        "FLEET_ATTEMPTS",
        ("fleet.attempt.*.*", "fleet.attempt.purge"),
        "action attempts",
        max_age_s=30 * DAY_S,
        max_age_setting="attempts_max_age_days",
    ),
    StreamSpec(
        "FLEET_RUNS",
        ("fleet.run.*.state", "fleet.run.*.event.*"),
        "run lifecycle (guarded), run result events (one subject per sequence)",
    ),
    StreamSpec(
        "FLEET_RUNTIMES",
        ("fleet.runtime.*.*",),
        "runtime registration, heartbeat, status",
        max_msgs_per_subject=1,
    ),
    StreamSpec(
        "FLEET_STATE",
        ("fleet.state.*.*.*",),
        "scoped state set / delete (tombstone)",
        max_msgs_per_subject=1,
    ),
    StreamSpec(
        "FLEET_SNAPSHOTS",
        ("fleet.snapshot.*.*",),
        "host snapshots",
        # Max age only, no last-N per subject: the view then holds exactly the snapshots a
        # rebuild sees (trimmed by stream sequence), and history reaches back the whole age.
        max_age_s=30 * DAY_S,
        max_age_setting="snapshots_max_age_days",
    ),
    StreamSpec(
        "FLEET_DIFFS",
        ("fleet.diff.*.*",),
        "derived snapshot diffs (subscribable)",
        max_age_s=30 * DAY_S,
        max_age_setting="snapshots_max_age_days",
    ),
    StreamSpec(
        "FLEET_PROCESSORS",
        ("fleet.proc.*.session.*", "fleet.proc.*.run.*", "fleet.proc.*.lock"),
        "processor bookkeeping per (processor, session file), runs, locks (latest per subject)",
        max_msgs_per_subject=1,
    ),
    StreamSpec(
        "FLEET_SCHEDULER",
        ("fleet.sched.*.state",),
        "scheduler job state: last run and outcome per job (guarded; a record, not an event)",
        max_msgs_per_subject=1,
    ),
    StreamSpec(
        "FLEET_REJECTS",
        ("fleet.reject.*",),
        "events a projection refused, with the reason",
        max_age_s=30 * DAY_S,
        max_age_setting="rejects_max_age_days",
    ),
)

_BY_NAME: Final = {s.name: s for s in STREAMS}


def stream_for_subject(subject: str) -> StreamSpec | None:
    """The stream that captures `subject` (token-wise wildcard match)."""
    tokens = subject.split(".")
    for spec in STREAMS:
        for pattern in spec.subjects:
            if _matches(pattern.split("."), tokens):
                return spec
    return None


def _matches(pattern: list[str], tokens: list[str]) -> bool:
    for i, p in enumerate(pattern):
        if p == ">":
            return len(tokens) > i
        if i >= len(tokens) or (p != "*" and p != tokens[i]):
            return False
    return len(pattern) == len(tokens)


def by_name(name: str) -> StreamSpec:
    return _BY_NAME[name]
