"""`tick`, `status` and the on_diff hook contract against the real broker: a hook that writes its
environment to a file, an HTTP hook against a local server, failures swallowed, nothing shown."""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fleetlog.services.client.snapshots.hooks import fire, hook_commands
from fleetlog.services.node.server import Server

from fleetlog import Fleet, snapshots

from .helpers import wait_until

HOOK = """import json, os, sys
env = {k: v for k, v in os.environ.items() if k.startswith(("SCITEX_", "SAC_"))}
with open(sys.argv[1], "a") as f:
    f.write(json.dumps(env) + "\\n")
"""


def env_hook(tmp_path: Path) -> tuple[str, Path]:
    script, out = tmp_path / "hook.py", tmp_path / "hook-env.jsonl"
    script.write_text(HOOK)
    return f"{sys.executable} {script} {out}", out


async def until(predicate: Any) -> Any:
    """A plain predicate for helpers.wait_until (which awaits)."""

    async def check() -> Any:
        return predicate()

    return await wait_until(check, timeout_s=60)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def model() -> Iterator[dict[str, str]]:
    """The agent's metadata, changed by the test to make the next tick's snapshot differ."""
    meta = {"model": "m1"}
    snapshots.set_meta_provider(lambda agent: dict(meta))
    yield meta
    snapshots.set_meta_provider(None)


async def test_tick_fires_on_diff_with_the_container_env(fleet: Fleet, server: Server, tmp_path: Path,
                                                          model: dict[str, str]) -> None:
    command, out = env_hook(tmp_path)

    class Config:  # an object with a `.hooks` mapping, as the container's config is
        def __init__(self) -> None:
            self.hooks = {"on_diff": [command]}

    first = await fleet.snapshots.tick("hk", hooks=Config())
    assert first is not None and first["has_diff"] is False
    model["model"] = "m2"
    second = await fleet.snapshots.tick("hk", hooks=Config())  # returns at once: the hook runs in the pool
    assert second is not None and "agent_meta.model" in second["diff_fields"]
    got = await until(lambda: lines(out) or None)
    assert len(got) == 1  # the first tick had no diff: no hook
    assert got[0] == {"SCITEX_AGENT_NAME": "hk", "SAC_NAME": "hk", "SCITEX_HOOK": "on_diff",
                      "SCITEX_HOOK_CTX_DIFF_FIELDS": json.dumps(second["diff_fields"]),
                      "SCITEX_HOOK_CTX_TIMESTAMP": second["timestamp"]}


async def test_http_hook_gets_a_post(fleet: Fleet, server: Server, model: dict[str, str]) -> None:
    bodies: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    serving = threading.Thread(target=httpd.serve_forever)
    serving.start()
    try:
        hooks = {"on_diff": [f"http://127.0.0.1:{httpd.server_address[1]}/hook"]}
        await fleet.snapshots.tick("web", hooks=hooks)
        model["model"] = "m3"
        snap = await fleet.snapshots.tick("web", hooks=hooks)
        assert snap is not None
        await until(lambda: bool(bodies))
    finally:
        httpd.shutdown()
        serving.join()
        httpd.server_close()
    assert bodies == [{"agent": "web", "hook": "on_diff",
                       "context": {"diff_fields": snap["diff_fields"], "timestamp": snap["timestamp"]}}]


async def test_tick_never_raises_and_hook_failures_are_swallowed(
        fleet: Fleet, server: Server, tmp_path: Path, model: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "fleetlog.snapshots")
    assert await fleet.snapshots.tick("") is None  # a bad agent name: logged, not raised
    assert "snapshot tick for" in caplog.text
    await fleet.snapshots.tick("fails")
    model["model"] = "m4"
    hooks = {"on_diff": [str(tmp_path / "no-such-command"), "http://127.0.0.1:9/refused"]}
    snap = await fleet.snapshots.tick("fails", hooks=hooks)
    assert snap is not None and snap["has_diff"]
    await until(lambda: caplog.text.count("on_diff hook for fails failed") == 2)
    assert hook_commands({"hooks": {"on_diff": ["a b", "c"]}}) == ["a b", "c"]  # a whole config file
    assert hook_commands({"on_diff": "one"}) == ["one"]
    for nothing in (None, [], {"on_diff": None}, {"on_diff": []}, {"other": ["x"]}):
        assert hook_commands(nothing) == [] and fire("a", "on_diff", hook_commands(nothing), {}) == []


async def test_status_reads_the_view_and_hides_hooks(fleet: Fleet, server: Server) -> None:
    hooks = {"on_diff": ["notify --token s3cret", "https://hooks.example/x?key=s3cret"]}
    assert await fleet.snapshots.status("st", hooks=hooks) == {"snapshot": None, "hooks_configured": {"on_diff": 2}}
    taken = await fleet.snapshots.take("st", {"x": 1})
    status = await fleet.snapshots.status("st", hooks=hooks)
    assert status == {"snapshot": taken, "hooks_configured": {"on_diff": 2}}
    assert "s3cret" not in json.dumps(status)
    assert (await fleet.snapshots.status("st"))["hooks_configured"] == {"on_diff": 0}
