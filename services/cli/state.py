"""`fleetlog state get|set|del|list|snapshot|key`: scoped agent state from a shell.

Every command takes the event context and the binding as options (`--runner`,
`--conversation`, `--actor`, ..., `--binding`, `--scopes`, `--state-disabled`).
`--json` prints exactly the keys of the API's answer: `set` → `StateWrite`,
`get` → `fleet.state.entry()` (`found`, `value`, timestamps, `as_of`), `del` →
`StateDeletion`, `list` → `StateList`, `snapshot` → `StateSnapshot`.

Exit codes (docs/cli.md): `get` of a key that is not set and `del` of one that was not
set exit 3 (with --json too: the answer says `found`/`deleted` false); the binding policy
refusing a scope exits 4; a missing identity, an unknown scope or a bad value exit 2.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
from fleetlog.schemas.state import DEFAULT_STATE_SCOPES, StateBinding, StateContext, StatePolicy
from fleetlog.services.client.fleet import Fleet

from ._common import (
    Exit,
    console,
    err_console,
    fail,
    json_option,
    nats_option,
    print_json,
    run_client,
    state_rule_code,
)

__all__ = ["state"]

F = TypeVar("F", bound=Callable[..., Any])

_CONTEXT_OPTIONS = (
    ("--runner", "runner_id", "runner id (part of every scope key)"),
    ("--bot", "bot_id", "bot id"),
    ("--workspace", "workspace_id", "workspace id"),
    ("--conversation", "conversation_id", "conversation id (conversation scope)"),
    ("--thread", "thread_id", "thread id (conversation scope)"),
    ("--actor-type", "actor_type", "actor type (default: user)"),
    ("--actor", "actor_id", "actor id (actor scope)"),
    ("--subject-type", "subject_type", "subject type (default: unknown)"),
    ("--subject", "subject_id", "subject id (subject scope)"),
)


def identity_options(fn: F) -> F:
    """The event context and binding, as options."""
    for flag, dest, help_text in reversed(_CONTEXT_OPTIONS):
        fn = click.option(flag, dest, help=help_text)(fn)
    fn = click.option("--binding", "binding_id", help="binding id (isolates state between bindings)")(fn)
    fn = click.option("--binding-scope-type", help="binding scope type (identity when no --binding)")(fn)
    fn = click.option("--binding-scope-id", help="binding scope id (identity when no --binding)")(fn)
    fn = click.option("--scopes", default=",".join(DEFAULT_STATE_SCOPES), show_default=True,
                      help="scopes the binding policy enables (comma separated)")(fn)
    fn = click.option("--state-disabled", is_flag=True, help="the binding policy disables state")(fn)
    return fn


def _identity(kw: dict[str, Any]) -> tuple[StateContext, StateBinding]:
    if not kw.get("runner_id"):
        fail(Exit.USAGE, "--runner is required (every scope key includes the runner id)")
    context = StateContext(**{dest: kw.pop(dest) for _flag, dest, _h in _CONTEXT_OPTIONS})
    scopes = tuple(s.strip() for s in kw.pop("scopes").split(",") if s.strip())
    binding = StateBinding(
        binding_id=kw.pop("binding_id"), scope_type=kw.pop("binding_scope_type"),
        scope_id=kw.pop("binding_scope_id"),
        state_policy=StatePolicy(enable_state=not kw.pop("state_disabled"), state_scopes=scopes),
    )
    return context, binding


def _min_seq(values: tuple[str, ...]) -> dict[str, int] | None:
    """`--min-seq FLEET_STATE=12` (repeatable), a bare `12` (FLEET_STATE), or a JSON token."""
    token: dict[str, int] = {}
    for text in values:
        try:
            if text.lstrip().startswith("{"):
                token.update({str(k): int(v) for k, v in json.loads(text).items()})
            elif "=" in text:
                stream, _, seq = text.partition("=")
                token[stream.strip()] = int(seq)
            else:
                token["FLEET_STATE"] = int(text)
        except (ValueError, AttributeError, json.JSONDecodeError):
            fail(Exit.USAGE, f"--min-seq: {text!r} is not STREAM=SEQ, SEQ or a JSON token")
    return token or None


min_seq_option = click.option("--min-seq", "min_seq", multiple=True,
                              help="consistency token to wait for: FLEET_STATE=SEQ (from `state set --json`)")


@click.group()
def state() -> None:
    """Scoped agent state (conversation, actor, subject, runner)."""


@state.command("set")
@click.argument("scope")
@click.argument("key")
@click.argument("value")
@click.option("--raw", is_flag=True, help="store VALUE as a string instead of parsing it as JSON")
@identity_options
@nats_option
@json_option
def set_cmd(scope: str, key: str, value: str, raw: bool, nats_url: str | None, as_json: bool, **kw: Any) -> None:
    """Set KEY in SCOPE to VALUE (JSON; `-` reads stdin)."""
    context, binding = _identity(kw)
    text = sys.stdin.read() if value == "-" else value
    if raw:
        parsed: Any = text
    else:
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as exc:
            fail(Exit.USAGE, f"VALUE: not valid JSON ({exc}); use --raw to store it as a string")

    async def go(fleet: Fleet) -> Any:
        return await fleet.state.set(scope, key, parsed, context=context, binding=binding)

    result = run_client(nats_url, go)
    if as_json:
        print_json(result)
    else:
        click.echo(f"set {result.key} in {result.scope_key} at FLEET_STATE#{result.seq}")


@state.command("get")
@click.argument("scope")
@click.argument("key")
@identity_options
@min_seq_option
@nats_option
@json_option
def get_cmd(scope: str, key: str, min_seq: tuple[str, ...], nats_url: str | None, as_json: bool, **kw: Any) -> None:
    """Print KEY's value in SCOPE as JSON (exit 3 when it is not set; with --json, `found` says too)."""
    context, binding = _identity(kw)
    token = _min_seq(min_seq)

    async def go(fleet: Fleet) -> Any:
        return await fleet.state.entry(scope, key, context=context, binding=binding, min_seq=token)

    entry = run_client(nats_url, go)
    if as_json:
        print_json(entry)
    elif entry.found:
        click.echo(json.dumps(entry.value, ensure_ascii=False))
    if not entry.found:
        fail(Exit.NOT_FOUND, f"{entry.key!r} is not set in {entry.scope_key}")


