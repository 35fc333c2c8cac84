"""What every command shares: settings from options/env, one client, --json output."""

from __future__ import annotations

import asyncio
import enum
import functools
import sys
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, ParamSpec, TypeVar

import click
import msgspec
from fleetlog.services.backbone.config import FleetSettings
from fleetlog.services.backbone.errors import (
    FleetError,
    FleetUnavailable,
    FleetValidationError,
    StaleError,
    StaleHolderError,
)
from fleetlog.services.client.fleet import Fleet
from rich.console import Console

__all__ = ["Exit", "console", "fail", "json_option", "nats_option", "print_json", "run_client", "settings_from"]

P = ParamSpec("P")
T = TypeVar("T")

console = Console()
err_console = Console(stderr=True)


class Exit(enum.IntEnum):
    """What a `fleetlog` exit code means: one table for every command (docs/cli.md)."""

    OK = 0  # done (for `emit` with the broker away: spooled, it will be delivered)
    ERROR = 1  # something unexpected failed (the message says what)
    USAGE = 2  # bad arguments or bad input: nothing was done (click's own code for usage errors)
    NOT_FOUND = 3  # what was named does not exist (run, runtime, key, seq, hash)
    REFUSED = 4  # not allowed now: stale claim, lost lease, lock busy, policy or permission denied
    UNAVAILABLE = 5  # the broker or the query service did not answer (within --timeout)
    STALE = 6  # the view did not reach the requested min_seq within the bounded wait


def fail(code: Exit, message: str) -> NoReturn:
    """Print `message` on stderr and exit with `code`."""
    err_console.print(f"[red]error:[/red] {message}" if code != Exit.OK else message)
    sys.exit(int(code))


def exit_code_of(exc: BaseException) -> Exit:
    """The table's code for an exception a command let through."""
    if isinstance(exc, StaleError):
        return Exit.STALE
    if isinstance(exc, FleetValidationError):
        return Exit.USAGE
    if isinstance(exc, StaleHolderError | PermissionError):
        return Exit.REFUSED
    if isinstance(exc, FleetUnavailable | TimeoutError | ConnectionError):
        return Exit.UNAVAILABLE
    if isinstance(exc, LookupError):
        return Exit.NOT_FOUND
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


def run_client(nats_url: str | None, fn: Callable[[Fleet], Awaitable[T]]) -> T:
    """Connect, run fn, close; fleetlog errors become a clear message and the table's exit code."""

    async def main() -> T:
        fleet = await Fleet.connect(settings=settings_from(nats_url), name="fleetlog-cli", ensure=False)
        try:
            return await fn(fleet)
        finally:
            await fleet.close()

    try:
        return asyncio.run(main())
    except (FleetError, ValueError, TimeoutError, LookupError, PermissionError, ConnectionError) as exc:
        fail(exit_code_of(exc), str(exc))


def async_command(fn: Callable[P, Awaitable[T]]) -> Callable[P, T]:
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        return asyncio.run(fn(*args, **kwargs))  # type: ignore[arg-type]

    return wrapper
