"""Nothing recorded is lost when the process ends (docs/architecture.md, "Write path 1").

Three ways a process can end without `close()`, and what catches each:

* `asyncio.run()` returning or raising: it cancels the leftover tasks and waits for them;
  the publisher's sender catches its cancellation, flushes for `exit_flush_s` and spools
  the rest (`Publisher._exit_flush`).
* the event loop closed or dropped without that (or events recorded after it ended),
  and `FleetSync` at interpreter shutdown: the `atexit` hook below. It first closes every
  live `FleetSync` through its loop (still running: its thread is a daemon, and atexit runs
  before daemon threads stop), bounded; then, for every publisher still open, it writes
  the in-memory queue and the unacked in-flight events to the spool synchronously. From then
  on a publisher writes whatever is still recorded (a daemon thread at work) straight to its
  spool; a last pass closes the spools.
* SIGTERM: its default action ends the process without atexit or `finally`. When the
  application has not installed a handler of its own and we are in the main thread,
  `install_sigterm()` makes SIGTERM end the process through that same exit path with code 143
  (setting `exit_on_sigterm=False` / FLEETLOG_EXIT_ON_SIGTERM=0 turns this off). Never in the
  middle of the write path: see `_on_sigterm`.

SIGKILL and power loss run nothing: see durable mode in `Publisher`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Protocol

__all__ = [
    "Spillable", "check_sigterm", "exiting", "install_sigterm", "register", "register_closer",
    "sigterm_seen", "unregister", "unregister_closer", "watch",
]

log = logging.getLogger("fleetlog.exit")

SIGTERM_EXIT = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


class Spillable(Protocol):
    def spill_at_exit(self) -> int:
        """Write everything not acked to the spool, synchronously; the count written.
        Whatever is recorded after this goes straight to the spool."""

    def close_spool_at_exit(self) -> int:
        """The last pass: spool what arrived since `spill_at_exit`, release the spool; the count."""


# Strong references: a Fleet the script dropped without close() must still be spilled.
_publishers: dict[int, Spillable] = {}
_closers: dict[int, Callable[[], None]] = {}
_lock = threading.Lock()
_state = {"sigterm": False, "exiting": False, "deferred": False, "resend": False}


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


def exiting() -> bool:
    """The atexit hook is running (or a SIGTERM came): closes are bounded by `exit_flush_s`."""
    return _state["exiting"]


def sigterm_seen() -> bool:
    return _state["sigterm"]


def _at_exit() -> None:
    _state["exiting"] = True
    # A second SIGTERM/SIGINT while spilling would cut the spill short: ignored from here on.
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(sig, signal.SIG_IGN)
        except (ValueError, OSError):  # not the main thread (atexit always is; be safe)
            pass
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
    # Each publisher on its own: one that fails (a disk error) must not keep the others' events.
    for publisher in publishers:
        try:
            n = publisher.spill_at_exit()
        except BaseException as exc:
            log.error("fleetlog: spooling a publisher at exit failed: %r", exc)
            continue
        if n:
            log.warning("fleetlog: %d events not acked at exit were written to the spool", n)
    for publisher in publishers:
        try:
            n = publisher.close_spool_at_exit()
        except BaseException as exc:
            log.error("fleetlog: closing a spool at exit failed: %r", exc)
            continue
        if n:
            log.warning("fleetlog: %d events recorded during the exit were written to the spool", n)
    if _state["resend"]:
        # SIGTERM came while Python waited for non-daemon threads (`threading._shutdown`): the
        # SystemExit raised there is ignored and the exit code would be 0. End the way
        # SIGTERM's default action does instead, now that everything is on disk.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


atexit.register(_at_exit)


def _where(frame: FrameType | None) -> str:
    """Where SIGTERM interrupted the main thread: "writepath", "loop", "shutdown" or "app".

    Walks from the interrupted frame out to the first asyncio frame. A `SystemExit` raised in
    fleetlog's write path (an event between the queue and the in-flight table, a spool append
    half done) loses events; raised in asyncio's own bookkeeping (a task between two steps) it
    can leave a task that never finishes, and `asyncio.run` then waits for it forever. Raised
    in the application's code it is as safe as a Ctrl-C."""
    innermost = True
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name.startswith(("asyncio", "selectors")):
            return "loop" if innermost else "app"
        if name.startswith("fleetlog.services.writepath"):
            return "writepath"
        if name == "threading" and frame.f_code.co_name == "_shutdown":
            return "shutdown"
        innermost = False
        frame = frame.f_back
    return "app"


