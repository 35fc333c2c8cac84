"""Exit codes that mean something (issue 9): every `fleetlog` command exits with the code of
`Exit` (services/cli/_common.py, docs/cli.md) when what was asked did not happen, and 0 when
it did; the global `--timeout` bounds the wait for the broker and the query service.

Real subprocesses against a real nats-server (and the fixture server where a query service is
needed); the lease is lost by moving the API's clock, never by sleeping.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import msgspec
import nats
import pytest
from fleetlog.services.backbone.errors import (
    FleetError,
    FleetRefused,
    FleetUnavailable,
    FleetValidationError,
    QueryError,
    StaleError,
    StaleHolderError,
)
from fleetlog.services.cli._common import Exit, exit_code_of
from fleetlog.services.client.processors.lock import ProcessorLockLost
from fleetlog.services.client.state import StatePolicyError
from fleetlog.services.node.broker import EmbeddedBroker, free_port
from fleetlog.services.node.server import Server
from nats.aio.msg import Msg
from nats.errors import NoServersError

from fleetlog import Fleet, FleetSettings

from .helpers import CliRun, cli_runner

ID = ["--runner", "runner-1", "--conversation", "conv-1", "--actor", "user-1", "--binding", "bind-A"]


@pytest.fixture
def cli(settings: FleetSettings, server: Server, tmp_path: Path) -> CliRun:
    return cli_runner(settings.nats_url, tmp_path)


def exited(res: subprocess.CompletedProcess[str], code: Exit, words: str = "") -> subprocess.CompletedProcess[str]:
    """The command exited with `code`, and its stderr says `words` (rich may wrap long lines)."""
    assert res.returncode == code, (res.args, res.returncode, res.stdout, res.stderr)
    if words:
        assert words in " ".join(res.stderr.split()), (words, res.stderr)
    return res


async def test_runs_not_found_refused_and_ok(cli: CliRun, fleet: Fleet) -> None:
    await fleet.runs.create("r1", "runner-a", status="queued")
    await fleet.runs.create("r2", "runner-a", status="queued")
    claim = await fleet.runs.claim_next("rt-1", lease_s=300)
    assert claim is not None and claim.run_id == "r1"
    token, fence = claim.claim_token, claim.fence

    ghost = await asyncio.gather(
        cli("runs", "show", "ghost"), cli("runs", "renew", "ghost", "--token", "t"),
        cli("runs", "release", "ghost", "--token", "t"), cli("runs", "append", "ghost", "1", "message"),
        cli("runs", "finalize", "ghost", "completed"), cli("runs", "cancel", "ghost"), cli("runs", "events", "ghost"),
    )
    for res in ghost:
        exited(res, Exit.NOT_FOUND, "no such run: ghost")
        assert res.stdout == ""  # failures speak on stderr only
    as_json = exited(await cli("runs", "show", "ghost", "--json"), Exit.NOT_FOUND)
    assert json.loads(as_json.stdout) is None  # --json still prints the API's answer

    refused = await asyncio.gather(
        cli("runs", "renew", "r1", "--token", "wrong"),
        cli("runs", "release", "r1", "--token", "wrong"),
        cli("runs", "append", "r1", "1", "message"),  # claimed: only the holder may append
        cli("runs", "append", "r1", "1", "message", "--token", "stale"),
        cli("runs", "finalize", "r1", "completed", "--fence", str(fence + 1000)),
    )
    exited(refused[0], Exit.REFUSED, "not renewed")
    exited(refused[1], Exit.REFUSED, "not released")
    exited(refused[2], Exit.REFUSED, "active claim ownership")
    exited(refused[3], Exit.REFUSED, "claim ownership is not active")
    exited(refused[4], Exit.REFUSED, "claim ownership is not active")

    ok = await asyncio.gather(
        cli("runs", "show", "r1", "--json"), cli("runs", "renew", "r1", "--token", token, "--json"),
        cli("runs", "append", "r1", "1", "message", "--token", token, "--json"),
        cli("runs", "events", "r2", "--json"),  # a known run without events: an empty page, not "not found"
    )
    for res in ok:
        exited(res, Exit.OK)
    assert json.loads(ok[0].stdout)["run_id"] == "r1" and json.loads(ok[3].stdout)["items"] == []

    # Nothing else is eligible: r2 is queued but runner-b's runs only are asked for.
    exited(await cli("runs", "claim", "--runtime", "rt-2", "--runner", "runner-b"), Exit.NOT_FOUND, "nothing to claim")

    # The lease passes (the API's clock, not a sleep) and the sweeper puts r1 back: the holder's
    # renew and finalize are refused now.
    fleet.runs.clock = lambda: 4_000_000_000.0
    assert [r.run_id for r in await fleet.runs.release_expired()] == ["r1"]
    exited(await cli("runs", "renew", "r1", "--token", token), Exit.REFUSED, "not renewed")
    exited(await cli("runs", "finalize", "r1", "completed", "--token", token), Exit.REFUSED,
           "claim ownership is not active")

    done = await cli("runs", "finalize", "r2", "failed", "--json")
    assert json.loads(exited(done, Exit.OK).stdout)["status"] == "failed"
    exited(await cli("runs", "finalize", "r2", "completed"), Exit.REFUSED, "Cannot transition terminal run")
    exited(await cli("runs", "release", "r2", "--token", "t", "--status", "claimed"), Exit.USAGE, "must not be")


async def test_runtimes_not_found(cli: CliRun, fleet: Fleet) -> None:
    shown, beat = await asyncio.gather(cli("runtimes", "show", "ghost"), cli("runtimes", "heartbeat", "ghost"))
    exited(shown, Exit.NOT_FOUND, "no such runtime: ghost")
    exited(beat, Exit.NOT_FOUND, "no such runtime: ghost")
    exited(await cli("runtimes", "register", "rt-1"), Exit.OK)
    exited(await cli("runtimes", "heartbeat", "rt-1"), Exit.OK)


async def test_processors_state_lock_and_runs(cli: CliRun, fleet: Fleet) -> None:
    await fleet.processors.mark_processed("ingest", "u/a.jsonl", "u", 1, "h-a")  # the view has it on return

    unknown, mixed, known = await asyncio.gather(
        cli("processors", "state", "ingest", "u/x.jsonl", "u/y.jsonl"),
        cli("processors", "state", "ingest", "u/a.jsonl", "u/x.jsonl", "--json"),
        cli("processors", "state", "ingest", "u/a.jsonl", "--json"),
    )
    exited(unknown, Exit.NOT_FOUND, "no row in ingest for u/x.jsonl, u/y.jsonl")
    exited(mixed, Exit.NOT_FOUND, "no row in ingest for u/x.jsonl")
    assert list(json.loads(mixed.stdout)) == ["u/a.jsonl"]  # the ones found are still printed
    assert json.loads(exited(known, Exit.OK).stdout)["u/a.jsonl"]["file_hash"] == "h-a"
    exited(await cli("processors", "mark", "ingest", "u/a.jsonl", "--username", "u", "--items", "1"), Exit.USAGE,
           "--hash or --file")

    lock = json.loads(exited(await cli("processors", "acquire", "ingest", "--holder", "h1", "--json"), Exit.OK).stdout)
    busy = await cli("processors", "acquire", "ingest", "--holder", "h2", "--json")
    exited(busy, Exit.REFUSED, "lock busy")
    assert json.loads(busy.stdout) is None
    wrong = await cli("processors", "release", "ingest", "--holder", "h2", "--fence", str(lock["fence"]))
    exited(wrong, Exit.REFUSED, "not released")
    assert wrong.stdout == ""
    right = await cli("processors", "release", "ingest", "--holder", "h1", "--fence", str(lock["fence"]), "--json")
    assert json.loads(exited(right, Exit.OK).stdout) == {"released": True}


async def test_state_not_found_policy_and_stale(cli: CliRun, fleet: Fleet) -> None:
    missing, missing_json, not_deleted = await asyncio.gather(
        cli("state", "get", "actor", "nope", *ID), cli("state", "get", "actor", "nope", *ID, "--json"),
        cli("state", "del", "actor", "nope", *ID),
    )
    exited(missing, Exit.NOT_FOUND, "is not set")
    assert missing.stdout == ""
    assert json.loads(exited(missing_json, Exit.NOT_FOUND).stdout)["found"] is False
    exited(not_deleted, Exit.NOT_FOUND, "was not set")

    denied = await asyncio.gather(
        cli("state", "set", "actor", "k", "1", *ID, "--state-disabled"),
        cli("state", "get", "runner", "k", *ID),
        cli("state", "key", "subject", *ID, nats=False),
    )
    exited(denied[0], Exit.REFUSED, "State is disabled by binding policy")
    exited(denied[1], Exit.REFUSED, 'Scope "runner" not enabled by binding policy')
    exited(denied[2], Exit.REFUSED, 'Scope "subject" not enabled by binding policy')
    bad = await asyncio.gather(
        cli("state", "set", "bogus", "k", "1", *ID),
        cli("state", "set", "subject", "k", "1", *ID, "--scopes", "subject"),
        cli("state", "get", "actor", "k", *ID, "--min-seq", "FLEET_STATE=x"),
    )
    exited(bad[0], Exit.USAGE, "Invalid scope: bogus")
    exited(bad[1], Exit.USAGE, 'Missing identity for scope "subject"')
    exited(bad[2], Exit.USAGE, "--min-seq")

    written = json.loads(exited(await cli("state", "set", "actor", "k", "1", *ID, "--json"), Exit.OK).stdout)
    got = await cli("state", "get", "actor", "k", *ID, "--min-seq", f"FLEET_STATE={written['seq']}")
    assert json.loads(exited(got, Exit.OK).stdout) == 1
    # A position the view will never reach within the service's bounded wait.
    far = await cli("state", "get", "actor", "k", *ID, "--min-seq", f"FLEET_STATE={written['seq'] + 1000}")
    exited(far, Exit.STALE)


async def test_snapshots_and_attempts_not_found(cli: CliRun, fleet: Fleet) -> None:
    results = await asyncio.gather(
        cli("snapshots", "latest", "--agent", "nobody", "--host", "web-9"),
        cli("snapshots", "prev", "--agent", "nobody", "--host", "web-9"),
        cli("snapshots", "history", "--agent", "nobody", "--host", "web-9"), cli("attempts", "summary", "ghost"),
    )
    for res, words in zip(results, ("no snapshot of nobody", "no previous snapshot of nobody",
                                    "no snapshot of nobody", "no attempts recorded for 'ghost'"), strict=True):
        exited(res, Exit.NOT_FOUND, words)
    exited(await cli("snapshots", "take", "--agent", "", "--data", "{}"), Exit.USAGE, "agent")
    exited(await cli("snapshots", "take", "--agent", "cfg", "--host", "web-1", "--data", "{}"), Exit.OK)
    exited(await cli("rebuild", "nope", "--no-wait"), Exit.NOT_FOUND, "unknown projection 'nope'")  # the service's 404


@pytest.mark.parametrize(("exc", "code"), [
    (StaleError("behind"), Exit.STALE),  # a TimeoutError too: STALE wins
    (FleetUnavailable("away"), Exit.UNAVAILABLE),
    (TimeoutError("flush: 3 events not yet acked"), Exit.UNAVAILABLE),
    (NoServersError(), Exit.UNAVAILABLE),
    (QueryError("408", "statement ran too long"), Exit.UNAVAILABLE),
    (QueryError("404", "unknown projection"), Exit.NOT_FOUND),
    (QueryError("500", "boom"), Exit.ERROR),
    (FleetRefused("Cannot transition terminal run"), Exit.REFUSED),  # a ValueError too: REFUSED wins
    (StaleHolderError("stale claim"), Exit.REFUSED),
    (ProcessorLockLost("moved on"), Exit.REFUSED),
    (StatePolicyError("binding.state_policy.state_scopes", "not enabled"), Exit.REFUSED),
    (StatePolicyError("scope", "Invalid scope: x"), Exit.USAGE),
    (FleetValidationError("agent", "must be a non-empty string"), Exit.USAGE),
    (ValueError("release: status must not be 'claimed'"), Exit.USAGE),
    (msgspec.DecodeError("an answer that does not decode"), Exit.ERROR),  # a ValueError, but not bad input
    (FleetError("lost 100 races"), Exit.ERROR),
])
def test_exit_code_of_maps_the_most_specific_class_first(exc: BaseException, code: Exit) -> None:
    assert exit_code_of(exc) == code


async def test_timeout_without_a_query_service(broker: EmbeddedBroker, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    cli = cli_runner(broker.url, tmp_path)
    # A bare broker: nobody answers the query subjects at all.
    exited(await cli("--timeout", "5", "runtimes", "show", "rt-1"), Exit.UNAVAILABLE, "no fleetlog query service")

    # Something subscribed that never answers (a hung service): the request waits exactly as long
    # as --timeout says, and the message names it (without it the default is 10 s).
    async def never_answer(msg: Msg) -> None:
        pass

    nc = await nats.connect(broker.url)
    try:
        await nc.subscribe("fleetlog.>", cb=never_answer)
        await nc.flush()
        hung = await cli("--timeout", "0.5", "runtimes", "show", "rt-1")
        exited(hung, Exit.UNAVAILABLE, "did not answer fleetlog.runtimes.get within 0.5s (--timeout 0.5s)")
        monkeypatch.setenv("FLEETLOG_TIMEOUT", "0.7")
        from_env = await cli("processors", "state", "ingest", "u/h.jsonl")
        exited(from_env, Exit.UNAVAILABLE, "within 0.7s (--timeout 0.7s)")
    finally:
        await nc.close()


async def test_timeout_without_a_broker(tmp_path: Path) -> None:
    cli = cli_runner(f"nats://127.0.0.1:{free_port()}", tmp_path)  # nothing listens there
    exited(await cli("--timeout", "0.5", "runs", "show", "r1"), Exit.UNAVAILABLE,
           "not connected to NATS at nats://127.0.0.1:")
    exited(await cli("--timeout", "0.5", "state", "get", "actor", "k", *ID), Exit.UNAVAILABLE, "(--timeout 0.5s)")
    exited(await cli("--timeout", "0", "runs", "show", "r1"), Exit.USAGE, "--timeout")
