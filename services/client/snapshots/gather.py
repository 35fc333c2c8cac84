"""What an agent container's snapshot holds: `gather(agent, session=None)`, its probes and registries.

The keys are the container's, exactly (issue 11): dashboards and healers read them.
Every probe degrades to None (tool absent) or 0 (tool there, nothing found), so
`gather` succeeds with an empty PATH. External tools are run with a short timeout,
resolved on the PATH at call time; nothing here touches the broker.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["META_KEYS", "gather", "register_sidecar", "set_meta_provider", "sidecar_alive", "unregister_sidecars"]

log = logging.getLogger("fleetlog.snapshots")

META_KEYS = ("alive", "subagents", "context_pct", "current_tool", "last_activity", "model", "pane_tail",
             "pane_tail_block", "recent_actions")
PROBE_TIMEOUT_S = 5.0
_SCREEN_LINE = re.compile(r"^\s*\d+\.")

MetaProvider = Callable[[str], "dict[str, Any] | None"]
ContextSensor = Callable[[str], "float | int | None"]


class _Provider(NamedTuple):
    meta: MetaProvider | None
    sensor: ContextSensor | None


_provider = _Provider(None, None)


def set_meta_provider(fn: MetaProvider | None, context_sensor: ContextSensor | None = None) -> None:
    """Register the agent container's metadata source: fn(agent) -> dict | None (None: unregister).

    `context_sensor(agent)`, when given, is the container's context-window sensor: its value
    is `context_percent`; without it (or when it answers None) a numeric
    `agent_meta.context_pct` is used."""
    global _provider
    _provider = _Provider(fn, context_sensor)


class _Sidecar(NamedTuple):
    kind: str
    pid: int | None
    thread: threading.Thread | None


_sidecars: dict[str, dict[str, _Sidecar]] = {}
_sidecars_lock = threading.Lock()


def register_sidecar(agent: str, kind: str, name: str, pid: int | None = None,
                     thread: threading.Thread | None = None) -> None:
    """Name a helper of `agent` (kind "thread" with `thread`, or "process" with `pid`) for `pids.sidecars`."""
    with _sidecars_lock:
        _sidecars.setdefault(agent, {})[name] = _Sidecar(kind, pid, thread)


def unregister_sidecars(agent: str) -> None:
    with _sidecars_lock:
        _sidecars.pop(agent, None)


def sidecar_alive(kind: str, pid: int | None, thread: threading.Thread | None) -> bool:
    if kind == "thread":
        return thread is not None and thread.is_alive()
    if kind == "process":
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # it exists, owned by someone else
            return True
        except (OSError, OverflowError):  # any other failure, or a pid no process can have
            return False
        return True
    return False


def _sidecars_of(agent: str) -> dict[str, dict[str, Any]]:
    with _sidecars_lock:
        mine = dict(_sidecars.get(agent, {}))
    return {name: {"pid": s.pid, "kind": s.kind, "alive": sidecar_alive(s.kind, s.pid, s.thread)}
            for name, s in mine.items()}


def _run(*argv: str) -> tuple[int, str] | None:
    """(exit code, stdout) of a tool found on the PATH now; None when it is absent or cannot run."""
    exe = shutil.which(argv[0])
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
                              check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("probe %s: %s", argv[0], exc)
        return None
    return done.returncode, done.stdout


def tmux_sessions() -> tuple[int | None, list[str]]:
    out = _run("tmux", "list-sessions", "-F", "#{session_name}")
    if out is None:
        return None, []
    if out[0] != 0:  # "no server running": tmux is there, no session
        return 0, []
    names = [line for line in out[1].splitlines() if line.strip()]
    return len(names), names


def tmux_pids(session: str) -> dict[str, int | None]:
    out = _run("tmux", "display-message", "-p", "-t", session, "#{pid} #{pane_pid}")
    server = pane = None
    if out is not None and out[0] == 0:
        parts = out[1].split()
        server = _int(parts[0]) if parts else None
        pane = _int(parts[1]) if len(parts) > 1 else None
    return {"server": server, "pane": pane}


def screen_count() -> int | None:
    out = _run("screen", "-ls")
    if out is None:
        return None
    if "No Sockets found" in out[1]:
        return 0
    return sum(1 for line in out[1].splitlines() if _SCREEN_LINE.match(line))


def claude_pid() -> int | None:
    out = _run("pgrep", "-n", "-x", "claude")  # the exact name: -f would match any command line
    if out is None or not out[1].strip():
        return None
    return _int(out[1].splitlines()[0])


def proc_count(pattern: str) -> int | None:
    out = _run("pgrep", "-af", pattern)
    if out is None:
        return None
    return len([line for line in out[1].splitlines() if line.strip()])


def _int(text: str) -> int | None:
    try:
        return int(text.strip())
    except ValueError:
        return None


def memory() -> tuple[int | None, int | None, int | None]:
    """(total, used, free) bytes; free is what is available (Linux MemAvailable, else MemFree)."""
    if sys.platform == "darwin":
        return _memory_darwin()
    info: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("MemTotal", "MemAvailable", "MemFree"):
                info[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None, None, None
    total = info.get("MemTotal")
    free = info.get("MemAvailable", info.get("MemFree"))
    if total is None or free is None:
        return total, None, free
    return total, total - free, free


def _memory_darwin() -> tuple[int | None, int | None, int | None]:
    size = _run("sysctl", "-n", "hw.memsize")
    stat = _run("vm_stat")
    total = _int(size[1]) if size is not None else None
    if stat is None:
        return total, None, None
    page = re.search(r"page size of (\d+) bytes", stat[1])
    pages: dict[str, int] = {}
    for line in stat[1].splitlines():
        name, _, rest = line.partition(":")
        value = _int(rest.strip().rstrip("."))
        if value is not None:
            pages[name.strip()] = value
    if page is None:
        return total, None, None
    free = (pages.get("Pages free", 0) + pages.get("Pages inactive", 0)
            + pages.get("Pages speculative", 0)) * int(page.group(1))
    return total, (total - free if total is not None else None), free


def nproc() -> tuple[int | None, int | None]:
    if sys.platform == "darwin":
        ps = _run("ps", "-A", "-o", "pid=")
        cur = len(ps[1].split()) if ps is not None else None
        limit = _run("sysctl", "-n", "kern.maxproc")
        return cur, (_int(limit[1]) if limit is not None else None)
    try:
        cur: int | None = sum(1 for p in os.listdir("/proc") if p.isdigit())
    except OSError:
        cur = None
    try:
        top: int | None = int(Path("/proc/sys/kernel/pid_max").read_text().strip())
    except (OSError, ValueError):
        top = None
    return cur, top


def fork_pressure(cur: int | None, top: int | None) -> float | None:
    if cur is None or not top:
        return None
    return round(100 * cur / top, 2)


def _meta(agent: str) -> tuple[dict[str, Any] | None, float | int | None]:
    """(agent_meta, context_percent) from the registered provider; a failing provider counts as none."""
    provider = _provider
    meta: dict[str, Any] | None = None
    if provider.meta is not None:
        try:
            meta = provider.meta(agent)
        except Exception as exc:  # the container's code: a snapshot is still taken
            log.warning("snapshot meta provider for %s: %s", agent, exc)
    agent_meta = None if not meta else {k: meta[k] for k in META_KEYS if k in meta}
    context: float | int | None = None
    if provider.sensor is not None:
        try:
            context = provider.sensor(agent)
        except Exception as exc:
            log.warning("snapshot context sensor for %s: %s", agent, exc)
    if context is None and agent_meta is not None:
        pct = agent_meta.get("context_pct")
        if isinstance(pct, int | float) and not isinstance(pct, bool):
            context = pct
    return agent_meta, context


def gather(agent: str, session: str | None = None) -> dict[str, Any]:
    """One snapshot of `agent` (its tmux session `session`, default the agent's name): the container's keys."""
    tmux_count, tmux_names = tmux_sessions()
    total, used, free = memory()
    cur, top = nproc()
    agent_meta, context = _meta(agent)
    claude = claude_pid()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "agent": agent,
        "timestamp": datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "tmux_count": tmux_count,
        "tmux_names": tmux_names,
        "screen_count": screen_count(),
        "claude_procs": proc_count("claude"),
        "bun_procs": proc_count("bun"),
        "node_procs": proc_count("node"),
        "load1": load,
        "mem_total_bytes": total,
        "mem_used_bytes": used,
        "mem_free_bytes": free,
        "nproc_cur": cur,
        "nproc_max": top,
        "fork_pressure_pct": fork_pressure(cur, top),
        "context_percent": context,
        "agent_meta": agent_meta,
        "pids": {
            "container_daemon": os.getpid(),
            "claude_code": claude,
            "tmux": tmux_pids(session or agent) if tmux_count is not None else {"server": None, "pane": None},
            "sidecars": _sidecars_of(agent),
        },
    }
