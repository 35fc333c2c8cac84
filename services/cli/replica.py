"""`fleetlog replica PATH` and `fleetlog export DIR`: the views in a file of your own."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import NoReturn

import click
import duckdb
from fleetlog.services.query.replica import ReplicaProgress, export_views, fold_replica

from ._common import Exit, console, exit_code_of, fail, json_option, nats_option, print_json, settings_from
from .progress import FoldProgress

__all__ = ["export", "replica"]


def _io_failed(path: Path, exc: duckdb.IOException) -> NoReturn:
    """DuckDB's file lock held by another process is "lock busy" (4); other I/O errors are errors.
    DuckDB says which only in its message ("Could not set lock on file ...")."""
    if "lock" in str(exc).lower():
        fail(Exit.REFUSED, f"{path} is in use by another process: {exc}")
    fail(Exit.ERROR, f"{path}: {exc}")


@click.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--follow", is_flag=True, help="keep folding new events until Ctrl-C, publishing a new copy of PATH")
@click.option("--every", "every_s", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              help="with --follow: seconds between copies (only when something new was folded)")
@nats_option
@json_option
def replica(path: Path, follow: bool, every_s: float, nats_url: str | None, as_json: bool) -> None:
    """Fold every view and publish them as the DuckDB file PATH, up to the streams' current end
    (and on, with --follow, printing each copy). The fold runs in PATH.folding; PATH is a
    consistent copy that any DuckDB client opens read-only while this runs:
    `duckdb -readonly PATH 'SELECT * FROM attempts'`."""
    settings = settings_from(nats_url)
    report = _progress_json if as_json else _progress_text
    try:
        with FoldProgress(f"replica {path}", as_json=as_json) as progress:
            position = asyncio.run(fold_replica(settings, path, follow=follow, interval_s=every_s,
                                                on_progress=report if follow else None, on_fold=progress.update))
    except KeyboardInterrupt:
        return
    except duckdb.IOException as exc:
        _io_failed(path, exc)
    except (OSError, TimeoutError) as exc:  # NATS away (5), a path we may not write (4), ...
        fail(exit_code_of(exc), str(exc))
    result = {"path": str(path), "streams": position}
    print_json(result) if as_json else console.print(f"{path}: folded up to {position}")


def _progress_json(p: ReplicaProgress) -> None:
    """One JSON line per copy (a follower's output is read as it comes, so no indenting)."""
    line = {"path": str(p.path), "copy": p.copies, "copy_s": round(p.copy_s, 3), "rows": p.rows,
            "streams": {s: {"folded": f, "last": last} for s, (f, last) in p.streams.items()}}
    click.echo(json.dumps(line, sort_keys=True))
    sys.stdout.flush()


def _progress_text(p: ReplicaProgress) -> None:
    streams = ", ".join(f"{s.removeprefix('FLEET_').lower()} {f}/{last}" for s, (f, last) in sorted(p.streams.items()))
    rows = ", ".join(f"{t} {n}" for t, n in sorted(p.rows.items()))
    click.echo(f"copy {p.copies} -> {p.path} ({p.copy_s:.2f}s): folded/last {streams}; rows {rows}")
    sys.stdout.flush()


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
        with FoldProgress(f"export {directory}", as_json=as_json) as progress:
            watermark = asyncio.run(export_views(settings, directory, replica=replica_path, on_fold=progress.update))
    except duckdb.IOException as exc:
        _io_failed(replica_path or directory, exc)
    except (OSError, TimeoutError) as exc:
        fail(exit_code_of(exc), str(exc))
    if as_json:
        print_json(watermark)
        return
    console.print(f"wrote {len(watermark['files'])} tables to {directory} (streams {watermark['streams']})")  # type: ignore[arg-type]
