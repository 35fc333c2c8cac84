"""`fleetlog.snapshots`: what an agent container needs to snapshot itself without the broker.

`gather(agent, session=None)` (the container's keys, no stream I/O), `set_meta_provider(fn)`
(fn(agent) -> dict | None: the agent's metadata, projected to `agent_meta`),
`register_sidecar(agent, kind, name, pid=None, thread=None)` (`pids.sidecars`), and the
diff rules `compute_diff_fields(prev, latest)`. Taking, reading and hooks are
`fleet.snapshots.*` (docs/architecture.md, "Host snapshots").
"""

from fleetlog.schemas.snapshots import compute_diff_fields, diff_changes, flatten
from fleetlog.services.client.snapshots.gather import (
    META_KEYS,
    gather,
    register_sidecar,
    set_meta_provider,
    sidecar_alive,
    unregister_sidecars,
)
from fleetlog.services.client.snapshots.hooks import hook_commands, load_hooks_file

__all__ = [
    "META_KEYS",
    "compute_diff_fields",
    "diff_changes",
    "flatten",
    "gather",
    "hook_commands",
    "load_hooks_file",
    "register_sidecar",
    "set_meta_provider",
    "sidecar_alive",
    "unregister_sidecars",
]
