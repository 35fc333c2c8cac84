"""The run ledger and runtime registry through the `fleetlog` CLI (real subprocesses, real broker).

`--json` prints exactly the keys of the Python API's results.
"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
from fleetlog.schemas.runs import Claim, RunEventPage, RunEventView, RunPage, RunStats, RunView
from fleetlog.schemas.runtimes import RuntimeList, RuntimeView
from fleetlog.services.node.server import Server

from fleetlog import Fleet, FleetSettings

from .helpers import CliRun, cli_json, cli_runner


@pytest.fixture
def cli(settings: FleetSettings, server: Server, tmp_path: Path) -> CliRun:
    return cli_runner(settings.nats_url, tmp_path)


def keys(struct: type[msgspec.Struct]) -> set[str]:
    return set(struct.__struct_fields__)


async def test_run_lifecycle_through_the_cli(cli: CliRun, fleet: Fleet) -> None:
    bad = await cli("runs", "create", "r1", "--runner", "x", "--status", "bogus")
    assert bad.returncode == 2 and "bogus" in bad.stderr
    created = cli_json(await cli("runs", "create", "r1", "--runner", "runner-a", "--status", "queued",
                                 "--priority", "3", "--metadata", '{"k": 1}', "--json"))
    assert set(created) == keys(RunView) and created["status"] == "queued" and created["metadata"] == {"k": 1}
    bad_json = await cli("runs", "create", "r2", "--runner", "x", "--metadata", "{nope")
    assert bad_json.returncode == 2 and "not valid JSON" in bad_json.stderr

    claim = cli_json(await cli("runs", "claim", "--runtime", "rt-1", "--lease", "30", "--json"))
    assert set(claim) == keys(Claim) and claim["run"]["run_id"] == "r1" and claim["fence"] > 0
    token, fence = claim["claim_token"], claim["fence"]
    nothing = await cli("runs", "claim", "--runtime", "rt-2", "--json")
    assert nothing.returncode == 3 and json.loads(nothing.stdout) is None
    human = await cli("runs", "claim", "--runtime", "rt-2")
    assert human.returncode == 3 and "nothing to claim" in human.stderr and human.stdout == ""

    shown = cli_json(await cli("runs", "show", "r1", "--json"))
    assert shown["claimed_by"] == "rt-1" and token not in json.dumps(shown)
    renewed = cli_json(await cli("runs", "renew", "r1", "--token", token, "--lease", "60", "--json"))
    assert renewed["run_id"] == "r1" and renewed["cancel_requested_at"] is None
    wrong = await cli("runs", "renew", "r1", "--token", "wrong", "--json")
    assert wrong.returncode == 4 and json.loads(wrong.stdout) is None and "not renewed" in wrong.stderr

    refused = await cli("runs", "append", "r1", "1", "message", "--data", '{"t": "x"}')
    assert refused.returncode == 4 and "only the holder" in refused.stderr
    event = cli_json(await cli("runs", "append", "r1", "1", "message", "--data", '{"t": "hi"}', "--fence",
                               str(fence), "--json"))
    assert set(event) == keys(RunEventView) and event["data"] == {"t": "hi"} and event["fence"] == fence
    dup = cli_json(await cli("runs", "append", "r1", "1", "message", "--data", '{"t": "again"}', "--token", token,
                             "--json"))
    assert dup["data"] == {"t": "hi"}

    cancelled = cli_json(await cli("runs", "cancel", "r1", "--reason", "op", "--json"))
    assert cancelled["cancel_requested_at"] is not None and cancelled["status"] == "claimed"
    events = cli_json(await cli("runs", "events", "r1", "--json"))
    assert set(events) == keys(RunEventPage) | {"as_of", "lag"}
    assert [(e["sequence"], e["type"]) for e in events["items"]] == [(1, "message"), (2, "admin.run_cancel")]
    backward = cli_json(await cli("runs", "events", "r1", "--backward", "--limit", "1", "--json"))
    assert [e["sequence"] for e in backward["items"]] == [2] and backward["has_more"]

    stale = await cli("runs", "finalize", "r1", "completed", "--token", "stale-token")
    assert stale.returncode == 4 and "stale claim" in stale.stderr
    done = cli_json(await cli("runs", "finalize", "r1", "cancelled", "--token", token, "--reason", "asked",
                              "--json"))
    assert done["status"] == "cancelled" and done["finished_at"] is not None and done["claimed_by"] is None
    terminal = await cli("runs", "finalize", "r1", "completed")
    assert terminal.returncode == 4 and "Cannot transition terminal run" in terminal.stderr
    ghost = await cli("runs", "finalize", "ghost", "completed", "--json")
    assert ghost.returncode == 3 and json.loads(ghost.stdout) is None and "no such run" in ghost.stderr


async def test_release_list_stats_sweep(cli: CliRun, fleet: Fleet) -> None:
    for i in range(3):
        await fleet.runs.create(f"r{i}", "runner-a", status="queued", conversation_id="c")
    claim = await fleet.runs.claim_next("rt-1", lease_s=300)  # the CLI release below must find it live
    assert claim is not None
    released = cli_json(await cli("runs", "release", claim.run.run_id, "--token", claim.claim_token,
                                  "--status", "failed", "--reason", "boom", "--json"))
    assert released["status"] == "failed" and released["reason"] == "boom"

    page = cli_json(await cli("runs", "list", "--conversation", "c", "--limit", "2", "--json"))
    assert set(page) == keys(RunPage) | {"as_of", "lag"}
    assert page["total_count"] == 3 and page["has_more"] and len(page["items"]) == 2
    rest = cli_json(await cli("runs", "list", "--conversation", "c", "--before", page["next_cursor"], "--json"))
    assert len(rest["items"]) == 1 and not rest["has_more"]
    failed = cli_json(await cli("runs", "list", "--status", "failed", "--status", "completed", "--json"))
    assert [r["run_id"] for r in failed["items"]] == [claim.run.run_id]
    table = await cli("runs", "list", "--conversation", "c")
    assert table.returncode == 0 and "of 3" in table.stdout

    stats = cli_json(await cli("runs", "stats", "--since", "1h", "--json"))
    assert set(stats) == keys(RunStats) | {"as_of", "lag"}
    assert stats["total"] == 3 and stats["by_status"] == {"failed": 1, "queued": 2}
    assert stats["runners"][0]["success_rate"] == 0.0

    held = await fleet.runs.claim_next("rt-2", lease_s=1)
    assert held is not None
    fleet.runs.clock = lambda: 4_000_000_000.0  # far past every lease
    swept = await fleet.runs.release_expired()
    assert [r.run_id for r in swept] == [held.run.run_id]
    again = cli_json(await cli("runs", "sweep", "--json"))
    assert again == []


async def test_runtimes_through_the_cli(cli: CliRun, fleet: Fleet) -> None:
    reg = cli_json(await cli("runtimes", "register", "rt-1", "--name", "one", "--capability", "py",
                             "--capability", "gpu", "--label", "zone=a", "--metadata", '{"a": 1}',
                             "--deadline", "30", "--json"))
    assert set(reg) == keys(RuntimeView) and reg["capabilities"] == ["py", "gpu"] and reg["labels"] == {"zone": "a"}
    bad = await cli("runtimes", "register", "rt-2", "--label", "novalue")
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr
    hb = cli_json(await cli("runtimes", "heartbeat", "rt-1", "--metadata", '{"b": 2}', "--active-runs", "2",
                            "--json"))
    assert hb["metadata"] == {"a": 1, "b": 2} and hb["active_runs"] == 2
    ghost = await cli("runtimes", "heartbeat", "ghost", "--json")
    assert ghost.returncode == 3 and json.loads(ghost.stdout) is None and "no such runtime" in ghost.stderr
    token = await fleet.flush()
    shown = await fleet.runtimes.get("rt-1", min_seq={"FLEET_RUNTIMES": 2, **token})
    assert shown is not None and shown.metadata == {"a": 1, "b": 2}
    listed = cli_json(await cli("runtimes", "list", "--label", "zone=a", "--status", "online", "--json"))
    assert set(listed) == keys(RuntimeList) | {"as_of", "lag"} and listed["total"] == 1
    assert cli_json(await cli("runtimes", "show", "rt-1", "--json"))["display_name"] == "one"
    human = await cli("runtimes", "list")
    assert human.returncode == 0 and "rt-1" in human.stdout and "zone=a" in human.stdout