def _raise_exit() -> None:
    raise SystemExit(SIGTERM_EXIT)


def _on_sigterm(_signum: int, frame: FrameType | None) -> None:
    if _state["sigterm"]:
        return  # already on the way out: a second SIGTERM must not interrupt the exit path
    _state["sigterm"] = True
    _state["exiting"] = True
    where = _where(frame)
    if where == "shutdown":
        _state["resend"] = True  # the exit hook ends the process with SIGTERM's status
        raise SystemExit(SIGTERM_EXIT)  # stops the wait for non-daemon threads
    if where == "app":
        raise SystemExit(SIGTERM_EXIT)
    try:
        loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()  # the main thread's
    except RuntimeError:
        loop = None
    if loop is not None:
        # Raised from a loop callback, between two task steps (like asyncio's own Ctrl-C
        # handling): `asyncio.run` then cancels every task, so the sender flushes and spools.
        loop.call_soon_threadsafe(_raise_exit)
    elif where == "writepath":
        _state["deferred"] = True  # raised as the write path returns (`check_sigterm`)
    else:
        raise SystemExit(SIGTERM_EXIT)  # asyncio helpers with no loop running here: nothing to break


def check_sigterm() -> None:
    """Where the write path hands control back to the application: a SIGTERM that came while it
    ran (no event loop in the main thread to defer it to) ends the process now."""
    if _state["deferred"]:
        _state["deferred"] = False
        raise SystemExit(SIGTERM_EXIT)


def install_sigterm() -> bool:
    """Turn SIGTERM into `SystemExit(143)` unless the application handles it; True if installed."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return False  # the application's own handler (or ours already) decides
    signal.signal(signal.SIGTERM, _on_sigterm)
    _install_wakeup()
    return True


# The read end of the signal wakeup pipe, when fleetlog's is the process's (`watch`).
_wakeup: list[int] = []


def _install_wakeup() -> None:
    """CPython runs a Python signal handler only when the main thread next runs bytecode. A
    SIGTERM that arrives just before the main thread blocks in a lock (Python waiting for
    non-daemon threads at exit), or that the kernel gives to another thread, is never handled:
    the process hangs. The C-level handler also writes the signal number to the wakeup fd, in
    whatever thread it runs; a loop in another thread (`watch`) then re-sends SIGTERM to the
    main thread itself, which interrupts its wait. Only when no one else uses the wakeup fd."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    try:
        old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except (ValueError, OSError):
        old = -2
    if old != -1:  # someone's own (an asyncio loop's signal handling): leave it theirs
        if old >= 0:
            signal.set_wakeup_fd(old)
        os.close(r)
        os.close(w)
        return
    _wakeup.append(r)


def watch(loop: asyncio.AbstractEventLoop) -> None:
    """Watch for SIGTERM from `loop`, running in another thread (FleetSync's): see `_install_wakeup`."""
    if not _wakeup:
        return
    fd = _wakeup[0]

    def on_wakeup() -> None:
        try:
            data = os.read(fd, 512)
        except OSError:
            return
        if signal.SIGTERM in data and not _state["exiting"]:
            main = threading.main_thread().ident
            if main is not None:
                signal.pthread_kill(main, signal.SIGTERM)  # a second one is ignored (`_on_sigterm`)

    def add() -> None:
        with contextlib.suppress(ValueError, OSError, RuntimeError):
            loop.add_reader(fd, on_wakeup)

    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(add)
