"""The attempts family's client: `api` (AttemptsAPI: record, query, stats, purge) and `panes`
(pane normalisation exactly as the attempt store did it)."""
