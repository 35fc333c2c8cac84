"""Host snapshots' client: `api` (SnapshotsAPI), `gather` (what a container says about itself),
`collector` (opt-in host facts), `take` (store with the diff against the true predecessor),
`hooks` (tick/status/on_diff hooks), `watch` (a durable consumer running hooks on diffs)."""
