"""The bulk reader's supervision: connect, handshake, create the ordered consumer, keep it
alive, and recover from anything (broker restart, dropped or silently dead connection,
consumer deleted, missed deliveries).  Never raises for transport trouble.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from typing import Any

import msgspec
from fleetlog.services.backbone.nkeyauth import connect_auth, inbox_root
from fleetlog.services.projector.stream_wire import (
    _BACKOFF_MAX_S,
    _BACKOFF_MIN_S,
    _INBOX_SID,
    _VERSION,
    ReaderState,
    StreamReaderError,
    _ApiError,
    _ProtocolError,
    _Server,
    _wake,
    _Wire,
    log,
)

__all__ = ["SupervisorMixin"]


class SupervisorMixin(ReaderState):
    def _next_sid(self) -> bytes:
        self._sid_n += 1
        return str(self._sid_n).encode()

    async def _request(self, subject: str, payload: bytes, wait_s: float) -> bytes:
        self._req_n += 1
        token = str(self._req_n).encode()
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._requests[token] = fut
        self._write(
            b"PUB %s %s.%s %d\r\n%s\r\n" % (subject.encode(), self._inbox.encode(), token, len(payload), payload)
        )
        try:
            async with asyncio.timeout(wait_s):
                return await fut
        except TimeoutError:
            raise _ApiError(f"timeout waiting for reply on {subject}") from None
        finally:
            self._requests.pop(token, None)

    def _consumer_config(self, deliver: str, start: int) -> dict[str, Any]:
        hb_ns = int(self._hb_s * 1e9)
        cfg: dict[str, Any] = {
            "deliver_policy": "by_start_sequence",
            "opt_start_seq": start,
            "ack_policy": "none",
            "max_deliver": 1,
            "replay_policy": "instant",
            "flow_control": True,
            "idle_heartbeat": hb_ns,
            "mem_storage": True,
            "num_replicas": 1,
            # Orphans (after reconnects) disappear soon after losing interest.
            "inactive_threshold": int(max(10.0, 5 * self._hb_s) * 1e9),
            "deliver_subject": deliver,
        }
        if len(self._filters) == 1:
            cfg["filter_subject"] = self._filters[0]
        elif self._filters:
            cfg["filter_subjects"] = self._filters
        return cfg

    async def _create_consumer(self) -> None:
        old = self._consumer_name
        self._consumer_name = None
        sid = self._next_sid()
        deliver = f"{self._inbox}.d.{sid.decode()}"
        self._write(b"SUB %s %s\r\n" % (deliver.encode(), sid))
        # Deliveries may arrive before the API reply: accept them from now on.
        self._deliver_sid = sid
        self._expected_cseq = 1
        self._ack_head = None
        self._fc_pending.clear()
        self._need_consumer = False
        self._last_activity = asyncio.get_running_loop().time()
        start = self._last_buffered_seq + 1
        body = msgspec.json.encode({"stream_name": self._stream, "config": self._consumer_config(deliver, start)})
        try:
            raw = await self._request(f"$JS.API.CONSUMER.CREATE.{self._stream}", body, self._api_timeout)
            try:
                resp = msgspec.json.decode(raw)
            except msgspec.DecodeError as exc:
                raise _ApiError(f"undecodable consumer create reply {raw[:200]!r}") from exc
            if not isinstance(resp, dict):
                raise _ApiError(f"unexpected consumer create reply {raw[:200]!r}")
            err = resp.get("error")
            if err:
                raise _ApiError(
                    f"consumer create on {self._stream!r} failed: {err.get('description')} "
                    f"(err_code {err.get('err_code')})"
                )
        except BaseException:
            if self._deliver_sid == sid:
                self._write(b"UNSUB %s\r\n" % sid)
                self._deliver_sid = None
                self._need_consumer = True
            raise
        if self._deliver_sid == sid:
            self._consumer_name = str(resp.get("name"))
            log.debug("stream reader %s: consumer %s from seq %d", self._stream, self._consumer_name, start)
        if old:
            # Fire and forget: a reply lands on an unknown inbox token and is ignored.
            self._req_n += 1
            self._write(
                b"PUB $JS.API.CONSUMER.DELETE.%s.%s %s.%d 0\r\n\r\n"
                % (self._stream.encode(), old.encode(), self._inbox.encode(), self._req_n)
            )

    def _signal_first(self) -> None:
        if self._first_outcome is not None and not self._first_outcome.done():
            self._first_outcome.set_result(None)

    async def _run(self) -> None:
        """Connect/serve/reconnect until close(); never raises for transport trouble."""
        backoff = _BACKOFF_MIN_S
        try:
            while not self._closing:
                served = False
                for srv in self._servers:
                    try:
                        await self._open(srv)
                    except StreamReaderError as exc:
                        self._fatal = exc
                        self._last_error = str(exc)
                        log.error("stream reader: %s", exc)
                        if self._waiter is not None:
                            _wake(self._waiter)
                        await self._drop_connection()
                        return
                    except (OSError, TimeoutError, _ProtocolError) as exc:
                        self._last_error = f"connect to {srv.label} failed: {exc!r}"
                        log.debug("stream reader: %s", self._last_error)
                        await self._drop_connection()
                        continue
                    served = True
                    backoff = _BACKOFF_MIN_S
                    try:
                        await self._serve()
                    except Exception as exc:  # keep the reader alive whatever happens
                        self._last_error = f"unexpected error: {exc!r}"
                        log.exception("stream reader: unexpected error, reconnecting")
                    finally:
                        await self._drop_connection()
                    break
                if not served:
                    self._signal_first()
                if self._closing:
                    break
                await asyncio.sleep(backoff * (0.75 + 0.5 * secrets.randbelow(1000) / 1000))
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
        finally:
            self._signal_first()

    async def _open(self, srv: _Server) -> None:
        loop = asyncio.get_running_loop()
        self._gen += 1
        gen = self._gen
        self._reset_connection_state()
        self._hs_info = loop.create_future()
        self._hs_pong = loop.create_future()
        async with asyncio.timeout(self._connect_timeout):
            transport, wire = await loop.create_connection(lambda: _Wire(self, gen), srv.host, srv.port)
            self._transport = transport
            self._wire = wire
            info = await self._hs_info
        if info.get("tls_required"):
            raise StreamReaderError(f"{srv.label} requires TLS, which is not supported by the bulk stream reader")
        if not info.get("headers", False):
            raise StreamReaderError(f"{srv.label} does not support headers (nats-server >= 2.2 needed)")
        connect: dict[str, Any] = {
            "verbose": False,
            "pedantic": False,
            "tls_required": False,
            "name": self._name,
            "lang": "python/fleetlog-bulk",
            "version": _VERSION,
            "protocol": 1,
            "headers": True,
            "no_responders": True,
            "echo": False,
        }
        connect.update(connect_auth(info, self._identity, srv.user, srv.password, srv.token))
        self._inbox = f"{inbox_root(self._identity)}.{secrets.token_hex(11)}"
        self._write(
            b"CONNECT %s\r\nPING\r\nSUB %s.* %s\r\n" % (msgspec.json.encode(connect), self._inbox.encode(), _INBOX_SID)
        )
        async with asyncio.timeout(self._connect_timeout):
            await self._hs_pong
        self._ready_conn = True
        self._need_consumer = True
        log.info("stream reader: connected to %s", srv.label)

    def _reset_connection_state(self) -> None:
        self._ready_conn = False
        self._pos = self._fill  # a frame the old connection left half read is dropped
        self._need = 0
        self._paused = False
        self._pings_out = 0
        self._requests.clear()
        self._req_n = 0
        self._sid_n = 1
        self._deliver_sid = None
        self._consumer_name = None
        self._need_consumer = True
        self._fc_pending.clear()

    async def _drop_connection(self) -> None:
        transport, wire = self._transport, self._wire
        self._ready_conn = False
        self._transport = None
        self._wire = None
        self._deliver_sid = None
        self._need_consumer = True
        self._fc_pending.clear()
        for fut in (self._hs_info, self._hs_pong):
            if fut is not None and fut.done() and not fut.cancelled():
                fut.exception()  # mark retrieved: nobody awaits a failed handshake any more
            elif fut is not None:
                fut.cancel()
        if transport is not None:
            transport.close()
        if wire is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                async with asyncio.timeout(1.0):
                    await asyncio.shield(wire.lost)

    async def _serve(self) -> None:
        """Supervise one live connection: ping it, (re)create the consumer, watch heartbeats."""
        loop = asyncio.get_running_loop()
        tick = min(0.5, self._hb_s / 2)
        ping_every = max(1.0, 2 * self._hb_s)
        next_ping = loop.time() + ping_every
        next_create = 0.0
        create_backoff = 0.1
        while not self._closing and self.connected:
            now = loop.time()
            if now >= next_ping:
                # Liveness first, so a silently dead socket is noticed even while consumer
                # creation keeps timing out on it.
                next_ping = now + ping_every
                if not self._paused:
                    if self._pings_out >= 2:
                        self._last_error = "no PONG from server: connection presumed dead"
                        log.info("stream reader: %s", self._last_error)
                        return
                    self._pings_out += 1
                    self._write(b"PING\r\n")
            if self._need_consumer:
                if now >= next_create:
                    if self._pings_out == 0:
                        # A PING ahead of the request: if the request times out and this
                        # PONG never came either, the socket is dead, not the API slow.
                        self._pings_out = 1
                        self._write(b"PING\r\n")
                    try:
                        await self._create_consumer()
                        create_backoff = 0.1
                    except _ApiError as exc:
                        self._last_error = str(exc)
                        log.debug("stream reader: %s", exc)
                        if self._pings_out and not self._paused and self.connected:
                            self._last_error = f"{exc}; no PONG either: connection presumed dead"
                            log.info("stream reader: %s", self._last_error)
                            return
                        next_create = loop.time() + create_backoff
                        create_backoff = min(create_backoff * 2, _BACKOFF_MAX_S)
                    self._signal_first()
                    continue
            elif not self._paused and now - self._last_activity > 3 * self._hb_s:
                self._reset_consumer(f"no data or heartbeat for {now - self._last_activity:.1f}s")
                continue
            self._wakeup.clear()
            wait = tick if not self._need_consumer else max(0.0, min(tick, next_create - now))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wakeup.wait()
