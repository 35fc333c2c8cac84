"""What every command shares: settings from options/env, one client, --json output, exit codes."""

from __future__ import annotations

import asyncio
import enum
import json
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, ParamSpec, TypeVar

import click
import msgspec
import nats.errors
from fleetlog.services.backbone.config import FleetSettings
from fleetlog.services.backbone.errors import (
    FleetError,
    FleetRefused,
    FleetUnavailable,
    FleetValidationError,
    QueryError,
    StaleError,
    StaleHolderError,
)
from fleetlog.services.client.fleet import Fleet
from fleetlog.services.client.processors.lock import ProcessorLockBusy, ProcessorLockLost
from fleetlog.services.client.state import StatePolicyError
from fleetlog.services.writepath.publisher import Token
from nats.aio.client import Client
from rich.console import Console
from rich.markup import escape

__all__ = ["CliOptions", "Exit", "console", "err_console", "exit_code_of", "fail", "json_option", "nats_option",
           "print_json", "run_client", "settings_from", "show", "state_rule_code"]

P = ParamSpec("P")
T = TypeVar("T")
S = TypeVar("S")

console = Console()
err_console = Console(stderr=True)


class Exit(enum.IntEnum):
    """What a `fleetlog` exit code means: one table for every command (docs/cli.md says which
    command uses which code and when; keep the two in step)."""

    OK = 0  # done (for `emit` with the broker away: spooled, it will be delivered)
    ERROR = 1  # something unexpected failed (the message says what); a confirmation answered "no"
    USAGE = 2  # bad arguments or bad input: nothing was done (click's own code for usage errors)
    NOT_FOUND = 3  # what was named does not exist (run, runtime, key, seq, hash, snapshot); nothing to claim
    REFUSED = 4  # not allowed now: stale claim, lost lease, lock busy, policy or permission denied, terminal state
    UNAVAILABLE = 5  # the broker or the query service did not answer (within --timeout)
    STALE = 6  # the view did not reach the requested min_seq within the bounded wait


@dataclass(frozen=True)
class CliOptions:
    """The `fleetlog` group's global options, handed to every command through click's ctx.obj."""

    timeout_s: float | None = None  # --timeout / FLEETLOG_TIMEOUT: bounds connect, each request and each flush


def fail(code: Exit, message: str) -> NoReturn:
    """Print `message` on stderr and exit with `code`."""
    # escape: a message quoting a value ("[1, 2]", a key "[x]") is text, not rich markup.
    err_console.print(f"[red]error:[/red] {escape(message)}" if code != Exit.OK else escape(message), highlight=False)
    sys.exit(int(code))


# The nats-py errors that mean "no broker to talk to", as opposed to a bug or a refusal.
_NATS_AWAY = (nats.errors.NoServersError, nats.errors.ConnectionClosedError, nats.errors.StaleConnectionError,
              nats.errors.UnexpectedEOF, nats.errors.ConnectionReconnectingError, nats.errors.NoRespondersError)


def state_rule_code(field: str) -> Exit:
    """A state rule's code: the binding policy refusing is REFUSED; a missing identity, an unknown
    scope or a too-big value is bad input (USAGE). The field names which rule it was."""
    return Exit.REFUSED if field.startswith("binding.state_policy") else Exit.USAGE


def exit_code_of(exc: BaseException) -> Exit:
    """The table's code for an exception a command let through (most specific class first)."""
    if isinstance(exc, StaleError):  # a TimeoutError too: before UNAVAILABLE
        return Exit.STALE
    if isinstance(exc, FleetRefused | StaleHolderError | PermissionError | ProcessorLockBusy | ProcessorLockLost):
        return Exit.REFUSED
    if isinstance(exc, StatePolicyError):
        return state_rule_code(exc.field)
    if isinstance(exc, FleetValidationError):
        return Exit.USAGE
    if isinstance(exc, QueryError):  # the service's own codes: 404 unknown name, 408 its time limit
        return {"404": Exit.NOT_FOUND, "408": Exit.UNAVAILABLE}.get(exc.code, Exit.ERROR)
    if isinstance(exc, (FleetUnavailable, TimeoutError, ConnectionError, *_NATS_AWAY)):
        return Exit.UNAVAILABLE
    if isinstance(exc, LookupError):
        return Exit.NOT_FOUND
    # The library raises ValueError for bad arguments; msgspec's decode errors are ValueErrors
    # too, but they mean an answer that did not decode: unexpected, not the caller's input.
    if isinstance(exc, ValueError) and not isinstance(exc, msgspec.MsgspecError):
        return Exit.USAGE
    return Exit.ERROR


