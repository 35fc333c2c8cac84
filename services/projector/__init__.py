"""The projector runtime: ordered stream delivery (the stream_* readers), the fold into
DuckDB generations with their checkpoints (store), rebuild/promotion and retention.
Knows projections only through `fleetlog.projections._base.Projection`."""
