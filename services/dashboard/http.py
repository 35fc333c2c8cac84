"""A tiny read-only HTTP/1.1 server on asyncio streams: GET and HEAD, one request per
connection (`Connection: close`), plus server-sent event streams. With `auth`, every page
but the open ones (/healthz) needs an `Authorization` the callable accepts (HTTP Basic):
else 401 with `WWW-Authenticate`, so browsers and Prometheus' basic_auth both log in.

The standard library is enough for a page, a metrics scrape and an event stream; a web
framework would be the only reason to add one more dependency to every install.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

from fleetlog.services.backbone.logins import LoginsBusy

__all__ = ["HttpServer", "Request", "Response"]

log = logging.getLogger("fleetlog.dashboard")

HEAD_LIMIT = 16 * 1024  # request line + headers; a read-only page needs no more
READ_TIMEOUT_S = 10.0
# An event stream's login is checked again at each SSE comment (the keepalive an idle stream
# sends) and, while events flow without one, at least this often.
RECHECK_S = 15.0


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/html; charset=utf-8"
    # An event stream instead of a body: each chunk is written as it comes.
    stream: AsyncGenerator[bytes, None] | None = None
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Awaitable[Response]]
# Given the request's Authorization header (None: absent), whether it may see the pages.
Auth = Callable[[str | None], bool]


def text(status: int, message: str) -> Response:
    return Response(status, message.encode(), "text/plain; charset=utf-8")


class HttpServer:
    def __init__(self, routes: dict[str, Handler], host: str, port: int, *, auth: Auth | None = None,
                 open_paths: frozenset[str] = frozenset({"/healthz"})) -> None:
        self.routes = routes
        self.auth = auth
        self.open_paths = open_paths
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=HEAD_LIMIT)
        self.port = self._server.sockets[0].getsockname()[1]  # port 0: the one the OS gave

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._open):  # event streams never end by themselves
            task.cancel()
        for task in list(self._open):
            with contextlib.suppress(BaseException):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._open.add(task)
        try:
            await self._one(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, asyncio.LimitOverrunError):
            pass  # the browser went away, or sent too much: nothing to answer
        except asyncio.CancelledError:
            pass
        finally:
            self._open.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split(" ")
        if len(parts) != 3:
            await _write(writer, text(400, "bad request line"), head_only=False)
            return
        method, target, _ = parts
        if method not in ("GET", "HEAD"):
            await _write(writer, text(405, "read-only: GET and HEAD only"), head_only=False)
            return
        url = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        handler = self.routes.get(url.path)
        try:
            allowed = self.auth is None or url.path in self.open_paths or await _allowed(
                self.auth, _header(head, b"authorization"))
        except LoginsBusy as exc:  # too many slow checks waiting: say so at once, queue nothing
            await _write(writer, Response(503, f"{exc}\n".encode(), "text/plain; charset=utf-8",
                                          headers={"Retry-After": "1"}), head_only=method == "HEAD")
            return
        if not allowed:
            await _write(writer, Response(401, b"login required: a reader or admin identity's dashboard password\n",
                                          "text/plain; charset=utf-8",
                                          headers={"WWW-Authenticate": 'Basic realm="fleetlog", charset="UTF-8"'}),
                         head_only=method == "HEAD")
            return
        if handler is None:
            response = text(404, f"no page at {url.path}")
        else:
            try:
                response = await handler(Request(method, url.path, query))
            except Exception as exc:  # a page that cannot be made says why, the server stays up
                log.warning("dashboard %s failed: %s: %s", url.path, type(exc).__name__, exc)
                response = text(503, f"{type(exc).__name__}: {exc}")
        if response.stream is not None and self.auth is not None and url.path not in self.open_paths:
            response.stream = _rechecked(response.stream, self.auth, _header(head, b"authorization"))
        await _write(writer, response, head_only=method == "HEAD")


async def _allowed(auth: Auth, header: str | None) -> bool:
    """A login check: on the loop when the check has an `on_loop` coroutine (services/backbone/
    logins.py: a cached login costs no thread, a hash waits in its own small pool), else in a
    thread (a deliberately slow hash must not stop the loop)."""
    on_loop = getattr(auth, "on_loop", None)
    if on_loop is not None:
        return bool(await on_loop(header))
    return await asyncio.to_thread(auth, header)


async def _rechecked(stream: AsyncGenerator[bytes, None], auth: Auth,
                     login: str | None) -> AsyncGenerator[bytes, None]:
    """An event stream that ends once its login is no longer valid (a revoked reader, a new
    password, a changed registry): the check at connect alone let a revoked reader's open page
    follow the fleet for as long as it stayed open."""
    checked = time.monotonic()
    async with contextlib.aclosing(stream) as chunks:
        async for chunk in chunks:
            if chunk.startswith(b":") or time.monotonic() - checked >= RECHECK_S:
                checked = time.monotonic()
                try:
                    valid = await _allowed(auth, login)  # as at connect: a changed registry costs a hash
                except LoginsBusy:
                    valid = False  # undecided: fail closed; the browser reconnects (a cached login at once)
                if not valid:
                    log.info("dashboard: an event stream's login is no longer valid; ending the stream")
                    return
            yield chunk


def _header(head: bytes, name: bytes) -> str | None:
    for line in head.split(b"\r\n")[1:]:
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == name:
            return value.strip().decode("latin-1")
    return None


async def _write(writer: asyncio.StreamWriter, response: Response, *, head_only: bool) -> None:
    reason = HTTPStatus(response.status).phrase
    headers = {"Content-Type": response.content_type, "Connection": "close", "Cache-Control": "no-store",
               **response.headers}
    if response.stream is None:
        headers["Content-Length"] = str(len(response.body))
    head = f"HTTP/1.1 {response.status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    writer.write(head.encode("latin-1") + b"\r\n")
    if head_only:
        await writer.drain()
        return
    if response.stream is None:
        writer.write(response.body)
        await writer.drain()
        return
    async with contextlib.aclosing(response.stream) as chunks:  # closed when the browser goes
        async for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
