"""`fleetlog.snapshots.gather` and its probes: fake `tmux`, `screen`, `pgrep` scripts on PATH (present,
absent, answering "no server"), sidecar liveness, the meta provider, and an empty PATH. No broker."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleetlog.services.client.snapshots import gather as probes

from fleetlog import snapshots

KEYS = ["agent", "timestamp", "host", "tmux_count", "tmux_names", "screen_count", "claude_procs", "bun_procs",
        "node_procs", "load1", "mem_total_bytes", "mem_used_bytes", "mem_free_bytes", "nproc_cur", "nproc_max",
        "fork_pressure_pct", "context_percent", "agent_meta", "pids"]


def tool(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!{sys.executable}\nimport sys\nargs = sys.argv[1:]\n{body}\n")
    path.chmod(0o755)


@pytest.fixture
def bin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A PATH holding only the fake tools a test writes."""
    d = tmp_path / "bin"
    d.mkdir()
    monkeypatch.setenv("PATH", str(d))
    yield d


@pytest.fixture(autouse=True)
def no_provider() -> Iterator[None]:
    yield
    snapshots.set_meta_provider(None)
    snapshots.unregister_sidecars("a1")


def test_fake_tools_present(bin_dir: Path) -> None:
    tool(bin_dir, "tmux", """
if args[0] == "list-sessions":
    print("main\\nwork")
elif args[0] == "display-message":
    assert args[args.index("-t") + 1] == "sess-1", args
    print("111 222")
""")
    tool(bin_dir, "screen", """
print("There are screens on:\\n\\t123.pts-0.h\\t(Detached)\\n  456.x\\t(Attached)\\nnot 7.a line\\n2 Sockets in /run.")
sys.exit(1)  # screen -ls exits non-zero even with sessions
""")
    tool(bin_dir, "pgrep", """
if args == ["-n", "-x", "claude"]:
    print("4242\\n4243")
elif args == ["-af", "claude"]:
    print("1 claude\\n2 claude --x\\n3 node claude")
elif args == ["-af", "node"]:
    print("3 node claude")
else:
    sys.exit(1)  # no match: no output
""")
    snap = snapshots.gather("a1", session="sess-1")
    assert list(snap) == KEYS
    assert (snap["tmux_count"], snap["tmux_names"]) == (2, ["main", "work"])
    assert snap["screen_count"] == 2
    assert (snap["claude_procs"], snap["bun_procs"], snap["node_procs"]) == (3, 0, 1)
    assert snap["pids"]["claude_code"] == 4242
    assert snap["pids"]["tmux"] == {"server": 111, "pane": 222}
    assert snap["pids"]["container_daemon"] == os.getpid()


def test_tools_answering_nothing(bin_dir: Path) -> None:
    tool(bin_dir, "tmux", 'print("no server running on /tmp/tmux-0/default", file=sys.stderr); sys.exit(1)')
    tool(bin_dir, "screen", 'print("No Sockets found in /run/screen/S-root.\\n"); sys.exit(1)')
    tool(bin_dir, "pgrep", "sys.exit(1)")
    snap = snapshots.gather("a1")
    assert (snap["tmux_count"], snap["tmux_names"]) == (0, [])
    assert snap["screen_count"] == 0
    assert (snap["claude_procs"], snap["bun_procs"], snap["node_procs"]) == (0, 0, 0)
    assert snap["pids"]["claude_code"] is None
    assert snap["pids"]["tmux"] == {"server": None, "pane": None}


def test_an_empty_path_degrades_every_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    snap = snapshots.gather("a1")
    assert list(snap) == KEYS
    assert (snap["tmux_count"], snap["tmux_names"], snap["screen_count"]) == (None, [], None)
    assert (snap["claude_procs"], snap["bun_procs"], snap["node_procs"]) == (None, None, None)
    assert snap["pids"]["claude_code"] is None and snap["pids"]["tmux"] == {"server": None, "pane": None}
    assert snap["agent"] == "a1" and snap["agent_meta"] is None and snap["context_percent"] is None


