"""The fleetlog client: `Fleet` (asyncio) and `FleetSync` (plain threads).

    async with Fleet.connect() as fleet:   # FLEETLOG_NATS_URL, else the local default
        fleet.attempts.record(agent="alpha", action="probe", outcome="success", elapsed_s=1.5)
        await fleet.flush()                # everything enqueued is acked by JetStream
        await fleet.attempts.query(agent="alpha", since="24h")

(`fleet = await Fleet.connect()` works too.) A process that ends without `close()` loses
nothing recorded: see services/writepath/exitsafe.py.

Facts are fire-and-forget through the `Publisher`; queries are NATS requests to
the query service. Connecting never fails because the broker is away: events
spool locally and the client keeps trying (queries raise FleetUnavailable).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Generator
from typing import Any, TypeVar

import msgspec
from fleetlog.schemas import Event, encode_event
from fleetlog.schemas.answers import RejectsAnswer, RejectsQuery, SqlAnswer, SqlQuery, StatusAnswer, StatusQuery
from fleetlog.services.backbone.config import FleetSettings
from fleetlog.services.backbone.errors import (
    FleetUnavailable,
    FleetValidationError,
    PermissionDenied,
    QueryError,
    StaleError,
)
from fleetlog.services.backbone.link import Link, denials
from fleetlog.services.backbone.streams import ensure_streams
from fleetlog.services.client.attempts.api import AttemptsAPI
from fleetlog.services.client.nodes import node_statuses
from fleetlog.services.client.processors.api import ProcessorsAPI
from fleetlog.services.client.rejects import RawReject, reject_raw
from fleetlog.services.client.runs.api import RunsAPI
from fleetlog.services.client.runtimes import RuntimesAPI
from fleetlog.services.client.snapshots.api import SnapshotsAPI
from fleetlog.services.client.state import StateAPI
from fleetlog.services.writepath import exitsafe
from fleetlog.services.writepath.publisher import Publisher, PublisherStats, Receipt, Token
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

__all__ = ["Connecting", "Fleet"]

T = TypeVar("T")
S = TypeVar("S")

_encode = msgspec.json.Encoder().encode


class Fleet:
    """One connection, one publisher, typed access to every family's API."""

    def __init__(self, settings: FleetSettings, link: Link, publisher: Publisher) -> None:
        self.settings = settings
        self._link = link
        self._publisher = publisher
        self._decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}
        self.attempts = AttemptsAPI(self)
        self.runtimes = RuntimesAPI(self)
        self.runs = RunsAPI(self, runtimes=self.runtimes)
        self.state = StateAPI(self)
        self.snapshots = SnapshotsAPI(self)
        self.processors = ProcessorsAPI(self)

    @classmethod
    def connect(
        cls, nats_url: str | None = None, *, settings: FleetSettings | None = None, name: str = "fleetlog-client",
        ensure: bool = True, connect_wait_s: float = 2.0, **overrides: Any,
    ) -> Connecting:
        """`await Fleet.connect(...)` or `async with Fleet.connect(...) as fleet:` (closes at the end).

        Never fails because the broker is away: waits up to connect_wait_s for it, then goes on
        (events spool, the client keeps connecting in the background)."""
        return Connecting(lambda: cls._open(nats_url, settings, name, ensure, connect_wait_s, overrides))

    @classmethod
    async def _open(
        cls, nats_url: str | None, settings: FleetSettings | None, name: str, ensure: bool, connect_wait_s: float,
        overrides: dict[str, Any],
    ) -> Fleet:
        if settings is None:
            settings = FleetSettings(**overrides) if nats_url is None else FleetSettings(nats_url=nats_url, **overrides)
        elif nats_url is not None:
            settings = settings.model_copy(update={"nats_url": nats_url})
        link = Link(settings.servers(), name)
        if ensure:
            async def _ensure(nc: Any) -> None:
                try:
                    await ensure_streams(nc, settings)
                except Exception as exc:
                    import logging

                    logging.getLogger("fleetlog.client").warning("could not ensure streams: %s", exc)

            link.on_connect(_ensure)
        publisher = Publisher(
            link,
            settings.resolved_spool_dir(),
            max_inflight=settings.publish_max_inflight,
            queue_max=settings.publish_queue_max,
            ack_timeout_s=settings.publish_ack_timeout_s,
            spool_max_bytes=settings.spool_max_bytes,
            exit_flush_s=settings.exit_flush_s,
            retry_s=settings.publish_retry_s,
            durable=settings.durable,
            fsync=settings.durable_fsync,
        )
        if settings.exit_on_sigterm:
            exitsafe.install_sigterm()  # only from the main thread, only over SIG_DFL
        await publisher.start()
        if await link.start(connect_wait_s):
            # And the publisher's own connection: a script that records and returns at once
            # must find it up (its events delivered at exit, not left in a spool).
            await publisher.wait_connected(connect_wait_s)
        return cls(settings, link, publisher)

    # -- writing ----------------------------------------------------------------
    def emit(self, event: Event) -> Receipt:
        """Validate, then enqueue an event of any family. Never blocks; raises only for bad input."""
        payload = _validated_payload(event, self.settings.max_event_bytes)
        return self._publisher.submit(event.id, event.subject(), payload)

    def emit_validated(self, event: Event, subject: str | None = None) -> Receipt:
        """Enqueue an event whose fields a family API has already checked against every wire
        rule (types, lengths, JSON-encodable values, encoded size within max_event_bytes).

        The hot path of typed APIs such as `attempts.record()`: no encode and no validating
        re-decode at the call; the sender encodes. Anything not checked that way goes
        through `emit()`. Values the caller could still change after the call must already
        be in the event as `msgspec.Raw` JSON (an encode-time snapshot). `subject`, when
        given, must be `event.subject()` (a caller may have it cached).
        """
        return self._publisher.submit_event(event, event.subject() if subject is None else subject)

    async def flush(self, timeout: float | None = 30.0) -> Token:
        """Wait until everything enqueued is acked; returns the consistency token {stream: seq}."""
        return await self._publisher.flush(timeout)

    def publisher_stats(self) -> PublisherStats:
        return self._publisher.stats()

    @property
    def connected(self) -> bool:
        return self._link.connected

    @property
    def foreign_spools(self) -> list[str]:
        """Orphaned spools found at connect that belong to another fleet (left, never drained here)."""
        return list(self._publisher.foreign_spools)

    # -- reading ----------------------------------------------------------------
    async def nats(self, timeout: float = 2.0) -> Client:
        """The live NATS connection (waits up to `timeout` for a reconnect), else FleetUnavailable."""
        nc = self._link.nc
        if nc is None or not nc.is_connected:
            if not await self._link.wait_connected(timeout):
                raise FleetUnavailable(f"not connected to NATS at {self.settings.nats_url}")
            nc = self._link.nc
            assert nc is not None
        return nc

    async def request(
        self, subject: str, body: msgspec.Struct, reply_type: type[S], timeout: float = 10.0
    ) -> S:
        """One query-service request; errors come back as typed exceptions."""
        nc = await self.nats(min(timeout, 2.0))
        denied_before = denials(nc, subject)
        payload = _encode(body)
        try:
            try:
                msg = await _ask(nc, subject, payload, timeout)
            except NatsTimeout:
                if denials(nc, subject) > denied_before:
                    raise PermissionDenied(subject) from None
                if not nc._server_info.get("cluster"):
                    raise
                # On a cluster the request or its answer can be lost with a node (the connection
                # of either side moves to another one): ask once more, on the live connection.
                nc = await self.nats(min(timeout, 2.0))
                msg = await _ask(nc, subject, payload, timeout)
        except NoRespondersError:
            raise FleetUnavailable(
                f"no fleetlog query service answers {subject} (is `fleetlog up` or `fleetlog serve` running?)"
            ) from None
        except NatsTimeout:
            if denials(nc, subject) > denied_before:
                raise PermissionDenied(subject) from None
            raise FleetUnavailable(f"the query service did not answer {subject} within {timeout}s") from None
        headers = msg.headers or {}
        code = headers.get("Nats-Service-Error-Code")
        if code:
            try:
                message = msgspec.json.decode(msg.data)["error"]["message"]
            except Exception:
                message = headers.get("Nats-Service-Error", "error")
            if code == "stale":
                raise StaleError(message)
            if code == "400":
                raise FleetValidationError("request", message)
            raise QueryError(code, message)
        decoder = self._decoders.get(reply_type)
        if decoder is None:
            decoder = self._decoders[reply_type] = msgspec.json.Decoder(reply_type)
        result: S = decoder.decode(msg.data)
        return result

    async def status(self, timeout: float = 10.0) -> StatusAnswer:
        return await self.request("fleetlog.status", StatusQuery(), StatusAnswer, timeout)

    async def sql(
        self, sql: str, max_rows: int | None = None, min_seq: dict[str, int] | None = None, timeout: float = 30.0
    ) -> SqlAnswer:
        """One read-only SELECT over the live views (`fleetlog sql`); see services/query/sql.py for
        what it may read. A statement that is not one such SELECT raises FleetValidationError."""
        return await self.request("fleetlog.sql", SqlQuery(sql=sql, max_rows=max_rows, min_seq=min_seq), SqlAnswer,
                                  timeout)

    async def rejects(
        self, projection: str | None = None, limit: int = 50, min_seq: dict[str, int] | None = None
    ) -> RejectsAnswer:
        """Newest rejects first; `min_seq` waits until the projection(s) folded that far."""
        query = RejectsQuery(projection=projection, limit=limit, min_seq=min_seq)
        return await self.request("fleetlog.rejects", query, RejectsAnswer)

    async def reject_raw(self, seq: int, stream: str | None = None, projection: str | None = None) -> RawReject:
        """One reject's exact bytes (answers carry a preview only), from JetStream by sequence."""
        return await reject_raw(self, seq, stream, projection)

    async def nodes(self, wait_s: float = 1.0) -> list[StatusAnswer]:
        """The status of every fleetlog node serving this broker (serving or catching up)."""
        return await node_statuses(self, wait_s)

    async def rebuild(self, projection: str) -> dict[str, Any]:
        class _Req(msgspec.Struct):
            projection: str

        reply = await self.request("fleetlog.rebuild", _Req(projection), dict[str, Any])
        return reply

    async def adopt_spool(self, name: str) -> int:
        """Deliver the orphaned spool `name` to this fleet, whichever fleet it was recorded for
        (`fleetlog spool drain --adopt`: its own fleet no longer exists). The count taken."""
        return await self._publisher.adopt(name)

    async def close(self, timeout: float = 10.0) -> None:
        """Drain what is queued (within timeout; the rest stays spooled on disk) and disconnect."""
        await self._publisher.close(timeout)
        await self._link.close()

    async def __aenter__(self) -> Fleet:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Connecting:
    """What `Fleet.connect()` returns: awaitable (the `Fleet`) and an async context manager
    (the `Fleet`, closed on the way out)."""

    def __init__(self, open_: Callable[[], Coroutine[Any, Any, Fleet]]) -> None:
        self._open = open_  # the coroutine is made only when used: no "never awaited" warning
        self._fleet: Fleet | None = None

    def __await__(self) -> Generator[Any, None, Fleet]:
        return self._open().__await__()

    async def __aenter__(self) -> Fleet:
        self._fleet = await self._open()
        return self._fleet

    async def __aexit__(self, *exc: object) -> None:
        if self._fleet is not None:
            await self._fleet.close()


