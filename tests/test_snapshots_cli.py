"""`fleetlog snapshots ...` as real subprocesses against the fixture server (real nats-server, real
DuckDB): gather, take, the reads, tick and daemon with a hooks file, `watch --exec` SIGKILLed and
restarted without losing or repeating a diff it had acknowledged, and ten processes taking at once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fleetlog.schemas import subjects
from fleetlog.services.client.snapshots import watch
from fleetlog.services.node.server import Server

from fleetlog import Fleet

from .helpers import cli_json, cli_runner, die_with_parent, fleetlog_cmd, wait_until
from .test_snapshots_api import check_chain, stored
from .test_snapshots_gather import KEYS


def start(nats_url: str, tmp_path: Path, name: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "FLEETLOG_DATA_DIR": str(tmp_path / f"cli-{name}"), "NO_COLOR": "1"}
    return subprocess.Popen([*fleetlog_cmd(), *args, "--nats", nats_url], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=die_with_parent())


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


async def test_gather_take_and_reads(fleet: Fleet, server: Server, tmp_path: Path) -> None:
    run = cli_runner(fleet.settings.nats_url, tmp_path)
    gathered = cli_json(await run("snapshots", "gather", "--agent", "c1", "--json", nats=False))
    assert list(gathered) == KEYS and gathered["agent"] == "c1"
    first = cli_json(await run("snapshots", "take", "--agent", "c1", "--host", "web-1", "--data",
                               '{"timestamp": "t1", "v": 1, "pids": {"tmux": {"pane": 5}}}', "--json"))
    assert first == {"timestamp": "t1", "v": 1, "pids": {"tmux": {"pane": 5}}, "has_diff": False, "diff_fields": []}
    second = cli_json(await run("snapshots", "take", "--agent", "c1", "--host", "web-1", "--data",
                                '{"timestamp": "t2", "v": 2, "pids": {"tmux": {"pane": 6}}}', "--json"))
    assert second["has_diff"] is True and second["diff_fields"] == ["pids.tmux.pane", "v"]
    gathered_take = cli_json(await run("snapshots", "take", "--agent", "c2", "--json"))
    assert list(gathered_take) == [*KEYS, "has_diff", "diff_fields"]

    latest = cli_json(await run("snapshots", "latest", "--agent", "c1", "--host", "web-1", "--json"))
    prev = cli_json(await run("snapshots", "prev", "--agent", "c1", "--host", "web-1", "--json"))
    assert (latest, prev) == (second, first)
    assert latest == await fleet.snapshots.latest("c1", "web-1")
    status = cli_json(await run("snapshots", "status", "--agent", "c1", "--host", "web-1", "--json"))
    assert status == {"snapshot": second, "hooks_configured": {"on_diff": 0}}
    diffs = cli_json(await run("snapshots", "diffs", "--agent", "c1", "--json"))
    assert [(d["timestamp"], d["diff_fields"], d["changes"]) for d in diffs["items"]] == [
        ("t2", ["pids.tmux.pane", "v"], {"pids.tmux.pane": {"from": 5, "to": 6}, "v": {"from": 1, "to": 2}})]
    history = cli_json(await run("snapshots", "history", "--agent", "c1", "--host", "web-1", "--json"))
    assert [i["data"]["v"] for i in history["items"]] == [2, 1]
    everyone = cli_json(await run("snapshots", "all", "--json"))
    assert {(i["host"], i["agent"]) for i in everyone["items"]} >= {("web-1", "c1")}
    bad = await run("snapshots", "take", "--agent", "c1", "--data", "[1]")
    assert bad.returncode == 2 and "must be a JSON object" in bad.stderr


HOOK = """import os, sys
with open(sys.argv[1], "a") as f:
    f.write(os.environ["SCITEX_HOOK_CTX_TIMESTAMP"] + " " + os.environ["SCITEX_HOOK_CTX_DIFF_FIELDS"] + "\\n")