def test_memory_nproc_and_timestamp() -> None:
    snap = snapshots.gather("a1")
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    assert snap["mem_total_bytes"] == int(meminfo["MemTotal"].split()[0]) * 1024  # bytes, not kB or MB
    assert snap["mem_used_bytes"] == snap["mem_total_bytes"] - snap["mem_free_bytes"]
    assert snap["nproc_max"] == int(Path("/proc/sys/kernel/pid_max").read_text())
    assert snap["fork_pressure_pct"] == round(100 * snap["nproc_cur"] / snap["nproc_max"], 2)
    ts = snap["timestamp"]  # local time, seconds precision, with an offset: 2026-01-01T09:00:00+09:00
    assert len(ts) == 25 and ts[10] == "T" and ts[19] in "+-" and "." not in ts


@pytest.mark.parametrize("cur, top, pct", [(None, 10, None), (5, 0, None), (5, None, None), (1, 3, 33.33)])
def test_fork_pressure(cur: int | None, top: int | None, pct: float | None) -> None:
    assert probes.fork_pressure(cur, top) == pct


def test_meta_provider_whitelist_and_context_percent() -> None:
    meta = {"alive": True, "model": "m", "context_pct": 41.5, "secret": "x", "recent_actions": ["a"]}
    snapshots.set_meta_provider(lambda agent: meta if agent == "a1" else None)
    snap = snapshots.gather("a1")
    assert snap["agent_meta"] == {"alive": True, "context_pct": 41.5, "model": "m", "recent_actions": ["a"]}
    assert snap["context_percent"] == 41.5  # no sensor: the metadata's number
    snapshots.set_meta_provider(lambda agent: meta, context_sensor=lambda agent: 77)
    assert snapshots.gather("a1")["context_percent"] == 77  # the sensor wins
    snapshots.set_meta_provider(lambda agent: {"context_pct": "high"})
    assert snapshots.gather("a1")["context_percent"] is None  # not a number
    for empty in (None, {}):
        snapshots.set_meta_provider(lambda agent, empty=empty: empty)
        assert snapshots.gather("a1")["agent_meta"] is None

    def broken(agent: str) -> dict[str, object]:
        raise RuntimeError("provider down")

    snapshots.set_meta_provider(broken)
    assert snapshots.gather("a1")["agent_meta"] is None  # a failing provider: still a snapshot


def test_sidecars() -> None:
    stop = threading.Event()
    live = threading.Thread(target=stop.wait)
    live.start()
    dead = threading.Thread(target=lambda: None)
    dead.start()
    dead.join()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    try:
        snapshots.register_sidecar("a1", "thread", "watcher", thread=live)
        snapshots.register_sidecar("a1", "thread", "finished", thread=dead)
        snapshots.register_sidecar("a1", "thread", "never", thread=None)
        snapshots.register_sidecar("a1", "process", "me", pid=os.getpid())
        snapshots.register_sidecar("a1", "process", "gone", pid=gone.pid)
        snapshots.register_sidecar("a1", "process", "nopid")
        snapshots.register_sidecar("a1", "daemon", "odd", pid=os.getpid())
        sidecars = snapshots.gather("a1")["pids"]["sidecars"]
    finally:
        stop.set()
        live.join()
    assert sidecars == {
        "watcher": {"pid": None, "kind": "thread", "alive": True},
        "finished": {"pid": None, "kind": "thread", "alive": False},
        "never": {"pid": None, "kind": "thread", "alive": False},
        "me": {"pid": os.getpid(), "kind": "process", "alive": True},
        "gone": {"pid": gone.pid, "kind": "process", "alive": False},
        "nopid": {"pid": None, "kind": "process", "alive": False},
        "odd": {"pid": os.getpid(), "kind": "daemon", "alive": False},  # unknown kind
    }


def test_process_liveness_errors() -> None:
    # pid 1 (init) exists: as a normal user signal 0 raises PermissionError (alive), as root it succeeds.
    assert probes.sidecar_alive("process", 1, None) is True
    assert probes.sidecar_alive("process", 2**40, None) is False  # a pid no process can have


@pytest.mark.parametrize("error, alive", [(PermissionError(1, "not permitted"), True),
                                          (ProcessLookupError(3, "no such process"), False),
                                          (OSError(22, "invalid argument"), False)])
def test_process_liveness_by_error(monkeypatch: pytest.MonkeyPatch, error: OSError, alive: bool) -> None:
    # These tests run as root here, where signal 0 never fails with EPERM: the errors are raised
    # by a stand-in for os.kill (the OS call, not NATS or DuckDB).
    def kill(pid: int, sig: int) -> None:
        raise error

    monkeypatch.setattr(os, "kill", kill)
    assert probes.sidecar_alive("process", 12345, None) is alive
