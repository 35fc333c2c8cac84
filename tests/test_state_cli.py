"""Scoped state (issue 4) through `fleetlog state get|set|del|list|snapshot|key`, run as real
subprocesses against the fixture server (real nats-server, real DuckDB)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from fleetlog.services.node.server import Server

from fleetlog import Fleet, FleetSettings

FLEETLOG = shutil.which("fleetlog") or "/work/venv/bin/fleetlog"
STREAM = "FLEET_STATE"
ID = ["--runner", "runner-1", "--conversation", "conv-1", "--actor", "user-1", "--binding", "bind-A"]
CTX = {"runner_id": "runner-1", "conversation_id": "conv-1", "actor_id": "user-1"}
BIND = {"binding_id": "bind-A"}

Run = Callable[..., Awaitable[subprocess.CompletedProcess[str]]]


@pytest.fixture
def cli(settings: FleetSettings, server: Server, tmp_path: Path) -> Run:
    """`fleetlog ... --nats <fixture broker>` in a subprocess (at most 3 at once: a 2-core machine)."""
    slots = asyncio.Semaphore(3)
    counter = iter(range(1_000_000))

    async def run(*args: str, stdin: str = "", nats: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "FLEETLOG_DATA_DIR": str(tmp_path / f"cli-{next(counter)}"), "COLUMNS": "300",
               "NO_COLOR": "1", "TERM": "dumb"}
        env.pop("FLEETLOG_NATS_URL", None)
        cmd = [FLEETLOG, *args, *(["--nats", settings.nats_url] if nats else [])]
        async with slots:
            return await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, env=env,
                                           timeout=60, input=stdin)

    return run


def ok_json(proc: subprocess.CompletedProcess[str]) -> Any:
    assert proc.returncode == 0, f"rc={proc.returncode}\nstdout={proc.stdout}\nstderr={proc.stderr}"
    return json.loads(proc.stdout)


def keys_of(struct: Any) -> set[str]:
    return set(msgspec.to_builtins(struct))


async def test_set_get_del_json_keys_match_the_api(cli: Run, fleet: Fleet) -> None:
    written = ok_json(await cli("state", "set", "conversation", "mood", '{"v": "calm"}', *ID, "--json"))
    api_write = await fleet.state.set("conversation", "api-key", 1, context=CTX, binding=BIND)
    assert set(written) == keys_of(api_write)
    assert written["token"] == {STREAM: written["seq"]} and written["key"] == "mood"

    got = ok_json(await cli("state", "get", "conversation", "mood", *ID, "--min-seq", f"{STREAM}={written['seq']}",
                            "--json"))
    api_entry = await fleet.state.entry("conversation", "mood", context=CTX, binding=BIND, min_seq=api_write)
    assert set(got) == keys_of(api_entry)
    assert got["found"] is True and got["value"] == {"v": "calm"} and got["created_at"] == written["created_at"]
    assert got["as_of"][STREAM] >= written["seq"]
    assert api_entry.value == {"v": "calm"}  # what the CLI wrote, the API reads

    plain = await cli("state", "get", "conversation", "mood", *ID)
    assert plain.returncode == 0 and json.loads(plain.stdout) == {"v": "calm"}

    deleted = ok_json(await cli("state", "del", "conversation", "mood", *ID, "--json"))
    api_del = await fleet.state.delete("conversation", "api-key", context=CTX, binding=BIND)
    assert set(deleted) == keys_of(api_del) and deleted["deleted"] is True
    again = await cli("state", "del", "conversation", "mood", *ID, "--json")
    assert again.returncode == 3 and json.loads(again.stdout)["deleted"] is False and "was not set" in again.stderr

    missing_proc = await cli("state", "get", "conversation", "mood", *ID, "--min-seq", str(deleted["seq"]), "--json")
    assert missing_proc.returncode == 3, missing_proc.stderr
    missing = json.loads(missing_proc.stdout)
    assert missing["found"] is False and missing["value"] is None
    gone = await cli("state", "get", "conversation", "mood", *ID)
    assert gone.returncode == 3 and gone.stdout == "" and "not set" in gone.stderr


async def test_set_value_forms_and_alias(cli: Run, fleet: Fleet) -> None:
    w = ok_json(await cli("state", "set", "actor", "note", "plain words", "--raw", *ID, "--json"))
    assert await fleet.state.get("actor", "note", context=CTX, binding=BIND, min_seq=w["token"]) == "plain words"
    w = ok_json(await cli("state", "set", "actor", "piped", "-", *ID, "--json", stdin='[1, "ü", null]'))
    assert await fleet.state.get("actor", "piped", context=CTX, binding=BIND, min_seq=w["token"]) == [1, "ü", None]
    bad = await cli("state", "set", "actor", "x", "{not json", *ID)
    assert bad.returncode == 2 and "--raw" in bad.stderr
    w = ok_json(await cli("state", "set", "conversation", "conversation_id", '"ext-9"', *ID, "--json"))
    assert w["key"] == "external.conversation_id"
    got = ok_json(await cli("state", "get", "conversation", "conversation_id", *ID, "--min-seq",
                            json.dumps(w["token"]), "--json"))
    assert got["key"] == "external.conversation_id" and got["value"] == "ext-9"


async def test_policy_errors_exit_4_bad_input_2_with_the_words(cli: Run) -> None:
    cases = [  # the binding policy refusing: 4; what the call itself got wrong: 2
        (["state", "set", "bogus", "k", "1", *ID, "--state-disabled"], 4, "State is disabled by binding policy"),
        (["state", "set", "bogus", "k", "1", *ID], 2, "Invalid scope: bogus"),
        (["state", "set", "subject", "k", "1", *ID], 4, 'Scope "subject" not enabled by binding policy'),
        (["state", "set", "subject", "k", "1", *ID, "--scopes", "subject"], 2, 'Missing identity for scope "subject"'),
        (["state", "get", "runner", "k", *ID], 4, 'Scope "runner" not enabled by binding policy'),
    ]
    for args, code, words in cases:
        proc = await cli(*args)
        assert proc.returncode == code, (args, proc.stdout, proc.stderr)
        assert words in " ".join(proc.stderr.split()), (words, proc.stderr)
    big = json.dumps("x" * 262_143)  # through stdin: one argument may not exceed 128 KiB
    for args, words in (
        (["state", "set", "actor", "k", "-", *ID], "Value size 262145 bytes exceeds limit 262144 bytes"),
        # --raw stores the text itself: its JSON adds two quotes and escapes the two inside
        (["state", "set", "actor", "k", "-", "--raw", *ID], "Value size 262149 bytes exceeds limit"),
    ):
        proc = await cli(*args, stdin=big)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert words in " ".join(proc.stderr.split()), (words, proc.stderr)
    no_runner = await cli("state", "get", "actor", "k", "--actor", "u")
    assert no_runner.returncode == 2 and "--runner" in no_runner.stderr


async def test_list_and_key(cli: Run, fleet: Fleet) -> None:
    w = None
    for k in ("b", "a_1", "a%2", "a3", "c"):
        w = await fleet.state.set("actor", k, k, context=CTX, binding=BIND)
    assert w is not None
    scope_key = (await cli("state", "key", "actor", *ID, nats=False)).stdout.strip()  # no broker needed
    assert scope_key == fleet.state.scope_key("actor", context=CTX, binding=BIND)

    listed = ok_json(await cli("state", "list", scope_key, "--min-seq", str(w.seq), "--json"))
    api_list = await fleet.state.list(scope_key)
    assert set(listed) == keys_of(api_list)
    assert listed["keys"] == ["a%2", "a3", "a_1", "b", "c"] and listed["has_more"] is False
    by_scope = ok_json(await cli("state", "list", "--scope", "actor", *ID, "--prefix", "a_", "--json"))
    assert by_scope["keys"] == ["a_1"] and by_scope["scope_key"] == scope_key
    page = ok_json(await cli("state", "list", scope_key, "--limit", "2", "--json"))
    assert page["keys"] == ["a%2", "a3"] and page["has_more"] is True
    rest = ok_json(await cli("state", "list", scope_key, "--after", "a3", "--json"))
    assert rest["keys"] == ["a_1", "b", "c"]
    text = await cli("state", "list", scope_key)
    assert text.returncode == 0 and text.stdout.split() == ["a%2", "a3", "a_1", "b", "c"]
    neither = await cli("state", "list")
    assert neither.returncode == 2


async def test_snapshot_json(cli: Run, fleet: Fleet) -> None:
    w = await fleet.state.set("actor", "pref", {"lang": "fr"}, context=CTX, binding=BIND)
    snap = ok_json(await cli("state", "snapshot", *ID, "--min-seq", str(w.seq), "--json"))
    api_snap = await fleet.state.snapshot(CTX, BIND)
    assert set(snap) == keys_of(api_snap)
    assert snap["actor"] == {"pref": {"lang": "fr"}}
    assert snap["conversation"] == {"external.conversation_id": "conv-1"}
    assert snap["subject"] == {} and snap["runner"] == {}
    off = ok_json(await cli("state", "snapshot", *ID, "--state-disabled", "--json"))
    assert (off["conversation"], off["actor"], off["subject"], off["runner"]) == ({}, {}, {}, {})
    other = ok_json(await cli("state", "snapshot", *ID[:-1], "bind-B", "--json"))
    assert other["actor"] == {}  # another binding sees none of it
    text = await cli("state", "snapshot", *ID)
    assert text.returncode == 0 and 'pref = {"lang": "fr"}' in text.stdout
