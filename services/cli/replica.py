"""`fleetlog replica PATH` and `fleetlog export DIR`: the views in a file of your own."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click
import duckdb
from fleetlog.services.query.replica import export_views, fold_replica

from ._common import console, err_console, json_option, nats_option, print_json, settings_from

__all__ = ["export", "replica"]


@click.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--follow", is_flag=True, help="keep folding new events until Ctrl-C")
@nats_option
@json_option
def replica(path: Path, follow: bool, nats_url: str | None, as_json: bool) -> None:
    """Fold every view into the DuckDB file PATH, up to the streams' current end (and on, with
    --follow). Open it with any DuckDB client: `SELECT * FROM attempts`."""
    settings = settings_from(nats_url)
    try:
        position = asyncio.run(fold_replica(settings, path, follow=follow))
    except KeyboardInterrupt:
        return
    except duckdb.IOException as exc:
        err_console.print(f"[red]error:[/red] {path} is in use by another process: {exc}")
        raise SystemExit(1) from None
    except (OSError, TimeoutError) as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise SystemExit(1) from None
    result = {"path": str(path), "streams": position}
    print_json(result) if as_json else console.print(f"{path}: folded up to {position}")


@click.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--replica", "replica_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="fold into this replica file (reused by the next export) instead of one inside DIRECTORY")
@nats_option
@json_option
def export(directory: Path, replica_path: Path | None, nats_url: str | None, as_json: bool) -> None:
    """Write every view's tables as Parquet into DIRECTORY, with watermark.json (the stream
    sequences they contain)."""
    settings = settings_from(nats_url)
    try:
        watermark = asyncio.run(export_views(settings, directory, replica=replica_path))
    except (OSError, TimeoutError, duckdb.IOException) as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise SystemExit(1) from None
    if as_json:
        print_json(watermark)
        return
    console.print(f"wrote {len(watermark['files'])} tables to {directory} (streams {watermark['streams']})")  # type: ignore[arg-type]
