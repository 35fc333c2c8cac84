"""Nothing recorded is lost when the process ends (docs/architecture.md, "Write path 1").

Three ways a process can end without `close()`, and what catches each:

* `asyncio.run()` returning or raising: it cancels the leftover tasks and waits for them;
  the publisher's sender catches its cancellation, flushes for `exit_flush_s` and spools
  the rest (`Publisher._exit_flush`).
* the event loop closed or dropped without that (or events recorded after it ended),
  and `FleetSync` at interpreter shutdown: the `atexit` hook below. It first closes every
  live `FleetSync` through its loop (still running: its thread is a daemon, and atexit runs
  before daemon threads stop), bounded; then, for every publisher still open, it writes
  the in-memory queue and the unacked in-flight events to the spool synchronously.
* SIGTERM: its default action ends the process without atexit or `finally`. When the
  application has not installed a handler of its own and we are in the main thread,
  `install_sigterm()` makes SIGTERM raise `SystemExit(143)`, so the same exit path runs
  (setting `exit_on_sigterm=False` / FLEETLOG_EXIT_ON_SIGTERM=0 turns this off).

SIGKILL and power loss run nothing: see durable mode in `Publisher`.
"""

from __future__ import annotations

import atexit
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Protocol

__all__ = ["Spillable", "install_sigterm", "register", "register_closer", "unregister", "unregister_closer"]

log = logging.getLogger("fleetlog.exit")

SIGTERM_EXIT = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


class Spillable(Protocol):
    def spill_at_exit(self) -> int:
        """Write everything not acked to the spool, synchronously; the count written."""


# Strong references: a Fleet the script dropped without close() must still be spilled.
_publishers: dict[int, Spillable] = {}
_closers: dict[int, Callable[[], None]] = {}
_lock = threading.Lock()


def register(publisher: Spillable) -> None:
    with _lock:
        _publishers[id(publisher)] = publisher


def unregister(publisher: Spillable) -> None:
    with _lock:
        _publishers.pop(id(publisher), None)


def register_closer(key: object, closer: Callable[[], None]) -> None:
    """`closer` runs first at exit (a FleetSync's bounded close through its own loop)."""
    with _lock:
        _closers[id(key)] = closer


def unregister_closer(key: object) -> None:
    with _lock:
        _closers.pop(id(key), None)


def _at_exit() -> None:
    with _lock:
        closers = list(_closers.values())
        _closers.clear()
    for closer in closers:
        try:
            closer()
        except BaseException as exc:  # whatever happens, the spill below must run
            log.warning("fleetlog: closing a client at exit failed (%r); spooling what is left", exc)
    with _lock:
        publishers = list(_publishers.values())
        _publishers.clear()
    for publisher in publishers:
        n = publisher.spill_at_exit()
        if n:
            log.warning("fleetlog: %d events not acked at exit were written to the spool", n)


atexit.register(_at_exit)


def _on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(SIGTERM_EXIT)


def install_sigterm() -> bool:
    """Turn SIGTERM into `SystemExit(143)` unless the application handles it; True if installed."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return False  # the application's own handler (or ours already) decides
    signal.signal(signal.SIGTERM, _on_sigterm)
    return True
