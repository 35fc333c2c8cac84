"""What every command shares: settings from options/env, one client, --json output."""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

import click
import msgspec
from fleetlog.services.backbone.config import FleetSettings
from fleetlog.services.backbone.errors import FleetError
from fleetlog.services.client.fleet import Fleet
from rich.console import Console

__all__ = ["console", "json_option", "nats_option", "print_json", "run_client", "settings_from"]

P = ParamSpec("P")
T = TypeVar("T")

console = Console()
err_console = Console(stderr=True)


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
    """Connect, run fn, close; fleetlog errors become a clear message and exit code 1."""

    async def main() -> T:
        fleet = await Fleet.connect(settings=settings_from(nats_url), name="fleetlog-cli", ensure=False)
        try:
            return await fn(fleet)
        finally:
            await fleet.close()

    try:
        return asyncio.run(main())
    except (FleetError, ValueError, TimeoutError) as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        sys.exit(1)


def async_command(fn: Callable[P, Awaitable[T]]) -> Callable[P, T]:
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        return asyncio.run(fn(*args, **kwargs))  # type: ignore[arg-type]

    return wrapper