@state.command("del")
@click.argument("scope")
@click.argument("key")
@identity_options
@nats_option
@json_option
def del_cmd(scope: str, key: str, nats_url: str | None, as_json: bool, **kw: Any) -> None:
    """Delete KEY in SCOPE (a tombstone); exit 3 when it was not set (nothing is written then)."""
    context, binding = _identity(kw)

    async def go(fleet: Fleet) -> Any:
        return await fleet.state.delete(scope, key, context=context, binding=binding)

    result = run_client(nats_url, go)
    if as_json:
        print_json(result)
    elif result.deleted:
        click.echo(f"deleted {result.key} from {result.scope_key} at FLEET_STATE#{result.seq}")
    if not result.deleted:
        fail(Exit.NOT_FOUND, f"{result.key!r} was not set in {result.scope_key}")


@state.command("list")
@click.argument("scope_key", required=False)
@click.option("--scope", help="derive the scope key from SCOPE and the identity options instead")
@click.option("--prefix", help="plain prefix (% and _ are literal)")
@click.option("--after", help="keys after this one (paging)")
@click.option("--limit", type=int, default=100, show_default=True, help="at most 100")
@identity_options
@min_seq_option
@nats_option
@json_option
def list_cmd(scope_key: str | None, scope: str | None, prefix: str | None, after: str | None, limit: int,
             min_seq: tuple[str, ...], nats_url: str | None, as_json: bool, **kw: Any) -> None:
    """Keys of one scope (SCOPE_KEY, or --scope with the identity options), ordered by key."""
    if (scope_key is None) == (scope is None):
        fail(Exit.USAGE, "give either SCOPE_KEY or --scope (with the identity options)")
    identity = _identity(kw) if scope is not None else None
    token = _min_seq(min_seq)

    async def go(fleet: Fleet) -> Any:
        key = scope_key
        if identity is not None and scope is not None:
            key = fleet.state.scope_key(scope, context=identity[0], binding=identity[1])
        assert key is not None
        return await fleet.state.list(key, prefix=prefix, limit=limit, after=after, min_seq=token)

    result = run_client(nats_url, go)
    if as_json:
        print_json(result)
        return
    for k in result.keys:
        click.echo(k)
    if result.has_more:
        err_console.print(f"[dim]more keys after {result.keys[-1]!r} (--after)[/dim]")


@state.command("snapshot")
@identity_options
@min_seq_option
@nats_option
@json_option
def snapshot_cmd(min_seq: tuple[str, ...], nats_url: str | None, as_json: bool, **kw: Any) -> None:
    """Every scope's state for this context and binding, as dicts."""
    context, binding = _identity(kw)
    token = _min_seq(min_seq)

    async def go(fleet: Fleet) -> Any:
        return await fleet.state.snapshot(context, binding, min_seq=token)

    snap = run_client(nats_url, go)
    if as_json:
        print_json(snap)
        return
    for scope in ("conversation", "actor", "subject", "runner"):
        values = getattr(snap, scope)
        console.print(f"[bold]{scope}[/bold] ({len(values)} keys)")
        for k, v in values.items():
            console.print(f"  {k} = {json.dumps(v, ensure_ascii=False)}", markup=False, highlight=False)


@state.command("key")
@click.argument("scope")
@identity_options
def key_cmd(scope: str, **kw: Any) -> None:
    """Print the scope key of SCOPE for this context and binding (no broker needed)."""
    from fleetlog.schemas.state import StateRuleViolation, binding_identity_of, check_scope

    context, binding = _identity(kw)
    try:
        click.echo(check_scope(scope, binding.state_policy, context, binding_identity_of(binding)))
    except StateRuleViolation as exc:
        fail(state_rule_code(exc.field), f"{exc.field}: {exc.rule}")
