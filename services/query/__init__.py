"""The query side: the nats.micro query service over the projector's views, the
read-only SQL check, and replicas/exports into a file of one's own."""
