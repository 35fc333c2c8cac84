"""The write path: fire-and-forget acked JetStream publish (publisher, its raw wire), the
on-disk spool behind it, and the receipts/tokens it hands back. Knows no family."""
