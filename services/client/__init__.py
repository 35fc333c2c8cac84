"""The client SDK: `Fleet` / `FleetSync` and one API per event family (a module, or a
package with its helpers: attempts/, runs/, snapshots/, processors/). Family APIs see the
client only through the `FleetClient` seam (seam.py), never `Fleet` itself."""
