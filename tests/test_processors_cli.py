"""Processor bookkeeping through `fleetlog processors ...`, run as real subprocesses against the
fixture server (real nats-server, real DuckDB)."""

from __future__ import annotations

import json
from pathlib import Path

from fleetlog.services.client.processors import hash_file, path_hash
from fleetlog.services.node.server import Server

from fleetlog import Fleet

from .helpers import cli_json, cli_runner


async def test_processors_cli(fleet: Fleet, server: Server, tmp_path: Path) -> None:
    run = cli_runner(fleet.settings.nats_url, tmp_path)
    data = tmp_path / "in.csv"
    data.write_text("a,b\n")
    hashed = await run("processors", "hash", str(data), nats=False)
    assert hashed.returncode == 0 and hashed.stdout.strip() == hash_file(data)

    marked = cli_json(await run("processors", "mark", "ingest", str(data), "done", "--content-hash", "--size", "4",
                                "--detail", '{"rows": 1}', "--run", "r1", "--json"))
    assert marked["file_hash"] == hash_file(data) and marked["seq"] == marked["token"]["FLEET_PROCESSORS"]
    by_path = cli_json(await run("processors", "mark", "ingest", "/data/x.csv", "failed", "--json"))
    assert by_path["file_hash"] == path_hash("/data/x.csv")
    await fleet.processors.files("ingest", min_seq=by_path["token"])

    one = cli_json(await run("processors", "file", "ingest", marked["file_hash"], "--json"))
    assert (one["status"], one["size"], one["detail"], one["run_id"]) == ("done", 4, {"rows": 1}, "r1")
    nope = await run("processors", "file", "ingest", "nope", "--json")
    assert nope.returncode == 3 and json.loads(nope.stdout) is None and "no marker for nope" in nope.stderr
    files = cli_json(await run("processors", "files", "ingest", "--status", "failed", "--json"))
    assert [i["file_path"] for i in files["items"]] == ["/data/x.csv"] and files["total_count"] == 1
    seen = await run("processors", "seen", "ingest", marked["file_hash"], "unknown", "--json")
    assert seen.returncode == 3 and "unknown" in seen.stderr  # not every hash was seen
    assert json.loads(seen.stdout) == {marked["file_hash"]: "done"}

    started = cli_json(await run("processors", "start", "ingest", "--run-id", "r1", "--total", "2", "--json"))
    assert (started["run_id"], started["status"], started["files_total"]) == ("r1", "running", 2)
    finished = cli_json(await run("processors", "finish", "ingest", "r1", "--ok", "1", "--failed", "1", "--json"))
    assert (finished["status"], finished["files_ok"], finished["files_failed"]) == ("completed", 1, 1)
    conflict = await run("processors", "finish", "ingest", "r1", "--status", "failed")
    assert conflict.returncode == 4 and "already completed" in conflict.stderr
    unknown = await run("processors", "finish", "ingest", "nope", "--json")
    assert unknown.returncode == 3 and json.loads(unknown.stdout) is None
    shown = cli_json(await run("processors", "run", "ingest", "r1", "--json"))
    assert shown == finished
    runs = cli_json(await run("processors", "runs", "ingest", "--json"))
    assert [r["run_id"] for r in runs["items"]] == ["r1"]

    lock = cli_json(await run("processors", "acquire", "ingest", "--holder", "cli-1", "--lease", "60", "--json"))
    assert lock["holder"] == "cli-1" and lock["fence"] > 0
    busy = await run("processors", "acquire", "ingest", "--holder", "cli-2", "--json")
    assert busy.returncode == 4 and json.loads(busy.stdout) is None and "lock busy" in busy.stderr
    state = cli_json(await run("processors", "lock", "ingest", "--json"))
    assert (state["holder"], state["fence"], state["held"]) == ("cli-1", lock["fence"], True)
    listed = cli_json(await run("processors", "list", "--json"))
    (summary,) = listed["items"]
    assert (summary["files"], summary["runs"], summary["lock_holder"]) == ({"done": 1, "failed": 1}, 1, "cli-1")
    wrong = await run("processors", "release", "ingest", "--holder", "cli-2", "--fence", str(lock["fence"]), "--json")
    assert wrong.returncode == 4 and json.loads(wrong.stdout) == {"released": False}
    released = cli_json(await run("processors", "release", "ingest", "--holder", "cli-1", "--fence",
                                  str(lock["fence"]), "--json"))
    assert released == {"released": True}
    human = await run("processors", "list")
    assert human.returncode == 0 and "ingest" in human.stdout
