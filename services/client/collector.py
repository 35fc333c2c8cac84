"""The host self-snapshot collector: what a host can say about itself, from the standard library.

`host_facts()` is one JSON object (nested by topic, so diffs name paths such as
`/memory/available_mb`). Values that change on every call (uptime, load) are
rounded so that an idle host's consecutive snapshots diff to little.
`collect()` takes one snapshot every `every_s` seconds through the fire-and-forget
path: a collector never blocks on, or fails with, the broker.
"""

from __future__ import annotations

import asyncio
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fleetlog.services.client.snapshots import SnapshotsAPI
    from fleetlog.services.writepath.receipt import Receipt

__all__ = ["collect", "host_facts"]


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("MemTotal", "MemAvailable", "SwapTotal", "SwapFree"):
                out[name] = int(rest.split()[0]) // 1024  # kB -> MB
    except OSError:
        pass
    return out


def _uptime_h() -> float | None:
    try:
        return round(float(Path("/proc/uptime").read_text().split()[0]) / 3600, 1)
    except (OSError, ValueError, IndexError):
        return None


def host_facts(disk_path: str = "/") -> dict[str, Any]:
    """This host's facts: system, CPU, memory, disk, Python (stdlib only; Linux adds /proc)."""
    mem = _meminfo()
    disk = shutil.disk_usage(disk_path)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    facts: dict[str, Any] = {
        "system": {"os": platform.system(), "release": platform.release(), "machine": platform.machine()},
        "cpu": {"count": os.cpu_count(), "load_1m": round(load[0], 1), "load_15m": round(load[2], 1)},
        "disk": {"path": disk_path, "total_gb": round(disk.total / 2**30, 1), "free_gb": round(disk.free / 2**30, 1)},
        "python": {"version": platform.python_version(), "executable": sys.executable},
    }
    if mem:
        facts["memory"] = {"total_mb": mem.get("MemTotal"), "available_mb": mem.get("MemAvailable")}
    uptime = _uptime_h()
    if uptime is not None:
        facts["uptime_h"] = uptime
    return facts


async def collect(snapshots: SnapshotsAPI, agent: str, *, host: str | None = None, every_s: float = 60.0,
                  count: int | None = None, disk_path: str = "/") -> list[Receipt]:
    """Take a snapshot of `host_facts()` every `every_s` s, `count` times (None: until cancelled)."""
    receipts: list[Receipt] = []
    while count is None or len(receipts) < count:
        facts = await asyncio.to_thread(host_facts, disk_path)
        receipts.append(snapshots.take(agent, facts, host=host))
        if count is not None and len(receipts) >= count:
            break
        await asyncio.sleep(every_s)
    return receipts
