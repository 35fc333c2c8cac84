"""The client SDK: `Fleet` / `FleetSync` and one module per family API. Family APIs see
the client only through the `FleetClient` seam (seam.py), never `Fleet` itself."""
