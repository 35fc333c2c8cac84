"""fleetlog.compat.snapshot exercised the way scitex's own snapshot tests do: take, read back,
diff rules, a tick that fires on_diff hooks and one that fails without raising."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from fleetlog.services.node.server import Server

import fleetlog.compat as compat
from fleetlog import FleetSettings
from fleetlog.compat import snapshot
from fleetlog.snapshots import unregister_sidecars

from .helpers import in_compat_thread

SEED_KEYS = {"agent", "timestamp", "host", "tmux_count", "tmux_names", "screen_count", "claude_procs", "bun_procs",
             "node_procs", "load1", "mem_total_bytes", "mem_used_bytes", "mem_free_bytes", "nproc_cur", "nproc_max",
             "fork_pressure_pct", "context_percent", "agent_meta", "pids"}


def test_gather_and_the_diff_rules() -> None:
    snap = snapshot.gather_snapshot("alpha", session=None)
    assert set(snap) == SEED_KEYS and snap["agent"] == "alpha"
    assert snapshot._flatten({"a": {"b": 1, "c": {}}, "l": [1, 2]}) == {"a.b": 1, "l": [1, 2]}
    assert snapshot.compute_diff_fields(None, snap) == []
    prev = {"timestamp": "t1", "x": 1, "pids": {"tmux": {"server": 1}}, "gone": None}
    latest = {"timestamp": "t2", "x": 1.0, "pids": {"tmux": {"server": 2}}}
    assert snapshot.compute_diff_fields(prev, latest) == ["pids.tmux.server"]


async def test_take_then_read_latest(settings: FleetSettings, server: Server) -> None:
    def work() -> tuple[Any, ...]:
        before = snapshot.read_latest("alpha")
        first = snapshot.take_snapshot("alpha")
        second = snapshot.take_snapshot("alpha", with_diff=False)
        return before, first, second, snapshot.read_latest("alpha")

    before, first, second, latest = await in_compat_thread(settings, work)
    assert before is None
    assert (first["has_diff"], first["diff_fields"]) == (False, [])
    assert (second["has_diff"], second["diff_fields"]) == (False, [])
    assert latest is not None and latest["timestamp"] == second["timestamp"] and SEED_KEYS <= set(latest)


async def test_tick_fires_on_diff_hooks_and_never_raises(settings: FleetSettings, server: Server,
                                                         tmp_path: Path) -> None:
    marker = tmp_path / "fired"
    config = SimpleNamespace(hooks={"on_diff": [f"touch {marker}"]})
    snapshot.register_sidecar("compat-tick", "process", "worker", pid=999_999_999)

    def work() -> tuple[Any, ...]:
        snapshot.snapshot_tick("compat-tick", agent_config=config)           # first: no diff, no hook
        snapshot.register_sidecar("compat-tick", "process", "other", pid=999_999_998)  # a change the diff sees
        snapshot.snapshot_tick("compat-tick", agent_config=config)
        before = compat.error_counts().get("snapshot.snapshot_tick", 0)
        snapshot.snapshot_tick("", agent_config=config)                # bad agent: logged, counted
        after = compat.error_counts().get("snapshot.snapshot_tick", 0)
        return snapshot.read_latest("compat-tick"), after - before

    try:
        latest, swallowed = await in_compat_thread(settings, work)
    finally:
        unregister_sidecars("compat-tick")  # process-wide registry: leave nothing for other tests
    assert latest is not None and "pids.sidecars.other.pid" in latest["diff_fields"]
    assert swallowed == 1
    for _ in range(200):  # the hook runs fire-and-forget in the hook pool
        if marker.exists():
            break
        await asyncio.sleep(0.05)
    assert marker.exists()
