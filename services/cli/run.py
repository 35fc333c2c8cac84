"""`fleetlog up` and `fleetlog serve`."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime
from pathlib import Path

import click
import duckdb
from fleetlog.services.backbone.errors import FleetError
from fleetlog.services.node.broker import BrokerError
from fleetlog.services.node.server import run_serve, run_up

from ._common import err_console, settings_from
from .scheduler import jobs_option, load_jobs_or_fail

__all__ = ["serve", "up"]


class _JsonLines(logging.Formatter):
    """One JSON object per log record (`--log-json`): for log shippers, not for eyes."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
                "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def _logging(verbose: bool, as_json: bool = False) -> None:
    handler = logging.StreamHandler()
    text = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(_JsonLines() if as_json else text)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])


log_json_option = click.option("--log-json", is_flag=True, help="log one JSON object per line (default: text)")


http_option = click.option(
    "--http", "http", default=None, metavar="HOST:PORT",
    help="serve the dashboard and /metrics here [env FLEETLOG_HTTP; default 127.0.0.1:4280]",
)
no_http_option = click.option("--no-http", is_flag=True, help="no dashboard, no /metrics")


def _http(http: str | None, no_http: bool) -> str | None:
    return "off" if no_http else http


sessions_option = click.option(
    "--sessions", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="also answer processors.run requests over this session dir [env FLEETLOG_PROCESSOR_SESSIONS]",
)


@click.command()
@click.option("--port", type=int, default=None, help="embedded broker port [env FLEETLOG_PORT; default 4222]")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="views, spool and broker data [env FLEETLOG_DATA_DIR; default: the user data dir]")
@click.option("--cluster", "cluster", type=click.IntRange(min=1), default=None,
              help="a loopback JetStream cluster of N nats-servers (3 for R3 streams): the first on --port, "
                   "the others on free ports (all printed); the services use all of them")
@click.option("--secure", is_flag=True,
              help="users and permissions: every client needs credentials (`fleetlog identities add`); "
                   "admin and service identities are made on the first start (docs/security.md)")
@sessions_option
@jobs_option
@http_option
@no_http_option
@log_json_option
@click.option("-v", "--verbose", is_flag=True)
def up(port: int | None, data_dir: Path | None, cluster: int | None, secure: bool, sessions: Path | None,
       jobs_path: Path | None, http: str | None, no_http: bool, log_json: bool, verbose: bool) -> None:
    """Start nats-server (JetStream, 127.0.0.1) plus projector, query service and dashboard; Ctrl-C stops all."""
    _logging(verbose, log_json)
    settings = settings_from(None, port=port, data_dir=data_dir, processor_sessions=sessions,
                             http=_http(http, no_http))
    jobs = load_jobs_or_fail(jobs_path)
    try:
        asyncio.run(run_up(settings, jobs=jobs, cluster=cluster or 0, secure=secure))
    except duckdb.IOException as exc:
        err_console.print(f"[red]error:[/red] the views file is in use by another fleetlog process: {exc}")
        raise SystemExit(1) from None
    except (BrokerError, FleetError) as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        pass


@click.command()
@click.option("--nats", "nats_url", default=None, envvar="FLEETLOG_NATS_URL",
              help="NATS server URL(s), comma separated: nats://a:4222,nats://b:4222 (a cluster's nodes)")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="where the view files live [env FLEETLOG_DATA_DIR]")
@click.option("--credentials", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              envvar="FLEETLOG_CREDENTIALS",
              help="connect as this identity (the `service` role's credentials file) [env FLEETLOG_CREDENTIALS]")
@sessions_option
@jobs_option
@http_option
@no_http_option
@log_json_option
@click.option("-v", "--verbose", is_flag=True)
def serve(nats_url: str | None, data_dir: Path | None, credentials: Path | None, sessions: Path | None,
          jobs_path: Path | None, http: str | None, no_http: bool, log_json: bool, verbose: bool) -> None:
    """Projector + query service (+ dashboard) against an external NATS (broker deployed separately)."""
    _logging(verbose, log_json)
    settings = settings_from(nats_url, data_dir=data_dir, processor_sessions=sessions, http=_http(http, no_http))
    if credentials is not None:
        settings = settings.model_copy(update={"credentials": credentials})
    jobs = load_jobs_or_fail(jobs_path)
    try:
        asyncio.run(run_serve(settings, jobs=jobs))
    except duckdb.IOException as exc:
        err_console.print(f"[red]error:[/red] the views file is in use by another fleetlog process: {exc}")
        raise SystemExit(1) from None
    except (OSError, TimeoutError) as exc:
        err_console.print(f"[red]error:[/red] cannot reach NATS at {settings.nats_url}: {exc}")
        raise SystemExit(1) from None
    except FleetError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        pass
