"""fleetlog: the flight recorder and control ledger for fleets of AI agents.

The public client lives here; the layers live in `fleetlog.schemas` (the event
contract), `fleetlog.projections` (the views) and `fleetlog.services` (one package per
layer: client, writepath, projector, query, reactors, node, cli; docs/architecture.md).
Everything a user imports is re-exported here, so code never depends on where it lives.
"""

from fleetlog.schemas import CANONICAL_OUTCOMES
from fleetlog.schemas.snapshots import compute_diff_fields
from fleetlog.services.backbone.config import FleetSettings
from fleetlog.services.backbone.errors import (
    FleetError,
    FleetRefused,
    FleetUnavailable,
    FleetValidationError,
    PermissionDenied,
    QueryError,
    StaleError,
    StaleHolderError,
)
from fleetlog.services.client.fleet import Fleet
from fleetlog.services.client.processors.lock import ProcessorLockBusy, ProcessorLockLost
from fleetlog.services.client.processors.registry import Processor, ProcessorResult
from fleetlog.services.client.state import StatePolicyError
from fleetlog.services.client.sync import FleetSync
from fleetlog.services.writepath.receipt import Position, Receipt, Token

__version__ = "0.1.0"

__all__ = [
    "CANONICAL_OUTCOMES",
    "Fleet",
    "FleetError",
    "FleetRefused",
    "FleetSettings",
    "FleetSync",
    "FleetUnavailable",
    "FleetValidationError",
    "PermissionDenied",
    "Position",
    "Processor",
    "ProcessorLockBusy",
    "ProcessorLockLost",
    "ProcessorResult",
    "QueryError",
    "Receipt",
    "StaleError",
    "StaleHolderError",
    "StatePolicyError",
    "Token",
    "__version__",
    "compute_diff_fields",
]
