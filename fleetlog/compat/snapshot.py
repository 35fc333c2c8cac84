"""Drop-in for scitex's agent self-snapshot module, backed by fleetlog's host snapshots.

Synchronous like the original, on the process's one shared `FleetSync` (fleetlog.compat.connect,
else `FLEETLOG_NATS_URL`). Where the original rolled `<agent>.latest.json` to `.prev.json` and
wrote a diff file, `take_snapshot` stores the snapshot on the stream (the diff against its true
predecessor in stream order, a diff record when non-empty); `read_latest` reads it back (a read
after this process's own take sees it). `snapshot_tick` never raises: a failure is logged and
counted (fleetlog.compat.error_counts()).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fleetlog.compat._shared import shared, swallowed
from fleetlog.schemas.snapshots import compute_diff_fields, flatten
from fleetlog.services.client.snapshots.gather import gather, register_sidecar

__all__ = [
    "compute_diff_fields",
    "gather_snapshot",
    "read_latest",
    "register_sidecar",
    "snapshot_tick",
    "take_snapshot",
]

logger = logging.getLogger(__name__)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys to leaf values (lists whole, an empty dict adds nothing): the diff's view."""
    return flatten(d, prefix)


def gather_snapshot(agent: str, *, session: str | None = None) -> dict[str, Any]:
    """The snapshot dict of `agent` (the container's keys); no stream I/O."""
    return gather(agent, session)


def take_snapshot(agent: str, *, session: str | None = None, with_diff: bool = True) -> dict[str, Any]:
    """Gather, store and return a snapshot of `agent` with `has_diff` and `diff_fields`."""
    snap: dict[str, Any] = shared().snapshots.take(agent, session=session, with_diff=with_diff)
    return snap


def read_latest(agent: str) -> dict[str, Any] | None:
    """The newest stored snapshot of `agent` on this host, or None."""
    latest: dict[str, Any] | None = shared().snapshots.latest(agent)
    return latest


def snapshot_tick(agent: str, *, session: str | None = None, agent_config: Any = None) -> None:
    """Daemon helper: take a snapshot and fire `agent_config.hooks.on_diff` when it has a diff.
    Never raises."""
    try:
        snap = shared().snapshots.tick(agent, session=session, hooks=agent_config)
    except Exception as exc:
        swallowed(logger, "snapshot.snapshot_tick", exc)
        return
    if snap is None:  # the family's tick logged why; counted here as the original's swallowed error
        swallowed(logger, "snapshot.snapshot_tick", RuntimeError(f"snapshot[{agent}]: tick failed"))
