"""Attempt-log behaviour (issue 2, part 7) through the `fleetlog` CLI, run as real subprocesses
against the fixture server (real nats-server, real DuckDB)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from fleetlog.schemas import EVENT_TYPES
from fleetlog.services.node.server import Server

from fleetlog import Fleet, FleetSettings

STREAM = "FLEET_ATTEMPTS"
FLEETLOG = shutil.which("fleetlog") or "/work/venv/bin/fleetlog"
ROW_KEYS = {"id", "ts", "agent", "action", "outcome", "elapsed_s", "pane_before", "pane_after", "extras"}

Run = Callable[..., Awaitable[subprocess.CompletedProcess[str]]]


@pytest.fixture
def cli(settings: FleetSettings, server: Server, tmp_path: Path) -> Run:
    """Run `fleetlog ... --nats <fixture broker>` in a subprocess, via asyncio.to_thread.

    Each invocation gets its own FLEETLOG_DATA_DIR (its spool lands there); the
    shared-directory case has its own test below. At most 3 run at once: the
    in-process server's DuckDB reads also use the default thread pool (6 threads
    on this 2-core machine), so more blocked subprocess threads would starve it.
    """
    slots = asyncio.Semaphore(3)
    counter = iter(range(1_000_000))

    async def run(*args: str, nats: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [FLEETLOG, *args, *(["--nats", settings.nats_url] if nats else [])]
        env = cli_env(tmp_path / f"cli-data-{next(counter)}")
        async with slots:
            res = await asyncio.to_thread(
                subprocess.run, cmd, capture_output=True, text=True, env=env, timeout=60,
                input=stdin if stdin is not None else "",
            )
            return res

    return run


def cli_env(data_dir: Path) -> dict[str, str]:
    env = {**os.environ, "FLEETLOG_DATA_DIR": str(data_dir), "COLUMNS": "300", "NO_COLOR": "1", "TERM": "dumb"}
    env.pop("FLEETLOG_NATS_URL", None)
    return env


def ok_json(proc: subprocess.CompletedProcess[str]) -> Any:
    assert proc.returncode == 0, f"rc={proc.returncode}\nstdout={proc.stdout}\nstderr={proc.stderr}"
    return json.loads(proc.stdout)


def builtins(struct: Any) -> Any:
    return msgspec.to_builtins(struct)


BASE = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)


def at(minutes: float) -> str:
    return (BASE + timedelta(minutes=minutes)).isoformat()


async def seed(fleet: Fleet) -> dict[str, int]:
    """Seven attempts through the API (six in the last hour, one 40 days old); the token once folded."""
    plan = [("alpha", "probe", "success", 1.0), ("alpha", "probe", "success", 3.0),
            ("alpha", "probe", "send_error", 2.0), ("alpha", "send", "success", 5.0),
            ("beta", "probe", "completion_timeout", 7.5), ("beta", "wait", "skipped_by_policy", 0.25)]
    for i, (agent, action, outcome, elapsed) in enumerate(plan):
        fleet.attempts.record(agent=agent, action=action, outcome=outcome, elapsed_s=elapsed, ts=at(i),
                              extras={"i": i}, pane_after=f"screen {i}")
    fleet.attempts.record(agent="alpha", action="old", outcome="success", elapsed_s=1.0,
                          ts=(datetime.now(UTC) - timedelta(days=40)).isoformat())
    token = await fleet.flush()
    await fleet.attempts.query(min_seq=token)  # folded: later CLI reads see it
    return token


# -- emit attempt ---------------------------------------------------------------


async def test_emit_attempt_json_and_stored(cli: Run, fleet: Fleet) -> None:
    proc, proc_now, proc_human = await asyncio.gather(
        cli("emit", "attempt", "--agent", "cli-a", "--action", "nonce-probe", "--outcome", "success",
            "--elapsed", "1.5", "--ts", "2026-01-02T03:04:05+02:00", "--extras", '{"polls": 4, "k": [1, "x"]}',
            "--pane-before", "before text", "--json"),
        cli("emit", "attempt", "--agent", "cli-b", "--action", "x.y", "--outcome", "custom outcome",
            "--elapsed", "0", "--json"),
        cli("emit", "attempt", "--agent", "cli-c", "--action", "probe", "--outcome", "send_error",
            "--elapsed", "2"),
    )
    out = ok_json(proc)
    assert out["stream"] == STREAM and isinstance(out["seq"], int) and out["seq"] >= 1
    assert out["token"].get(STREAM, 0) >= out["seq"]
    out_now = ok_json(proc_now)
    assert proc_human.returncode == 0, proc_human.stderr
    assert "recorded" in proc_human.stdout

    token = {STREAM: max(out["token"][STREAM], out_now["token"][STREAM])}
    page = await fleet.attempts.query(limit=100, min_seq=token)
    rows = {r.agent: r for r in page.items}
    assert set(rows) == {"cli-a", "cli-b", "cli-c"}
    a = rows["cli-a"]
    assert a.id == out["id"]
    assert (a.ts, a.action, a.outcome, a.elapsed_s, a.extras) == (
        "2026-01-02T03:04:05+02:00", "nonce-probe", "success", 1.5, {"polls": 4, "k": [1, "x"]})
    assert a.pane_before == {"format": "full", "text": "before text"} and a.pane_after is None
    b = rows["cli-b"]
    assert (b.id, b.action, b.outcome, b.elapsed_s, b.extras) == (out_now["id"], "x.y", "custom outcome", 0.0, {})
    parsed = datetime.fromisoformat(b.ts)
    assert parsed.utcoffset() == timedelta(0)
    assert abs((datetime.now(UTC) - parsed).total_seconds()) < 120
    assert rows["cli-c"].id in proc_human.stdout


async def test_emit_attempt_bad_input_names_the_field(cli: Run, fleet: Fleet) -> None:
    base = ["emit", "attempt"]
    good = {"--agent": "bad", "--action": "probe", "--outcome": "success", "--elapsed": "1"}

    def args(**override: str | None) -> list[str]:
        opts = {**good, **{k.replace("_", "-"): v for k, v in override.items()}}
        out = list(base)
        for k, v in opts.items():
            if v is not None:
                out += [k, v]
        return out

    cases: list[tuple[list[str], str]] = [
        (args(**{"--elapsed": "abc"}), "elapsed"),
        (args(**{"--elapsed": "-1"}), "elapsed"),
        (args(**{"--agent": ""}), "agent"),
        (args(**{"--outcome": ""}), "outcome"),
        (args(**{"--agent": None}), "agent"),
        ([*args(), "--extras", "{not json"], "extras"),
        ([*args(), "--ts", "not-a-time"], "ts"),
    ]
    procs = await asyncio.gather(*(cli(*a) for a, _ in cases))
    failures = []
    for (a, field), proc in zip(cases, procs, strict=True):
        text = proc.stdout + proc.stderr
        if proc.returncode == 0 or field not in text:
            failures.append(f"{a[2:]}: rc={proc.returncode} out={text.strip()[:300]!r}")
    assert not failures, "\n".join(failures)

    marker = ok_json(await cli("emit", "attempt", "--agent", "good", "--action", "probe", "--outcome", "success",
                               "--elapsed", "1", "--json"))
    page = await fleet.attempts.query(limit=100, min_seq=marker["token"])
    assert [(r.agent, r.id) for r in page.items] == [("good", marker["id"])]  # nothing else was published


# -- attempts query / stats / summary / purge -----------------------------------------------


async def test_query_json_matches_api_and_human_output(cli: Run, fleet: Fleet) -> None:
    token = await seed(fleet)
    variants: list[tuple[list[str], dict[str, Any]]] = [
        ([], {}),
        (["--agent", "alpha", "--action", "probe", "--outcome", "success"],
         {"agent": "alpha", "action": "probe", "outcome": "success"}),
        (["--since", "30d"], {"since": "30d"}),
        (["--agent", "alpha", "--since", at(2.5), "--limit", "2", "--offset", "0"],
         {"agent": "alpha", "since": at(2.5), "limit": 2, "offset": 0}),
        (["--limit", "2", "--offset", "1"], {"limit": 2, "offset": 1}),
    ]
    procs = await asyncio.gather(*(cli("attempts", "query", *a, "--json") for a, _ in variants))
    for (a, kwargs), proc in zip(variants, procs, strict=True):
        out = ok_json(proc)
        api = builtins(await fleet.attempts.query(min_seq=token, **kwargs))
        assert set(out) == set(api), a
        assert out["items"] == api["items"], a
        assert out["as_of"].get(STREAM, 0) >= token[STREAM]
        assert STREAM in out["lag"]
        for item in out["items"]:
            assert set(item) == ROW_KEYS

    assert len(ok_json(procs[0])["items"]) == 7
    assert [(r["agent"], r["extras"]) for r in ok_json(procs[1])["items"]] == [("alpha", {"i": 1}), ("alpha", {"i": 0})]
    assert [r["action"] for r in ok_json(procs[2])["items"]] == ["wait", "probe", "send", "probe", "probe", "probe"]
    assert [r["extras"] for r in ok_json(procs[3])["items"]] == [{"i": 3}]
    assert [r["extras"] for r in ok_json(procs[4])["items"]] == [{"i": 4}, {"i": 3}]
    assert ok_json(procs[0])["items"][0]["pane_after"] == {"format": "full", "text": "screen 5"}

    human, bad_since = await asyncio.gather(
        cli("attempts", "query", "--agent", "beta"),
        cli("attempts", "query", "--since", "yesterday"),
    )
    assert human.returncode == 0, human.stderr
    api_rows = (await fleet.attempts.query(agent="beta", min_seq=token)).items
    assert len(api_rows) == 2
    for row in api_rows:
        for value in (row.id, row.action, row.outcome, row.ts):
            assert value in human.stdout, (value, human.stdout)
    assert "alpha" not in human.stdout
    assert bad_since.returncode != 0 and "since" in bad_since.stderr + bad_since.stdout


async def test_stats_json_matches_api_and_human_output(cli: Run, fleet: Fleet) -> None:
    token = await seed(fleet)
    variants: list[tuple[list[str], dict[str, Any]]] = [
        ([], {}), (["--agent", "alpha"], {"agent": "alpha"}),
        (["--agent", "alpha", "--since", at(-1)], {"agent": "alpha", "since": at(-1)}),
    ]
    procs = await asyncio.gather(*(cli("attempts", "stats", *a, "--json") for a, _ in variants),
                                 cli("attempts", "stats", "--agent", "alpha"))
    for (a, kwargs), proc in zip(variants, procs[: len(variants)], strict=True):
        out = ok_json(proc)
        api = builtins(await fleet.attempts.stats(min_seq=token, **kwargs))
        assert set(out) == set(api), a
        assert out["items"] == api["items"], a
        for item in out["items"]:
            assert set(item) == {"action", "outcome", "count", "mean_elapsed_s", "p95_elapsed_s"}
    alpha = ok_json(procs[1])["items"]
    assert [(s["action"], s["outcome"], s["count"], s["p95_elapsed_s"]) for s in alpha] == [
        ("old", "success", 1, 1.0), ("probe", "success", 2, 1.0), ("probe", "send_error", 1, 2.0),
        ("send", "success", 1, 5.0)]
    since = ok_json(procs[2])["items"]
    assert [(s["action"], s["outcome"], s["count"]) for s in since] == [
        ("probe", "success", 2), ("probe", "send_error", 1), ("send", "success", 1)]
    human = procs[len(variants)]
    assert human.returncode == 0, human.stderr
    for word in ("probe", "send", "send_error", "success", "old"):
        assert word in human.stdout


async def test_summary_json_matches_api_and_human_output(cli: Run, fleet: Fleet) -> None:
    token = await seed(fleet)
    out_alpha, out_ghost, human = await asyncio.gather(
        cli("attempts", "summary", "alpha", "--json"),
        cli("attempts", "summary", "ghost", "--json"),
        cli("attempts", "summary", "alpha"),
    )
    alpha = ok_json(out_alpha)
    api = builtins(await fleet.attempts.summarize("alpha", min_seq=token))
    assert set(alpha) == set(api)
    assert {k: v for k, v in alpha.items() if k not in ("as_of", "lag", "lag_s")} == {
        k: v for k, v in api.items() if k not in ("as_of", "lag", "lag_s")}
    assert alpha["last_action_name"] == "send" and alpha["last_action_outcome"] == "success"
    assert alpha["last_action_at"] == at(3) and alpha["last_action_elapsed_s"] == 5.0
    assert alpha["counts"] == {"probe:success": 2, "probe:send_error": 1, "send:success": 1, "old:success": 1}
    assert alpha["p95_elapsed_s_by_action"] == {"probe": 2.0, "send": 5.0, "old": 1.0}

    assert out_ghost.returncode == 3 and "no attempts recorded for 'ghost'" in out_ghost.stderr
    ghost = json.loads(out_ghost.stdout)  # --json still prints the (empty) summary
    assert set(ghost) == set(api)
    assert (ghost["last_action_at"], ghost["last_action_name"], ghost["last_action_outcome"],
            ghost["last_action_elapsed_s"], ghost["counts"], ghost["p95_elapsed_s_by_action"]) == (
        "", "", "", None, {}, {})
    assert human.returncode == 0, human.stderr
    for word in ("alpha", "send", "probe:success", "probe:send_error", at(3)):
        assert word in human.stdout, word


async def test_purge_json_and_confirmation(cli: Run, fleet: Fleet) -> None:
    token = await seed(fleet)  # one row 40 days old
    refused = await cli("attempts", "purge", "--days", "30", stdin="n\n")
    assert refused.returncode == 1 and "not confirmed" in refused.stderr
    assert len((await fleet.attempts.query(min_seq=token)).items) == 7

    out = ok_json(await cli("attempts", "purge", "--days", "30", "--yes", "--json"))
    api = builtins(await fleet.attempts.purge(30))
    assert set(out) == set(api)
    assert out["deleted"] == 1 and api["deleted"] == 0
    rows = (await fleet.attempts.query(min_seq=token)).items
    assert len(rows) == 6 and "old" not in {r.action for r in rows}

    # every seeded ts is in the past: a purge of 0 days removes the other six
    human = await cli("attempts", "purge", "--days", "0", "--yes")
    assert human.returncode == 0, human.stderr
    assert "deleted 6" in human.stdout
    assert (await fleet.attempts.query(min_seq=token)).items == []


# -- status / schemas ----------------------------------------------------------------------


async def test_status_json_and_human(cli: Run, fleet: Fleet) -> None:
    token = await seed(fleet)
    out_proc, human = await asyncio.gather(cli("status", "--json"), cli("status"))
    out = ok_json(out_proc)
    api = builtins(await fleet.status())
    assert set(out) == set(api) | {"dead_letters"}  # the node's answer, and this machine's spool dir
    assert out["dead_letters"]["count"] == 0
    assert {"streams", "projections", "rejects_total", "as_of", "lag"} <= set(out)
    streams = {s["name"]: s for s in out["streams"]}
    assert STREAM in streams and streams[STREAM]["last_seq"] >= token[STREAM]
    assert set(streams[STREAM]) == set(builtins(await fleet.status())["streams"][0])
    [attempts] = [p for p in out["projections"] if p["name"] == "attempts"]
    assert attempts["state"] == "live"
    assert attempts["checkpoints"][STREAM] >= token[STREAM]
    assert attempts["lag"][STREAM] >= 0 and STREAM in attempts["lag_seconds"]
    assert attempts["rows"]["attempts"] == 7
    assert out["rejects_total"] == 0
    assert out["as_of"][STREAM] >= token[STREAM]

    assert human.returncode == 0, human.stderr
    for word in (STREAM, "attempts", "live", "rejects"):
        assert word in human.stdout, word


async def test_schemas_export(cli: Run, tmp_path: Path) -> None:
    target = tmp_path / "schemas-out"
    proc = await cli("schemas", "export", str(target), nats=False)
    assert proc.returncode == 0, proc.stderr
    tags = {cls.__struct_config__.tag for cls in EVENT_TYPES}
    files = {p.name for p in target.iterdir()}
    assert {f"{t}.schema.json" for t in tags} <= files
    assert files - {f"{t}.schema.json" for t in tags} <= {"fleetlog.event.schema.json"}
    assert len(tags) == len(EVENT_TYPES) >= 20
    for tag in tags:
        schema = json.loads((target / f"{tag}.schema.json").read_text())
        body = schema
        if "$ref" in schema:
            ref = schema["$ref"]
            assert ref.startswith("#/$defs/"), ref
            body = schema["$defs"][ref.removeprefix("#/$defs/")]
        assert body.get("type") == "object", tag
        props = body["properties"]
        tag_prop = props["type"]
        assert tag_prop.get("enum") == [tag] or tag_prop.get("const") == tag, (tag, tag_prop)
        assert {"type", "id", "ts"} <= set(body["required"]), tag
        assert set(body["required"]) <= set(props), tag
        for name in ("id", "ts", "v"):
            assert name in props, (tag, name)
        json.dumps(schema)  # plain JSON
    attempt = json.loads((target / "attempt.recorded.schema.json").read_text())
    body = attempt["$defs"][attempt["$ref"].removeprefix("#/$defs/")] if "$ref" in attempt else attempt
    assert {"agent", "action", "outcome", "elapsed_s"} <= set(body["required"])
    assert body["properties"]["elapsed_s"].get("minimum") == 0


async def test_concurrent_cli_invocations_sharing_one_data_dir(settings: FleetSettings, server: Server,
                                                               fleet: Fleet, tmp_path: Path) -> None:
    """Several agents on one machine emit at the same moment with the default (shared) data dir.

    asyncio subprocesses here (no threads), so all start together.
    """
    env = cli_env(tmp_path / "shared-data")
    n = 8

    async def emit(i: int) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            FLEETLOG, "emit", "attempt", "--agent", f"par{i}", "--action", "probe", "--outcome", "success",
            "--elapsed", "1", "--json", "--nats", settings.nats_url,
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode or 0, out.decode(), err.decode()

    results = await asyncio.gather(*(emit(i) for i in range(n)))
    failed = [f"rc={rc}: {err.strip().splitlines()[-1] if err.strip() else out}" for rc, out, err in results if rc]
    assert not failed, f"{len(failed)} of {n} concurrent `fleetlog emit attempt` failed:\n" + "\n".join(failed)
    tokens = [json.loads(out)["token"][STREAM] for _, out, _ in results]
    page = await fleet.attempts.query(limit=100, min_seq={STREAM: max(tokens)})
    assert sorted(r.agent for r in page.items) == sorted(f"par{i}" for i in range(n))
