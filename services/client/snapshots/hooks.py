"""The agent container's hook contract, for `on_diff`: shell commands and http(s) URLs.

A shell command is split on whitespace (no shell) and run with the agent's environment
plus `SCITEX_AGENT_NAME`, `SAC_NAME` (the agent), `SCITEX_HOOK` (the hook's name) and
`SCITEX_HOOK_CTX_<KEY>` per context key (strings as they are, anything else as JSON).
An http(s) URL gets a POST of JSON `{agent, hook, context}`. `fire` hands the runs to a
bounded pool and returns at once (the taker is never slowed, a failure is logged and
swallowed); `run_hook` runs one and reports, for `watch --exec`, which acks only after.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import urllib.request
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
from fleetlog.services.client import activity

__all__ = ["fire", "hook_commands", "load_hooks_file", "run_hook"]

log = logging.getLogger("fleetlog.snapshots")

HOOK_TIMEOUT_S = 60.0
POOL_WORKERS = 4
MAX_PENDING = 256  # runs queued or running; past this a hook run is dropped (logged), never queued unbounded
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_pending = threading.BoundedSemaphore(MAX_PENDING)


def hook_commands(hooks: Any, name: str = "on_diff") -> list[str]:
    """The commands configured for `name` in `hooks`: the container's `hooks` mapping, an object with
    a `.hooks` mapping, or a whole config file's `{"hooks": {...}}`."""
    if hooks is None:
        return []
    if not isinstance(hooks, Mapping):
        hooks = getattr(hooks, "hooks", None)
        if not isinstance(hooks, Mapping):
            return []
    if name not in hooks and isinstance(hooks.get("hooks"), Mapping):
        hooks = hooks["hooks"]
    value = hooks.get(name)
    if not value:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value if v]


def load_hooks_file(path: Path) -> dict[str, Any]:
    """The `hooks` mapping of a container config file, YAML or JSON: `{"hooks": {"on_diff": [...]}}`."""
    text = path.read_text()
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        try:  # msgspec.yaml reads through PyYAML (a dependency since issue 11)
            doc = msgspec.yaml.decode(text)
        except msgspec.DecodeError as exc:
            raise ValueError(f"{path}: neither JSON nor YAML: {exc}") from None
    if not isinstance(doc, Mapping) or not isinstance(doc.get("hooks", {}), Mapping):
        raise ValueError(f"{path}: hooks file must be a mapping with a `hooks` mapping")
    return dict(doc.get("hooks") or {})


def _env(agent: str, hook: str, context: Mapping[str, Any]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(SCITEX_AGENT_NAME=agent, SAC_NAME=agent, SCITEX_HOOK=hook)
    for key, value in context.items():
        env[f"SCITEX_HOOK_CTX_{key.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    return env


def run_hook(agent: str, hook: str, command: str, context: Mapping[str, Any]) -> bool:
    """Run one hook command or POST to one URL; True when it succeeded (failures are logged)."""
    try:
        if command.startswith(("http://", "https://")):
            body = json.dumps({"agent": agent, "hook": hook, "context": dict(context)}).encode()
            req = urllib.request.Request(command, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=HOOK_TIMEOUT_S) as resp:
                ok = bool(200 <= resp.status < 300)
        else:
            argv = command.split()
            done = subprocess.run(argv, env=_env(agent, hook, context), timeout=HOOK_TIMEOUT_S, check=False,
                                  stdin=subprocess.DEVNULL, capture_output=True)
            ok = done.returncode == 0
        if not ok:
            log.warning("%s hook for %s failed: %s", hook, agent, _redact(command))
    except Exception as exc:
        log.warning("%s hook for %s failed: %s: %s", hook, agent, _redact(command), exc)
        ok = False
    activity.count(activity.HOOK_RUNS, hook, "ok" if ok else "failed")
    return ok


def _redact(command: str) -> str:
    """The command's first word only: URLs and arguments may carry secrets."""
    return command.split("?")[0].split()[0] if command.strip() else "(empty)"


def _get_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=POOL_WORKERS, thread_name_prefix="fleetlog-hook")
        return _pool


def fire(agent: str, hook: str, commands: list[str], context: Mapping[str, Any]) -> list[Future[bool]]:
    """Fire-and-forget: each command to the bounded pool; returns at once (the futures, for tests)."""
    futures: list[Future[bool]] = []
    for command in commands:
        if not _pending.acquire(blocking=False):
            log.warning("%s hook for %s dropped: %d runs already pending", hook, agent, MAX_PENDING)
            activity.count(activity.HOOK_RUNS, hook, "dropped")
            continue
        try:
            future = _get_pool().submit(run_hook, agent, hook, command, dict(context))
        except RuntimeError as exc:  # the interpreter is shutting down
            _pending.release()
            log.warning("%s hook for %s not started: %s", hook, agent, exc)
            continue
        future.add_done_callback(lambda _f: _pending.release())
        futures.append(future)
    return futures
