"""fleetlog's views: one module per projection (DDL + fold + version + its queries)."""

from ._base import Endpoint, FoldReject, Projection, QueryContext, RejectEvent, StoredEvent, insert_new_by_id
from .attempts import PROJECTION as ATTEMPTS
from .state import PROJECTION as STATE

# Every projection the projector runs, in start-up order.
ALL: tuple[Projection, ...] = (ATTEMPTS, STATE)

__all__ = [
    "ALL",
    "ATTEMPTS",
    "STATE",
    "Endpoint",
    "FoldReject",
    "Projection",
    "QueryContext",
    "RejectEvent",
    "StoredEvent",
    "insert_new_by_id",
]
