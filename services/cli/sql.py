"""`fleetlog sql`: one read-only SELECT over the live views."""

from __future__ import annotations

import click
from fleetlog.schemas.answers import SqlAnswer
from fleetlog.services.backbone.errors import FleetValidationError, QueryError
from fleetlog.services.client.fleet import Fleet
from rich.table import Table

from ._common import console, json_option, nats_option, print_json, run_client

__all__ = ["sql"]


@click.command()
@click.argument("statement")
@click.option("--max-rows", type=int, default=None, help="at most this many rows (the service caps it too)")
@nats_option
@json_option
def sql(statement: str, max_rows: int | None, nats_url: str | None, as_json: bool) -> None:
    """Run one SELECT over the views' tables (attempts, runs, run_events, runtimes, state, ...).

    Read-only: one SELECT, the views' tables only, no files, with row and time limits.
    """

    async def go(fleet: Fleet) -> SqlAnswer:
        try:
            return await fleet.sql(statement, max_rows)
        except QueryError as exc:
            if exc.code == "413":  # a value too big for any reply: the statement must change (Exit.USAGE)
                raise FleetValidationError("sql", str(exc)) from None
            raise

    answer = run_client(nats_url, go)
    if as_json:
        print_json(answer)
        return
    table = Table(*answer.columns)
    for row in answer.rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    console.print(table)
    more = ""
    if answer.truncated:  # cut by the row limit, or to fit the reply into the connection's max_payload
        more = " (truncated to fit a reply: select fewer or smaller columns)" if answer.truncated_by == "max_payload" \
            else " (truncated: raise --max-rows)"
    console.print(f"{len(answer.rows)} rows{more}; as of {answer.as_of}, lag {answer.lag}")
