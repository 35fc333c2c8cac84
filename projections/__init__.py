"""fleetlog's views: one module per projection (DDL + fold + version + its queries)."""

from ._base import (
    Endpoint,
    FoldReject,
    Projection,
    QueryContext,
    RejectEvent,
    StoredEvent,
    execute_prepared,
    insert_new_by_id,
)
from .attempts import PROJECTION as ATTEMPTS
from .processors import PROJECTION as PROCESSORS
from .runs import PROJECTION as RUNS
from .runtimes import PROJECTION as RUNTIMES
from .snapshots import PROJECTION as SNAPSHOTS
from .state import PROJECTION as STATE

# Every projection the projector runs, in start-up order.
ALL: tuple[Projection, ...] = (ATTEMPTS, RUNS, RUNTIMES, STATE, SNAPSHOTS, PROCESSORS)

__all__ = [
    "ALL",
    "ATTEMPTS",
    "PROCESSORS",
    "RUNS",
    "RUNTIMES",
    "SNAPSHOTS",
    "STATE",
    "Endpoint",
    "FoldReject",
    "Projection",
    "QueryContext",
    "RejectEvent",
    "StoredEvent",
    "execute_prepared",
    "insert_new_by_id",
]
