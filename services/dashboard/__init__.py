"""The web dashboard and `/metrics` of a fleetlog node (issue 18): an HTTP layer above the
client and query layers, below node/. It reads the views through the query service over
NATS with the client SDK, exactly as the CLI does (docs/architecture.md, "Dashboard")."""

from fleetlog.services.dashboard.app import Dashboard
from fleetlog.services.dashboard.metrics import NodeProbe

__all__ = ["Dashboard", "NodeProbe"]
