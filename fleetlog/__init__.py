"""fleetlog: the flight recorder and control ledger for fleets of AI agents.

The public client lives here; the layers live in `fleetlog.schemas` (the event
contract), `fleetlog.projections` (the views) and `fleetlog.services` (broker,
publisher, projector, query service, CLI).
"""

from fleetlog.schemas import CANONICAL_OUTCOMES
from fleetlog.services.backbone.config import FleetSettings
from fleetlog.services.backbone.errors import (
    FleetError,
    FleetUnavailable,
    FleetValidationError,
    QueryError,
    StaleError,
)
from fleetlog.services.client.fleet import Fleet, FleetSync
from fleetlog.services.writepath.publisher import Position, Receipt, Token

__version__ = "0.1.0"

__all__ = [
    "CANONICAL_OUTCOMES",
    "Fleet",
    "FleetError",
    "FleetSettings",
    "FleetSync",
    "FleetUnavailable",
    "FleetValidationError",
    "Position",
    "QueryError",
    "Receipt",
    "StaleError",
    "Token",
    "__version__",
]
