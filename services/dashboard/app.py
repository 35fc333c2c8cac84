"""The dashboard of one node: its HTTP server, its own client connection, its live feed.

Every page reads the views through the query service over NATS with the client SDK (the
`fleetlog` CLI's path): one data path, answers stamped and bounded as any client's, and the
page of any node shows what every client sees (docs/architecture.md, "Dashboard").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fleetlog.schemas.answers import StatusAnswer, StatusQuery, node_status_subject
from fleetlog.services.backbone.config import FleetSettings
from fleetlog.services.backbone.errors import FleetError, FleetValidationError
from fleetlog.services.backbone.logins import Logins
from fleetlog.services.client.fleet import Fleet
from fleetlog.services.dashboard.attempts_page import attempts_page
from fleetlog.services.dashboard.fleet_page import fleet_page, newest_facts
from fleetlog.services.dashboard.fleet_summary import AgentSummary
from fleetlog.services.dashboard.http import HttpServer, Request, Response, text
from fleetlog.services.dashboard.live import LiveFeed
from fleetlog.services.dashboard.metrics import CONTENT_TYPE, Local, NodeProbe, render
from fleetlog.services.dashboard.runs_page import run_page, runs_page
from fleetlog.services.dashboard.runtimes_page import processors_page, runtimes_page
from fleetlog.services.dashboard.system_page import spool_bytes, system_page

__all__ = ["Dashboard"]

log = logging.getLogger("fleetlog.dashboard")

SCRAPE_TIMEOUT_S = 2.0


class Dashboard:
    def __init__(self, settings: FleetSettings, host: str, port: int, probe: NodeProbe | None = None) -> None:
        self.settings = settings
        self.probe = probe or NodeProbe()
        # A node that connects as an identity runs secure: its pages ask for a reader's or admin's
        # login from the identities of its data dir (`identities add reader NAME`), none otherwise.
        self.logins = None if settings.credentials is None else Logins(settings.data_dir / "broker" / "identities.json")
        self.http = HttpServer({
            "/": self._fleet, "/attempts": self._attempts, "/system": self._system,
            "/runs": self._runs, "/run": self._run, "/runtimes": self._runtimes, "/processors": self._processors,
            "/events": self._events, "/metrics": self._metrics, "/healthz": self._healthz,
        }, host, port, auth=None if self.logins is None else self.logins.check)

    @property
    def url(self) -> str:
        host = self.http.host if ":" not in self.http.host else f"[{self.http.host}]"
        return f"http://{host}:{self.http.port}"

    async def start(self) -> None:
        self.fleet = await Fleet.connect(settings=self.settings, name="fleetlog-dashboard", ensure=False)
        try:
            self.summary = AgentSummary(self.fleet)
            self.live = LiveFeed(self.settings, lambda nc: newest_facts(self.fleet, self.summary, nc))
            await self.http.start()
            self.summary.warm()  # the Fleet page's rows, loaded before anyone asks
        except OSError as exc:
            await self.fleet.close()
            raise FleetError(f"cannot serve the dashboard on {self.http.host}:{self.http.port}: {exc} "
                             "(--http HOST:PORT for another address, --no-http for none)") from None
        except BaseException:
            await self.fleet.close()
            raise
        log.info("dashboard on %s (metrics at %s/metrics)", self.url, self.url)

    async def stop(self) -> None:
        await self.http.stop()
        await self.summary.stop()
        await self.live.close()
        with contextlib.suppress(Exception):
            await self.fleet.close()

    # -- pages -----------------------------------------------------------------------
    async def _fleet(self, req: Request) -> Response:
        return Response(body=await fleet_page(self.fleet, self.summary))

    async def _attempts(self, req: Request) -> Response:
        try:
            return Response(body=await attempts_page(self.fleet, req.query))
        except FleetValidationError as exc:  # a filter the view refuses: say which and why
            return text(400, str(exc))

    async def _runs(self, req: Request) -> Response:
        return Response(body=await runs_page(self.fleet))

    async def _run(self, req: Request) -> Response:
        run_id = req.query.get("id", "")
        if not run_id:
            return text(400, "id: the run's id is required (/run?id=RUN_ID)")
        body = await run_page(self.fleet, run_id)
        return text(404, f"no run {run_id!r} in the view") if body is None else Response(body=body)

    async def _runtimes(self, req: Request) -> Response:
        return Response(body=await runtimes_page(self.fleet))

    async def _processors(self, req: Request) -> Response:
        return Response(body=await processors_page(self.fleet))

    async def _system(self, req: Request) -> Response:
        status = await self._node_status()
        if status is None:
            return text(503, "this node's query service did not answer its status")
        return Response(body=await system_page(self.fleet, status, self.settings.resolved_spool_dir()))

    async def _events(self, req: Request) -> Response:
        return Response(content_type="text/event-stream", stream=self.live.events(),
                        headers={"X-Accel-Buffering": "no"})

    async def _healthz(self, req: Request) -> Response:
        return text(200, "ok")

    async def _metrics(self, req: Request) -> Response:
        status, stats = await asyncio.gather(self._node_status(), self._service_stats())
        mine = [("dashboard", self.fleet.publisher_stats())]
        local = Local(await asyncio.to_thread(spool_bytes, self.settings.resolved_spool_dir()), self.live.figures())
        return Response(body=render(status, stats, self.probe, mine, local), content_type=CONTENT_TYPE)

    # -- this node's figures ---------------------------------------------------------
    async def _node_status(self) -> StatusAnswer | None:
        node = self.probe.node_id()
        subject = node_status_subject(node) if node else "fleetlog.status"
        try:
            return await self.fleet.request(subject, StatusQuery(), StatusAnswer, SCRAPE_TIMEOUT_S)
        except FleetError as exc:
            log.debug("dashboard: no status from %s: %s", subject, exc)
            return None

    async def _service_stats(self) -> bytes | None:
        node = self.probe.node_id()
        if not node:
            return None
        try:
            nc = await self.fleet.nats(SCRAPE_TIMEOUT_S)
            msg = await nc.request(f"$SRV.STATS.fleetlog.{node}", b"", timeout=SCRAPE_TIMEOUT_S)
        except Exception as exc:  # a scrape without query figures beats a failed scrape
            log.debug("dashboard: no $SRV.STATS from %s: %s", node, exc)
            return None
        return bytes(msg.data)
