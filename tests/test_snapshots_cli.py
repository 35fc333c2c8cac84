"""Host snapshots through `fleetlog snapshots ...`, run as real subprocesses against the fixture
server (real nats-server, real DuckDB). `--json` output has exactly the Python API's keys."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import msgspec
from fleetlog.services.node.server import Server
from fleetlog.services.reactors.snapshot_differ import SnapshotDiffer

from fleetlog import Fleet

from .helpers import cli_json, cli_runner


async def test_snapshots_cli(fleet: Fleet, server: Server, tmp_path: Path) -> None:
    run = cli_runner(fleet.settings.nats_url, tmp_path)
    first = cli_json(await run("snapshots", "take", "--agent", "cfg", "--host", "web-1", "--data",
                               '{"v": 1, "disk": {"free": 10}}', "--json"))
    second = cli_json(await run("snapshots", "take", "--agent", "cfg", "--host", "web-1", "--data",
                                '{"v": 2, "disk": {"free": 10}}', "--json"))
    assert second["seq"] > first["seq"] and second["token"]["FLEET_SNAPSHOTS"] == second["seq"]
    collected = cli_json(await run("snapshots", "collect", "--count", "2", "--every", "0.1", "--json"))
    assert collected["taken"] == 2

    token = {"FLEET_SNAPSHOTS": collected["seq"]}
    api_latest = await fleet.snapshots.latest(min_seq=token)
    latest = cli_json(await run("snapshots", "latest", "--json"))
    assert latest == json.loads(msgspec.json.encode(api_latest)) | {"as_of": latest["as_of"], "lag": latest["lag"],
                                                                   "lag_s": latest["lag_s"]}
    mine = next(i for i in latest["items"] if i["host"] == socket.gethostname())
    assert mine["agent"] == "collector" and mine["data"]["cpu"]["count"] >= 1 and "free_gb" in mine["data"]["disk"]

    history = cli_json(await run("snapshots", "history", "web-1", "cfg", "--limit", "1", "--json"))
    assert [i["data"]["v"] for i in history["items"]] == [2] and history["next_cursor"] == second["seq"]
    older = cli_json(await run("snapshots", "history", "web-1", "cfg", "--before", str(second["seq"]), "--json"))
    assert [i["seq"] for i in older["items"]] == [first["seq"]]
    shown = cli_json(await run("snapshots", "show", "web-1", "cfg", "--seq", str(first["seq"]), "--json"))
    assert shown["data"] == {"v": 1, "disk": {"free": 10}} and set(shown) == set(history["items"][0])
    nobody = await run("snapshots", "show", "web-1", "nobody", "--json")
    assert nobody.returncode == 3 and json.loads(nobody.stdout) is None
    assert "no snapshot of web-1 / nobody" in nobody.stderr
    diff = cli_json(await run("snapshots", "diff", "web-1", "cfg", "--json"))
    assert (diff["from_seq"], diff["to_seq"], diff["changed"]) == (first["seq"], second["seq"],
                                                                   {"/v": {"from": 1, "to": 2}})

    differ = SnapshotDiffer(server.nc)
    while await differ.run_once(timeout=0.5):
        pass
    await differ.stop()
    diffs_seq = (await (await fleet.nats()).jetstream().stream_info("FLEET_DIFFS")).state.last_seq
    await fleet.snapshots.diffs(min_seq={"FLEET_DIFFS": diffs_seq})
    diffs = cli_json(await run("snapshots", "diffs", "--host", "web-1", "--json"))
    assert [d["to_seq"] for d in diffs["items"]] == [first["seq"], second["seq"]]
    assert diffs["items"][1]["changed"] == {"/v": {"from": 1, "to": 2}}
    watched = await run("snapshots", "watch", "--host", "web-1", "--after", "0", "--count", "2", "--json")
    assert watched.returncode == 0, watched.stderr
    lines = [json.loads(line) for line in watched.stdout.splitlines()]
    assert [(d["seq"], d["to_seq"]) for d in lines] == [(d["seq"], d["to_seq"]) for d in diffs["items"]]

    human = await run("snapshots", "latest")
    assert human.returncode == 0 and "web-1" in human.stdout
    bad = await run("snapshots", "take", "--agent", "cfg", "--data", "[1, 2]")
    assert bad.returncode == 2 and "must be a JSON object" in bad.stderr
    empty = await run("snapshots", "take", "--agent", "", "--data", "{}")
    assert empty.returncode == 2 and "agent" in empty.stderr
