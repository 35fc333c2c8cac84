"""Settings, from the environment (`FLEETLOG_` prefix) or keyword arguments."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import platformdirs
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .nkeyauth import Identity, Servers

__all__ = ["FleetSettings", "default_data_dir", "split_http"]


def split_http(value: str) -> tuple[str, int]:
    """'HOST:PORT' (IPv6 as '[::1]:4280') → (host, port); ValueError naming the rule."""
    parts = urlsplit(f"//{value.strip()}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise ValueError(f"http must be HOST:PORT with a port 0-65535 (or 'off'), got {value!r}")
    return parts.hostname, port


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("fleetlog", appauthor=False))


class FleetSettings(BaseSettings):
    """Everything fleetlog can be told. Env: `FLEETLOG_NATS_URL`, `FLEETLOG_DATA_DIR`, ..."""

    model_config = SettingsConfigDict(env_prefix="FLEETLOG_", extra="ignore")

    nats_url: str = Field("nats://127.0.0.1:4222", description="NATS server(s), comma separated")
    data_dir: Path = Field(default_factory=default_data_dir, description="views, spool, embedded broker data")
    port: int = Field(4222, description="port of the embedded broker (`fleetlog up`)")
    credentials: Path | None = Field(
        None, description="an nkey seed file from `fleetlog identities add` (a secure broker's user); every "
        "connection of this process authenticates with it"
    )
    stream_replicas: int = Field(
        1, ge=1, le=5, description="JetStream replicas of every stream (1 on one server; 3 on a cluster)"
    )

    # retention
    attempts_max_age_days: float = Field(30.0, gt=0)
    snapshots_max_age_days: float = Field(30.0, gt=0)
    rejects_max_age_days: float = Field(30.0, gt=0)
    retention_interval_s: float = Field(
        60.0, gt=0, description="how often views drop rows whose messages aged out of their stream"
    )

    # client / publisher
    pane_max_chars: int = Field(4096, ge=1, description="pane texts keep their last N characters")
    max_event_bytes: int = Field(512 * 1024, ge=1024, description="largest encoded event accepted")
    publish_max_inflight: int = Field(8192, ge=1, description="unacked JetStream publishes in flight")
    publish_queue_max: int = Field(200_000, ge=1, description="events held in memory before spilling to disk")
    publish_ack_timeout_s: float = Field(5.0, gt=0)
    publish_retry_s: float = Field(
        10.0, ge=0, description="a publish refused as transient (no stream leader: 503, ack timeout) is retried in "
        "memory, same Nats-Msg-Id, for this long before it goes to the spool (a cluster's leader election)"
    )
    spool_dir: Path | None = Field(None, description="default: <data_dir>/spool")
    spool_max_bytes: int = Field(1 << 30, ge=1 << 20, description="disk cap of the local spool")

    # process end (docs/architecture.md, "Write path 1": nothing recorded is lost when the process ends)
    exit_flush_s: float = Field(
        3.0, ge=0, description="at a process end without close(): how long to try to deliver before spooling the rest"
    )
    exit_on_sigterm: bool = Field(
        True, description="turn SIGTERM into a normal exit (flush + spool) when the application set no handler"
    )
    durable: bool = Field(
        False, description="record() returns only once the event is written to the spool file (survives SIGKILL)"
    )
    durable_fsync: bool = Field(False, description="with durable: fsync each record too (survives power loss)")

    # projector
    batch_max: int = Field(5000, ge=1, description="events per fold transaction")
    batch_wait_s: float = Field(0.02, gt=0, description="longest wait to fill a batch")
    gil_switch_interval_s: float = Field(
        0.0005, ge=0, le=0.1,
        description="a node process's GIL hand-off interval (sys.setswitchinterval; 0: Python's 5 ms). The fold's "
        "DuckDB threads re-take the GIL many times per batch while the prepare thread decodes the next one: "
        "0.5 ms measured +12-15 % replay fold rate (docs/benchmarks.md, issue 19)")

    # query service
    query_wait_max_s: float = Field(5.0, ge=0, description="bounded wait for min_seq (read-your-writes)")
    sql_max_rows: int = Field(10_000, ge=1)
    sql_timeout_s: float = Field(10.0, gt=0)

    # reactors (lease sweeper, stale-runtime marker)
    reactors: bool = Field(True, description="run the reactors in `up`/`serve`")
    reactor_interval_s: float = Field(1.0, gt=0, description="how often each reactor looks for work")
    processor_sessions: Path | None = Field(
        None, description="`up`/`serve` also answer processors.run requests over this session dir (with the reactors)"
    )
    nats_wait_s: float | None = Field(
        None, ge=0, description="how long `serve` waits for NATS at start (None: until it comes or a signal)"
    )

    # dashboard and /metrics (services/dashboard/): not 8222, nats-server's monitoring port
    http: str = Field("127.0.0.1:4280", description="HOST:PORT of `up`/`serve`'s dashboard and /metrics; "
                      "'off' (or empty) turns it off")
    http_open: bool = Field(False, description="serve the dashboard without a login on a non-loopback address "
                            "of an open node (e.g. behind your own authenticating proxy)")

    @field_validator("http")
    @classmethod
    def _http(cls, value: str) -> str:
        if value.strip().lower() not in ("", "off"):
            split_http(value)
        return value.strip()

    def http_address(self) -> tuple[str, int] | None:
        """(host, port) of the dashboard, None when it is off."""
        return None if self.http.lower() in ("", "off") else split_http(self.http)

    def servers(self) -> Servers:
        """The server URLs and, with credentials, the identity: every connection (nats-py, the
        publisher's and the projector's raw wires) takes both from this one list, so none needs
        its own way to authenticate (services/backbone/nkeyauth.py)."""
        urls = [s.strip() for s in self.nats_url.split(",") if s.strip()]
        return Servers(urls, None if self.credentials is None else Identity.load(self.credentials))

    def resolved_spool_dir(self) -> Path:
        return self.spool_dir if self.spool_dir is not None else self.data_dir / "spool"

    def views_path(self) -> Path:
        return self.data_dir / "views" / "fleetlog.duckdb"
