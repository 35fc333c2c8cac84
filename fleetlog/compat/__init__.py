"""Drop-in modules for the stores fleetlog replaces (docs/migrating.md).

Each module keeps the original's names, signatures, sync/async nature and return shapes and
maps them onto a family API; it adds no behaviour of its own. The synchronous ones share one
background `FleetSync` per process (`connect()` here, else `FLEETLOG_NATS_URL` on first use).
"""

from fleetlog.compat._shared import close, connect, error_counts, shared

__all__ = ["close", "connect", "error_counts", "shared"]