"""


def hook(tmp_path: Path) -> tuple[str, Path]:
    script, out = tmp_path / "hook.py", tmp_path / "hook.log"
    script.write_text(HOOK)
    return f"{sys.executable} {script} {out}", out


def hook_lines(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines()] if path.exists() else []


async def test_tick_and_daemon_with_a_hooks_file(fleet: Fleet, server: Server, tmp_path: Path) -> None:
    command, out = hook(tmp_path)
    hooks_json = tmp_path / "hooks.json"
    hooks_json.write_text(json.dumps({"hooks": {"on_diff": [command]}}))
    run = cli_runner(fleet.settings.nats_url, tmp_path)
    ticked = cli_json(await run("snapshots", "tick", "--agent", "tk", "--host", "h", "--hooks", str(hooks_json),
                                "--json"))
    assert ticked["agent"] == "tk" and ticked["has_diff"] is False
    hooks_yaml = tmp_path / "hooks.yaml"
    hooks_yaml.write_text(f"hooks:\n  on_diff:\n    - {command}\n")
    status = cli_json(await run("snapshots", "status", "--agent", "tk", "--host", "h", "--hooks", str(hooks_yaml),
                                "--json"))
    assert status["hooks_configured"] == {"on_diff": 1} and command not in json.dumps(status)
    # The daemon ticks until SIGTERM; a snapshot that differs from the tick above (its pid
    # changes: pids.container_daemon) fires the hook from the daemon's pool.
    daemon = start(fleet.settings.nats_url, tmp_path, "daemon", "snapshots", "daemon", "--agent", "tk", "--host",
                   "h", "--every", "0.2", "--hooks", str(hooks_yaml))
    try:
        async def two_more() -> bool:
            return len((await fleet.snapshots.history("tk", "h")).items) >= 3 and bool(hook_lines(out))

        await wait_until(two_more, timeout_s=60)
    finally:
        code, err = stop(daemon)
    assert code == 0 and "stopped after" in err
    diffed = [i for i in (await fleet.snapshots.history("tk", "h", limit=100)).items if i.has_diff]
    assert "pids.container_daemon" in diffed[-1].diff_fields
    assert len(hook_lines(out)) >= 1


async def test_watch_exec_killed_and_restarted(fleet: Fleet, server: Server, tmp_path: Path) -> None:
    command, out = hook(tmp_path)
    for i in range(5):  # four diffs: t1..t4
        await fleet.snapshots.take("w", {"timestamp": f"t{i}", "n": i}, host="h")
    args = ("snapshots", "watch", "--agent", "w", "--host", "h", "--exec", command, "--after", "0",
            "--durable", "watch-test")
    watcher = start(fleet.settings.nats_url, tmp_path, "w1", *args)
    try:
        async def some_handled() -> bool:
            return len(hook_lines(out)) >= 2

        await wait_until(some_handled, timeout_s=60)
    finally:
        stop(watcher, signal.SIGKILL)
    js = (await fleet.nats()).jetstream()
    acked_floor = (await js.consumer_info("FLEET_DIFFS", "watch-test")).ack_floor.stream_seq
    for i in range(5, 7):  # two more while it is down: t5, t6
        await fleet.snapshots.take("w", {"timestamp": f"t{i}", "n": i}, host="h")
    watcher = start(fleet.settings.nats_url, tmp_path, "w2", *args)
    try:
        async def all_handled() -> bool:
            return "t6" in hook_lines(out)

        await wait_until(all_handled, timeout_s=60)
    finally:
        stop(watcher, signal.SIGKILL)
    page = await fleet.snapshots.diffs(min_seq=await fleet.flush())
    seqs: dict[str | None, Any] = {d.timestamp: d.seq for d in page.items}
    handled = hook_lines(out)
    expected = [f"t{i}" for i in range(1, 7)]
    assert list(dict.fromkeys(handled)) == expected  # nothing lost, in order
    acked = [t for t in expected if seqs[t] <= acked_floor]
    assert acked and all(handled.count(t) == 1 for t in acked)  # an acknowledged diff never runs again
    print(f"\n[watch --exec] SIGKILL after {len(acked)} acked; hook runs {handled}")


async def test_ten_processes_take_one_agent_at_once(fleet: Fleet, server: Server, tmp_path: Path) -> None:
    procs = [start(fleet.settings.nats_url, tmp_path, f"p{i}", "snapshots", "take", "--agent", "procs", "--host",
                   "h", "--data", json.dumps({"n": i, f"k{i}": True}), "--json") for i in range(10)]
    printed = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        printed.append(json.loads(out))
    chain = await stored(fleet, "FLEET_SNAPSHOTS", subjects.snapshot("h", "procs"))
    check_chain(chain, 10)  # each diffed against the snapshot stored right before it
    assert sorted((p["n"], p["diff_fields"]) for p in printed) == sorted(
        (e["data"]["n"], e["diff_fields"]) for _, e in chain)
    assert len(await stored(fleet, "FLEET_DIFFS", subjects.diff("h", "procs"))) == 9


async def test_two_watchers_on_one_durable_run_each_slow_hook_once_in_order(
        fleet: Fleet, server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two watchers share a durable; each hook outlasts the ack wait. One diff is out at a time
    and the one running says it is still at work (`in_progress`), so neither runs a diff the
    other holds, and the diffs run in order. Before: the second took t2 at once, and t1 went
    to it again when its ack wait ran out mid-hook."""
    monkeypatch.setattr(watch, "ACK_WAIT_S", 1.0)
    script, out = tmp_path / "slow_hook.py", tmp_path / "slow_hook.log"
    script.write_text("import time\ntime.sleep(2.5)\n" + HOOK)
    for i in range(3):  # two diffs: t1, t2
        await fleet.snapshots.take("slow", {"timestamp": f"t{i}", "n": i}, host="h")
    await fleet.flush()
    nc = await fleet.nats()
    command = [f"{sys.executable} {script} {out}"]
    subject = watch.diff_subject("h", "slow")
    await watch.serve_hooks(nc, subject, [], durable="slow-hooks", after_seq=0, count=0)  # the durable, at the start
    watchers = [asyncio.create_task(watch.serve_hooks(nc, subject, command, durable="slow-hooks")) for _ in range(2)]
    try:
        async def both_ran() -> bool:
            return len(hook_lines(out)) >= 2

        await wait_until(both_ran, timeout_s=60)
        await asyncio.sleep(3.5)  # a redelivered diff would have run again by now (ack wait 1 s, hook 2.5 s)
    finally:
        for w in watchers:
            w.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
    assert hook_lines(out) == ["t1", "t2"]  # each once, in order
