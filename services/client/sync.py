"""A blocking facade over any async family API, for `FleetSync` (agents that are plain threads)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["SyncFacade"]


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
