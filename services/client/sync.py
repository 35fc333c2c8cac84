"""`FleetSync`: the client for agents that are plain threads or scripts, an event loop in a
daemon thread behind the same API without `await` (`SyncFacade` over each family API)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from fleetlog.schemas import Event
from fleetlog.schemas.answers import RejectsAnswer, SqlAnswer, StatusAnswer
from fleetlog.services.backbone.config import FleetSettings
from fleetlog.services.client.attempts.api import AttemptsSyncAPI
from fleetlog.services.client.fleet import Fleet
from fleetlog.services.client.rejects import RawReject
from fleetlog.services.client.state import StateSyncAPI
from fleetlog.services.writepath import exitsafe
from fleetlog.services.writepath.publisher import PublisherStats, Receipt, Token

__all__ = ["FleetSync", "SyncFacade"]

T = TypeVar("T")


class SyncFacade:
    """`facade.method(...)` runs `api.method(...)` on the client's loop and blocks for the result.

    Plain (non-async) methods, e.g. fire-and-forget `emit_event`, pass straight through:
    they never block. Async generators (e.g. `watch`) are not offered: use `Fleet` for those.
    """

    def __init__(self, api: object, run: Callable[[Coroutine[Any, Any, Any]], Any]) -> None:
        self._api = api
        self._run = run

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._api, name)
        if inspect.isasyncgenfunction(attr):
            raise AttributeError(f"{name} streams asynchronously: use the async Fleet client for it")
        if not inspect.iscoroutinefunction(attr):
            return attr

        @functools.wraps(attr)
        def blocking(*args: Any, **kwargs: Any) -> Any:
            return self._run(attr(*args, **kwargs))

        return blocking

    def __dir__(self) -> list[str]:
        return [n for n in dir(self._api) if not n.startswith("_")]


async def _open_fleet(nats_url: str | None, kwargs: dict[str, Any]) -> Fleet:
    fleet: Fleet = await Fleet.connect(nats_url, **kwargs)
    return fleet


class FleetSync:
    """`Fleet` for agents that are plain threads or processes: an event loop in a daemon thread.

    `record()` stays a microsecond call from any thread; queries block the caller.
    """

    def __init__(self, fleet: Fleet, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        self._fleet = fleet
        self._loop = loop
        self._thread = thread
        self._closed = False
        # At interpreter shutdown the loop thread (a daemon) still runs while atexit does: close
        # through it, bounded, unless the script did.
        exitsafe.register_closer(self, self._close_at_exit)
        exitsafe.watch(loop)  # a SIGTERM the main thread cannot see while it waits (exitsafe._install_wakeup)
        self.attempts = AttemptsSyncAPI(fleet.attempts, self._run)
        self.runs = SyncFacade(fleet.runs, self._run)
        self.runtimes = SyncFacade(fleet.runtimes, self._run)
        self.state = StateSyncAPI(fleet.state, self._run)
        self.snapshots = SyncFacade(fleet.snapshots, self._run)
        self.processors = SyncFacade(fleet.processors, self._run)

    @classmethod
    def connect(cls, nats_url: str | None = None, **kwargs: Any) -> FleetSync:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="fleetlog-loop", daemon=True)
        thread.start()
        settings = kwargs.get("settings")
        if settings is None:
            settings = FleetSettings(**{k: v for k, v in kwargs.items() if k in FleetSettings.model_fields})
        if settings.exit_on_sigterm:
            exitsafe.install_sigterm()  # here: the loop thread is not the main thread
        fut: Future[Fleet] = asyncio.run_coroutine_threadsafe(_open_fleet(nats_url, kwargs), loop)
        try:
            fleet = fut.result()
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
            raise
        return cls(fleet, loop, thread)

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def emit(self, event: Event) -> Receipt:
        return self._fleet.emit(event)

    def flush(self, timeout: float | None = 30.0) -> Token:
        return self._run(self._fleet.flush(timeout))

    def status(self) -> StatusAnswer:
        return self._run(self._fleet.status())

    def sql(self, sql: str, max_rows: int | None = None, min_seq: dict[str, int] | None = None,
            timeout: float = 30.0) -> SqlAnswer:
        return self._run(self._fleet.sql(sql, max_rows, min_seq, timeout))

    def rejects(self, projection: str | None = None, limit: int = 50,
                min_seq: dict[str, int] | None = None) -> RejectsAnswer:
        return self._run(self._fleet.rejects(projection, limit, min_seq))

    def reject_raw(self, seq: int, stream: str | None = None, projection: str | None = None) -> RawReject:
        return self._run(self._fleet.reject_raw(seq, stream, projection))

    def nodes(self, wait_s: float = 1.0) -> list[StatusAnswer]:
        return self._run(self._fleet.nodes(wait_s))

    def publisher_stats(self) -> PublisherStats:
        return self._fleet.publisher_stats()

    def close(self, timeout: float = 10.0) -> None:
        """Flush within timeout (the rest stays spooled), disconnect, stop the loop thread."""
        self._close(timeout, timeout + 10.0)

    def _close(self, timeout: float, bound: float) -> None:
        if self._closed:
            return
        self._closed = True
        exitsafe.unregister_closer(self)
        try:
            # Bounded: the flush takes at most `timeout`, the rest (spooling, disconnecting) a few s;
            # past `bound` the loop is stopped and the atexit spill takes what is left.
            self._run(self._fleet.close(timeout), bound)
        finally:
            with contextlib.suppress(RuntimeError):  # the loop already stopped
                self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    def _close_at_exit(self) -> None:
        if self._thread.is_alive():
            flush_s = self._fleet.settings.exit_flush_s
            self._close(flush_s, flush_s + 3.0)
        # Whatever close() could not settle is spooled by the atexit hook after this.

    def __enter__(self) -> FleetSync:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
