"""Running fleetlog: `serve` (projector + query service against any NATS) and `up`
(the same, on an embedded nats-server bound to loopback, or on a loopback cluster of
them: `up --cluster 3`, services/node/cluster.py)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from fleetlog.projections import ALL, Projection
from fleetlog.schemas.answers import CatchUp
from fleetlog.services.backbone.config import FleetSettings
from fleetlog.services.backbone.errors import FleetError
from fleetlog.services.backbone.link import connect_once
from fleetlog.services.backbone.streams import ensure_streams
from fleetlog.services.backbone.tasks import stop_tasks
from fleetlog.services.dashboard import Dashboard, NodeProbe
from fleetlog.services.node.broker import EmbeddedBroker
from fleetlog.services.node.cluster import LocalCluster
from fleetlog.services.node.reject_bursts import REJECT_LOG_S, watch_reject_bursts
from fleetlog.services.projector.runtime import Projector
from fleetlog.services.projector.store import ViewStore
from fleetlog.services.query.service import QueryService
from fleetlog.services.reactors.scheduler import Scheduler
from fleetlog.services.reactors.scheduler_jobs import JobsConfig, check_tick
from fleetlog.services.reactors.supervisor import Reactors
from fleetlog.services.writepath.receipt import PublisherStats
from nats.aio.client import Client

__all__ = ["Server", "run_scheduler", "run_serve", "run_up", "start_dashboard"]

log = logging.getLogger("fleetlog.server")


@dataclass
class Server:
    """The services of one fleetlog process, started and stopped in order.

    A node answers queries only once its views have caught up with the streams as of its
    start (services/query/service.py); `start()` waits for that (logging progress) unless
    `wait=False`, after which `serving()` waits. `fold_paused` starts with the fold held
    (`projector.resume()` lets it go): a view that is behind on purpose. With `jobs` that
    has jobs, the scheduler reactor runs them too (services/reactors/scheduler.py).
    """

    settings: FleetSettings
    projections: Sequence[Projection] = ALL
    fold_paused: bool = False
    jobs: JobsConfig | None = None
    reject_log_s: float = REJECT_LOG_S  # at most one log line per this many seconds about rejects

    async def start(self, *, wait: bool = True) -> None:
        s = self.settings
        self._watchers: list[asyncio.Task[None]] = []
        if self.jobs is not None:
            check_tick(self.jobs)  # a bad tick is refused before anything starts
        if s.gil_switch_interval_s > 0:  # the node owns its process (see the setting)
            sys.setswitchinterval(s.gil_switch_interval_s)
        self.nc = await _connect_waiting(s)
        await ensure_streams(self.nc, s)
        self.store = ViewStore(s.views_path())
        self.projector = Projector(
            self.store, self.projections, s.servers(), nc=self.nc,
            batch_max=s.batch_max, batch_wait_s=s.batch_wait_s, max_event_bytes=s.max_event_bytes,
            retention_interval_s=s.retention_interval_s, paused=self.fold_paused,
        )
        self.query = QueryService(self.nc, self.projector, wait_max_s=s.query_wait_max_s,
                                  sql_max_rows=s.sql_max_rows, sql_timeout_s=s.sql_timeout_s)
        self.reactors: Reactors | None = None
        self.scheduler: Scheduler | None = None
        if self.jobs is not None and self.jobs.jobs:
            self.scheduler = Scheduler(self.nc, self.jobs)
        await self.query.start()  # notes the streams' ends before the projector folds anything
        await self.projector.start()
        self._joining = asyncio.ensure_future(self._join())
        if wait:
            try:
                await self.serving()
            except BaseException:
                await self.stop()  # a signal while catching up: nothing left running
                raise
        log.info("fleetlog serving %s, views in %s", s.nats_url, s.views_path())

    async def serving(self) -> None:
        """Wait until this node answers queries (caught up, in the query group)."""
        await asyncio.shield(self._joining)

    async def _join(self) -> None:
        await self.query.join(progress=_log_progress)
        self._watchers.append(asyncio.create_task(
            watch_reject_bursts(self.nc, lambda: self.projector.fold_stats, self.reject_log_s), name="reject bursts"))
        if self.settings.reactors:  # they ask the views: only once these are caught up
            self.reactors = Reactors(self.settings)
            await self.reactors.start()
        if self.scheduler is not None:  # processors.run needs caught-up views too
            await self.scheduler.start()

    async def stop(self) -> None:
        """Stop the scheduler, the reactors and answering, let the projector commit its last batch, close the file."""
        log.info("fleetlog stopping (views in %s)", self.settings.views_path())
        await stop_tasks(self._watchers)
        if self.scheduler is not None:
            with contextlib.suppress(Exception):
                await self.scheduler.stop()
        if self.reactors is not None:
            with contextlib.suppress(Exception):
                await self.reactors.stop()
        self._joining.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._joining
        with contextlib.suppress(Exception):
            await self.query.stop()
        await self.projector.stop()
        with contextlib.suppress(Exception):
            await self.nc.drain()
        self.store.close()
        log.info("fleetlog stopped: folded %d events since the start", self.projector.folded_events)


def _log_progress(where: list[CatchUp]) -> None:
    left = [c for c in where if c.folded < c.target]
    said = ", ".join(f"{c.stream} {c.folded}/{c.target} ({100 * c.folded // max(1, c.target)}%)" for c in left)
    log.info("catching up (not answering queries yet): %s", said or "finishing")


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _connect_waiting(s: FleetSettings) -> Client:
    """Connect, waiting for NATS if it is not there yet (nats-py retries the first connect
    too): broker and services start in any order (compose, systemd). Says so in the log, and
    gives up after `nats_wait_s` (None: waits until a server answers or a signal comes)."""
    failures = 0
    connected = False

    async def on_error(exc: Exception) -> None:
        nonlocal failures
        if connected:
            log.debug("nats: %s", exc)  # later trouble: nats-py reconnects by itself
            return
        failures += 1
        if failures == 1 or failures % 20 == 0:
            log.warning("waiting for NATS at %s (%d attempts): %s", s.nats_url, failures, exc or type(exc).__name__)

    async def on_disconnect() -> None:
        if connected and not nc.is_closed:  # closing calls this too: not a loss
            log.warning("NATS connection lost (fleetlog-server, %s); reconnecting", s.nats_url)

    async def on_reconnect() -> None:
        url = nc.connected_url  # host and port only: the URL may carry the credentials' password
        log.info("NATS reconnected (fleetlog-server) to %s", f"{url.hostname}:{url.port}" if url else "?")

    connecting = connect_once(s.servers(), "fleetlog-server", timeout_s=5.0, error_cb=on_error,
                              disconnected_cb=on_disconnect, reconnected_cb=on_reconnect)
    try:
        nc = await (connecting if s.nats_wait_s is None else asyncio.wait_for(connecting, s.nats_wait_s))
    except TimeoutError:
        raise TimeoutError(f"no NATS server answered within {s.nats_wait_s}s ({failures} attempts)") from None
    connected = True
    if failures:
        log.info("NATS at %s answered after %d failed attempts", s.nats_url, failures)
    return nc


async def run_serve(settings: FleetSettings, ready: asyncio.Event | None = None,
                    jobs: JobsConfig | None = None) -> None:
    server = Server(settings, jobs=jobs)
    starting = asyncio.ensure_future(server.start())
    signalled = asyncio.ensure_future(_until_signalled())
    done, _ = await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
    if starting not in done:  # a signal while still waiting for NATS: stop waiting, nothing to stop
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        return
    if starting.exception() is not None:
        signalled.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await signalled
        raise starting.exception()  # type: ignore[misc]
    try:
        dashboard = await start_dashboard(server)
    except BaseException:
        signalled.cancel()
        await server.stop()
        raise
    if ready is not None:
        ready.set()
    try:
        await signalled
    finally:
        if dashboard is not None:
            await dashboard.stop()
        await server.stop()


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


async def start_dashboard(server: Server) -> Dashboard | None:
    """The web dashboard and /metrics on `settings.http` (services/dashboard/), unless off.

    An address asked for (--http, FLEETLOG_HTTP) that cannot be bound stops the start; the
    default one, taken (a second node on this host), only costs this node its dashboard."""
    address = server.settings.http_address()
    if address is None:
        return None
    if server.settings.credentials is None and not _loopback(address[0]) and not server.settings.http_open:
        # An open node has no logins to ask for: its pages (runs, panes, rejects) would be
        # anyone's who reaches the port. Issue 18: a login, or loopback only.
        raise FleetError(f"--http {address[0]}:{address[1]}: an open node's dashboard has no login, so it binds "
                         "to loopback only; run secure (`up --secure`, `serve --credentials`) for a reader login, "
                         "or set FLEETLOG_HTTP_OPEN=1 to serve it without one on purpose (behind your own proxy)")

    def counters() -> dict[str, int]:
        r = server.reactors
        return {} if r is None else {"swept": r.swept, "marked": r.marked}

    def publishers() -> list[tuple[str, PublisherStats]]:
        fleet = server.reactors.fleet if server.reactors is not None else None
        return [] if fleet is None else [("reactors", fleet.publisher_stats())]

    probe = NodeProbe(node_id=lambda: server.query.node, folded=lambda: server.projector.folded_events,
                      counters=counters, publishers=publishers, fold_stats=lambda: server.projector.fold_stats)
    dashboard = Dashboard(server.settings, *address, probe=probe)
    try:
        await dashboard.start()
    except FleetError as exc:
        if "http" in server.settings.model_fields_set:
            raise
        log.warning("no dashboard: %s", exc)
        return None
    return dashboard


async def run_up(settings: FleetSettings, ready: asyncio.Event | None = None, jobs: JobsConfig | None = None,
                 cluster: int = 0, secure: bool = False) -> None:
    """The embedded broker (or a `cluster`-node loopback cluster) and the services on it.
    `secure`: users and permissions (docs/security.md); the services connect as `service`."""
    if cluster:
        await _run_up_cluster(settings, ready, cluster, jobs, secure)
        return
    broker = EmbeddedBroker(settings.data_dir / "broker", port=settings.port, secure=secure)
    await broker.start()
    if broker.reused:
        log.info("reusing the NATS server already on %s", broker.url)
    else:
        log.info("started nats-server on %s (data in %s)", broker.url, broker.data_dir)
    if secure:
        settings = settings.model_copy(update={"credentials": broker.credentials_path("service-fleetlog")})
        log.info("secure: admin credentials in %s", broker.credentials_path("admin-fleetlog"))
    try:
        await run_serve(settings.model_copy(update={"nats_url": broker.url}), ready, jobs)
    finally:
        await broker.stop()


async def run_scheduler(settings: FleetSettings, jobs: JobsConfig, ready: asyncio.Event | None = None) -> None:
    """`fleetlog scheduler run`: the scheduler alone against NATS, until a signal (or cancelled)."""
    check_tick(jobs)
    nc = await _connect_waiting(settings)
    try:
        await ensure_streams(nc, settings)  # FLEET_SCHEDULER, should no `serve` have made it yet
        sched = Scheduler(nc, jobs)
        await sched.start()
        if ready is not None:
            ready.set()
        try:
            await _until_signalled()
        finally:
            await sched.stop()
    finally:
        with contextlib.suppress(Exception):
            await nc.drain()


async def _run_up_cluster(settings: FleetSettings, ready: asyncio.Event | None, size: int,
                          jobs: JobsConfig | None, secure: bool) -> None:
    # Secure: the identities live in <data_dir>/broker, as for one broker (`fleetlog identities`).
    nodes = LocalCluster(settings.data_dir / "cluster", size, settings.port, secure=secure,
                         registry_dir=settings.data_dir / "broker")
    await nodes.start()  # returns once every node is healthy: a JetStream meta leader exists
    if secure:
        settings = settings.model_copy(update={"credentials": nodes.nodes[0].credentials_path("service-fleetlog")})
        log.info("secure: admin credentials in %s", nodes.nodes[0].credentials_path("admin-fleetlog"))
    for i, node in enumerate(nodes.nodes):  # a secure node has no monitoring port (cluster.py)
        monitoring = f"monitoring http://{node.host}:{nodes.http_ports[i]}, " if nodes.http_ports else ""
        log.info("cluster node %s on %s (%sdata in %s)", node.name, node.url, monitoring, node.data_dir)
    # R3 on a cluster unless told otherwise (never more copies than nodes).
    replicas = settings.stream_replicas if "stream_replicas" in settings.model_fields_set else min(3, size)
    log.info("services on %s, streams with %d replicas", nodes.nats_url, replicas)
    try:
        await run_serve(settings.model_copy(update={"nats_url": nodes.nats_url, "stream_replicas": replicas}), ready,
                        jobs)
    finally:
        await nodes.stop()