_type_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def _validated_payload(event: Event, max_bytes: int) -> bytes:
    """Encode, then decode with the event's own type: the wire rules, checked at the call."""
    try:
        payload = encode_event(event)
    except (TypeError, ValueError, OverflowError) as exc:
        raise FleetValidationError(_unencodable_field(event), f"value is not JSON-serializable: {exc}") from None
    if len(payload) > max_bytes:
        raise FleetValidationError(
            "event", f"encoded size {len(payload)} bytes exceeds max_event_bytes {max_bytes}"
        )
    cls = type(event)
    decoder = _type_decoders.get(cls)
    if decoder is None:
        decoder = _type_decoders[cls] = msgspec.json.Decoder(cls)
    try:
        decoder.decode(payload)
    except msgspec.ValidationError as exc:
        field, rule = _split_validation(str(exc))
        raise FleetValidationError(field, rule) from None
    return payload


def _unencodable_field(event: Event) -> str:
    """Slow path after a failed encode: which field holds the value JSON cannot carry."""
    for name in event.__struct_fields__:
        try:
            msgspec.json.encode(getattr(event, name))
        except (TypeError, ValueError, OverflowError):
            return name
    return type(event).__name__


def _split_validation(message: str) -> tuple[str, str]:
    """msgspec says "Expected `str` of length >= 1 - at `$.agent`": field agent, rule the rest."""
    if " - at `$." in message:
        rule, _, where = message.rpartition(" - at `$.")
        return where.rstrip("`"), rule
    return "event", message


NO_RESPONDERS_GRACE_S = 1.0  # a node joining or restarting has no responders for a moment


async def _ask(nc: Client, subject: str, payload: bytes, timeout: float) -> Msg:
    """One request; "no responders" is asked again for a short while (a node that is joining
    the query group, or restarting, is not there for an instant) before it is believed."""
    deadline = asyncio.get_running_loop().time() + min(timeout, NO_RESPONDERS_GRACE_S)
    while True:
        try:
            return await nc.request(subject, payload, timeout=timeout)
        except NoRespondersError:
            if asyncio.get_running_loop().time() >= deadline:
                raise
            await asyncio.sleep(0.1)
