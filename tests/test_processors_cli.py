"""Session processors through `fleetlog processors ...`, run as real subprocesses against the
fixture server (real nats-server, real DuckDB). The processor comes from a real
`fleetlog.processors` entry point: a dist-info on the subprocesses' PYTHONPATH."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import pytest
from fleetlog.services.client.processors.files import compute_file_hash
from fleetlog.services.node.broker import die_with_parent
from fleetlog.services.node.server import Server

from fleetlog import Fleet

from .helpers import cli_json, cli_runner, fleetlog_cmd

PLUGIN = '''
from pathlib import Path

from fleetlog import ProcessorResult


class Count:
    name = "count"
    cadence_minutes = 10

    def process_session(self, session_path, username, session_key, **kwargs):
        if "bad" in session_key:
            raise ValueError("bad session")
        return ProcessorResult(items_count=len(Path(session_path).read_text().splitlines()))
'''


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = tmp_path / "site"
    (site / "cliproc-1.0.dist-info").mkdir(parents=True)
    (site / "cliproc.py").write_text(PLUGIN)
    (site / "cliproc-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: cliproc\nVersion: 1.0\n")
    (site / "cliproc-1.0.dist-info" / "entry_points.txt").write_text("[fleetlog.processors]\ncount = cliproc:Count\n")
    monkeypatch.setenv("PYTHONPATH", str(site))
    return site


def _sessions(root: Path, spec: dict[str, int]) -> None:
    for key, n in spec.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_text("{}\n" * n)


async def test_processors_run_exit_codes(fleet: Fleet, server: Server, plugin: Path, tmp_path: Path) -> None:
    run = cli_runner(fleet.settings.nats_url, tmp_path)
    sessions = tmp_path / "sessions"
    _sessions(sessions, {"ann/a.jsonl": 2, "ann/b.jsonl": 1, "ann/c.jsonl": 3})  # one dir: a known order
    names = cli_json(await run("processors", "names", "--json", nats=False))
    assert "count" in names

    ok = await run("processors", "run", "count", "--sessions", str(sessions), "--max", "2", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == {"processor": "count", "scanned": 3, "processed": 2, "skipped": 0, "capped": 1,
                                     "errors": 0, "items_extracted": 3, "errors_detail": []}
    _sessions(sessions, {"bob/bad.jsonl": 1})
    errors = await run("processors", "run", "count", "--sessions", str(sessions), "--json")
    assert errors.returncode == 1
    got = json.loads(errors.stdout)
    assert (got["processed"], got["errors"]) == (1, 1)
    assert got["errors_detail"] == [{"session": "bob/bad.jsonl", "error": "ValueError: bad session"}]

    unknown = await run("processors", "run", "nope", "--sessions", str(sessions))
    assert unknown.returncode == 2 and "Unknown processor 'nope'. Known: count" in unknown.stderr

    lock = await fleet.processors.acquire("count", "someone-else", lease_s=60)
    assert lock is not None
    busy = await run("processors", "run", "count", "--sessions", str(sessions))
    assert busy.returncode == 75 and "already running" in busy.stderr
    assert await fleet.processors.release(lock)

    human = await run("processors", "runs", "count")
    assert human.returncode == 0 and "count" in human.stdout
    records = cli_json(await run("processors", "runs", "count", "--json"))
    assert [r["ok"] for r in records["items"]] == [False, True]  # the busy run left no record: it never ran


async def test_processors_serve_answers_run_requests(fleet: Fleet, server: Server, plugin: Path,
                                                     tmp_path: Path) -> None:
    run = cli_runner(fleet.settings.nats_url, tmp_path)
    sessions = tmp_path / "sessions"
    _sessions(sessions, {"ann/a.jsonl": 2, "bob/c.jsonl": 3})
    env = {**os.environ, "FLEETLOG_DATA_DIR": str(tmp_path / "serve")}
    serve = await asyncio.create_subprocess_exec(
        *fleetlog_cmd(), "processors", "serve", "--sessions", str(sessions), "--nats", fleet.settings.nats_url,
        env=env, stderr=asyncio.subprocess.PIPE, preexec_fn=die_with_parent())  # dies with pytest
    try:
        assert serve.stderr is not None
        line = (await serve.stderr.readline()).decode()  # printed once the endpoint is subscribed
        assert "serving processors.run" in line and "count" in line
        remote = await run("processors", "run", "count", "--json")  # no --sessions: the serving machine runs it
        assert remote.returncode == 0, remote.stderr
        assert (json.loads(remote.stdout)["processed"], json.loads(remote.stdout)["items_extracted"]) == (2, 5)
        unknown = await run("processors", "run", "nope")
        assert unknown.returncode == 2 and "Unknown processor 'nope'. Known: count" in unknown.stderr
        lock = await fleet.processors.acquire("count", "someone-else", lease_s=60)
        assert lock is not None
        busy = await run("processors", "run", "count")
        assert busy.returncode == 75 and "already running" in busy.stderr
        assert await fleet.processors.release(lock)
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(serve.wait(), 30)
        finally:
            if serve.returncode is None:
                serve.kill()
                await serve.wait()


async def test_processors_bookkeeping_commands(fleet: Fleet, server: Server, tmp_path: Path) -> None:
    run = cli_runner(fleet.settings.nats_url, tmp_path)
    sessions = tmp_path / "sessions"
    _sessions(sessions, {"ann/a.jsonl": 2, "ann/b.jsonl": 1})
    a = sessions / "ann" / "a.jsonl"
    hashed = await run("processors", "hash", str(a), nats=False)
    assert hashed.returncode == 0 and hashed.stdout.strip() == compute_file_hash(a)

    marked = cli_json(await run("processors", "mark", "ext", "ann/a.jsonl", "--username", "ann", "--items", "2",
                                "--file", str(a), "--json"))
    assert marked["file_hash"] == compute_file_hash(a) and marked["token"]["FLEET_PROCESSORS"] > 0
    await fleet.processors.processed_session_files("ext", min_seq=marked["token"])
    scanned = cli_json(await run("processors", "scan", "ext", "--sessions", str(sessions), "--json"))
    assert scanned == [{"username": "ann", "path": str(sessions / "ann" / "b.jsonl")}]
    state = cli_json(await run("processors", "state", "ext", "ann/a.jsonl", "--json"))
    assert state["ann/a.jsonl"]["items_extracted"] == 2 and state["ann/a.jsonl"]["username"] == "ann"
    missing = await run("processors", "state", "ext", "ann/a.jsonl", "ann/zzz.jsonl", "--json")
    assert missing.returncode == 3 and "ann/zzz.jsonl" in missing.stderr
    bad = await run("processors", "mark", "ext", "ann/a.jsonl", "--username", "ann", "--items", "-1", "--hash", "h")
    assert bad.returncode == 2 and "items_count" in bad.stderr

    listed = cli_json(await run("processors", "list", "--json"))
    (summary,) = listed["items"]
    assert (summary["processor"], summary["sessions"], summary["items_extracted"]) == ("ext", 1, 2)
    deleted = cli_json(await run("processors", "delete", "ext", "--yes", "--json"))
    assert deleted == {"deleted": 1}

    lock = cli_json(await run("processors", "acquire", "ext", "--holder", "cli-1", "--lease", "60", "--json"))
    assert lock["holder"] == "cli-1" and lock["fence"] > 0
    busy = await run("processors", "acquire", "ext", "--holder", "cli-2", "--json")
    assert busy.returncode == 4 and json.loads(busy.stdout) is None and "lock busy" in busy.stderr
    state_lock = cli_json(await run("processors", "lock", "ext", "--json"))
    assert (state_lock["holder"], state_lock["fence"], state_lock["held"]) == ("cli-1", lock["fence"], True)
    wrong = await run("processors", "release", "ext", "--holder", "cli-2", "--fence", str(lock["fence"]), "--json")
    assert wrong.returncode == 4 and json.loads(wrong.stdout) == {"released": False}
    released = cli_json(await run("processors", "release", "ext", "--holder", "cli-1", "--fence",
                                  str(lock["fence"]), "--json"))
    assert released == {"released": True}
    human = await run("processors", "list")
    assert human.returncode == 0 and "ext" in human.stdout
