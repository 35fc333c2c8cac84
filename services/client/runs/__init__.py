"""The run ledger's client: `api` (RunsAPI), `claims` (claim, renew, release: guarded writes),
`events` (result events, first write wins), `rules` (the ledger's pure rules), `stats`
(run, runner and runtime stats)."""
