"""The session-processor pipeline's client: `api` (ProcessorsAPI: bookkeeping, runs), `files`
(session files and the scan rules), `lock` (the processor lock), `registry` (processors by name
and entry point), `runner` (one run with its stats), `health` (ok/warning/info, stuck files)."""
