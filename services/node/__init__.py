"""The node: the embedded nats-server and the process that runs every layer together
(`fleetlog up` / `fleetlog serve`)."""
