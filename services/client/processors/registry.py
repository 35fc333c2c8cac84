"""Session processors: the contract, the result, and the registry (code or entry points).

A processor has a `name`, a `cadence_minutes` and `process_session(session_path,
username, session_key, **kwargs) -> ProcessorResult | None` (kwargs include `user_id`),
a plain function (the runner calls it in a worker thread, so the event loop keeps
renewing the lock and answering) or a coroutine function. Processors register in code
(`register(p)`) or through the `fleetlog.processors` entry point group (an entry point
names a processor object, or a class that makes one with no arguments); code
registrations win over entry points of the same name.
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from fleetlog.services.backbone.errors import FleetValidationError, check_identity

__all__ = [
    "ENTRY_POINT_GROUP",
    "Processor",
    "ProcessorResult",
    "check_processor",
    "get_processor",
    "list_processor_names",
    "register",
    "unregister",
]

log = logging.getLogger("fleetlog.processors")

ENTRY_POINT_GROUP = "fleetlog.processors"


@dataclass(frozen=True)
class ProcessorResult:
    """What one session gave: the number of items extracted."""

    items_count: int = 0


@runtime_checkable
class Processor(Protocol):
    name: str
    cadence_minutes: float

    def process_session(self, session_path: Path, username: str, session_key: str,
                        **kwargs: Any) -> Any:  # ProcessorResult | None, or an awaitable of it
        ...


_registered: dict[str, Processor] = {}
_lock = threading.Lock()


def check_processor(p: object) -> Processor:
    """`p` if it fulfils the contract, else FleetValidationError naming the field."""
    name = getattr(p, "name", None)
    if not isinstance(name, str):
        raise FleetValidationError("name", f"a processor needs a string name, got {name!r}")
    check_identity("name", name)
    cadence = getattr(p, "cadence_minutes", None)
    if isinstance(cadence, bool) or not isinstance(cadence, int | float) or cadence <= 0:
        raise FleetValidationError("cadence_minutes", f"must be a number > 0, got {cadence!r}")
    if not callable(getattr(p, "process_session", None)):
        raise FleetValidationError("process_session", f"processor {name!r} has no callable process_session")
    assert isinstance(p, Processor)
    return p


def register(p: object) -> Processor:
    """Register a processor under its name (a later one of the same name replaces it)."""
    checked = check_processor(p)
    with _lock:
        _registered[checked.name] = checked
    return checked


def unregister(name: str) -> None:
    with _lock:
        _registered.pop(name, None)


def _from_entry_points() -> dict[str, Processor]:
    found: dict[str, Processor] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            p = check_processor(obj() if isinstance(obj, type) else obj)
        except Exception as exc:  # one broken plugin must not hide the others
            log.warning("processor entry point %s = %s not loaded: %s", ep.name, ep.value, exc)
            continue
        found[p.name] = p
    return found


def _all() -> dict[str, Processor]:
    with _lock:
        mine = dict(_registered)
    return {**_from_entry_points(), **mine}


def get_processor(name: str) -> Processor | None:
    """The processor registered under `name` (code first, then entry points); None if unknown."""
    with _lock:
        found = _registered.get(name)
    return found if found is not None else _from_entry_points().get(name)


def list_processor_names() -> list[str]:
    """Every registered processor's name, sorted."""
    return sorted(_all())