def nats_option(fn: Callable[P, T]) -> Callable[P, T]:
    return click.option(
        "--nats", "nats_url", default=None, envvar="FLEETLOG_NATS_URL",
        help="NATS server URL(s) [env FLEETLOG_NATS_URL; default nats://127.0.0.1:4222]",
    )(fn)


def json_option(fn: Callable[P, T]) -> Callable[P, T]:
    return click.option("--json", "as_json", is_flag=True, help="print the result as JSON (the API's keys)")(fn)


def settings_from(nats_url: str | None, **extra: Any) -> FleetSettings:
    overrides = {k: v for k, v in extra.items() if v is not None}
    if nats_url:
        overrides["nats_url"] = nats_url
    return FleetSettings(**overrides)


def print_json(value: Any) -> None:
    click.echo(msgspec.json.format(msgspec.json.encode(value), indent=2).decode())


def show(value: Any, as_json: bool, missing: str | None = None, code: Exit = Exit.NOT_FOUND) -> None:
    """One result: JSON with the API's keys, or `key: value` lines. A None result means what was
    asked did not happen: `missing` goes to stderr and the command exits with `code` (with
    --json, stdout still carries the API's answer, `null`)."""
    if as_json:
        print_json(value)
    elif value is not None:
        for key, item in msgspec.to_builtins(value).items():
            if key in ("as_of", "lag"):
                continue
            console.print(f"[bold]{key}[/bold]: {json.dumps(item) if isinstance(item, dict | list) else item}")
    if value is None:
        fail(code, missing or "no result")


def cli_options() -> CliOptions:
    """The group's options for the running command (defaults outside a `fleetlog` invocation)."""
    ctx = click.get_current_context(silent=True)
    found = ctx.find_object(CliOptions) if ctx is not None else None
    return found if found is not None else CliOptions()


class _BoundedFleet(Fleet):
    """`Fleet` whose every wait on the broker or the query service is --timeout: waiting for the
    connection, each query-service request, and each flush (waiting for JetStream's acks)."""

    timeout_s: float | None = None

    async def nats(self, timeout: float = 2.0) -> Client:
        return await super().nats(timeout if self.timeout_s is None else self.timeout_s)

    async def request(self, subject: str, body: msgspec.Struct, reply_type: type[S], timeout: float = 10.0) -> S:
        return await super().request(subject, body, reply_type, timeout if self.timeout_s is None else self.timeout_s)

    async def flush(self, timeout: float | None = 30.0) -> Token:
        return await super().flush(timeout if self.timeout_s is None else self.timeout_s)


def run_client(nats_url: str | None, fn: Callable[[Fleet], Awaitable[T]]) -> T:
    """Connect, run fn, close; fleetlog errors become a clear message and the table's exit code.

    The group's --timeout (ctx.obj) bounds the wait for the connection, each request and each
    flush; when one passes, the command exits UNAVAILABLE and says which timeout it was.
    """
    timeout_s = cli_options().timeout_s

    async def main() -> T:
        fleet = await _BoundedFleet.connect(settings=settings_from(nats_url), name="fleetlog-cli", ensure=False)
        assert isinstance(fleet, _BoundedFleet)
        fleet.timeout_s = timeout_s
        try:
            return await fn(fleet)
        finally:
            # Bounded too: what is not acked by then stays in the spool for the next client.
            await fleet.close(10.0 if timeout_s is None else timeout_s)

    try:
        return asyncio.run(main())
    except (FleetError, ValueError, TimeoutError, LookupError, PermissionError, ConnectionError,
            nats.errors.Error) as exc:
        code = exit_code_of(exc)
        message = str(exc) or type(exc).__name__
        if code == Exit.UNAVAILABLE and timeout_s is not None:
            message = f"{message} (--timeout {timeout_s:g}s)"
        fail(code, message)

