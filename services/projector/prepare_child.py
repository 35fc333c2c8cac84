"""A projection's `prepare_raw` in a child process: the decode off this process's GIL (issue 19).

Why: with 2 KB panes the fold was bound by the GIL, not the cores. The reader (event
loop), the prepare (msgspec decode, Arrow build: ~7 µs per event alone, 12-13 µs under
contention) and the fold thread (DuckDB's Python client takes the GIL back after every
task of every query, `CompletePendingQuery`) all queue for one lock, and the process
used 1.3 of 2 cores. Here the prepare of a large batch runs in a child process of its
own; the parent only moves buffers.

What crosses the pipe is the `RawBatch` and the projection's result, pickled with
protocol 5 and their buffers (Arrow columns) sent out of band: written and read with
plain `os.write`/`readinto` (no GIL while the kernel copies), no pickling of the bytes.

The child is a pure function of what it is sent: it reads no stream and no view, so
exactly-once stays where it was (the fold thread's transaction with its checkpoint). If
the child fails, hangs or dies, the batch is prepared on the calling thread as before
(and a later batch starts a new child); the child ends when the projector stops, when
its pipe closes, and on SIGTERM when the parent dies (`PR_SET_PDEATHSIG`).
Small (live) batches are prepared in process: a round trip costs ~1 ms, and a node
that is never behind never starts a child.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fleetlog.projections import Projection
    from fleetlog.projections._base import RawBatch

__all__ = ["PrepareChild"]

log = logging.getLogger("fleetlog.projector")

# Batches of fewer events are prepared in process (the live path: its latency target).
MIN_EVENTS = 1000
# A child that has not answered a batch in this long is killed (the batch is prepared here).
ANSWER_TIMEOUT_S = 60.0
# After a child failed, batches are prepared in process for this long before a new one starts.
RESPAWN_AFTER_S = 5.0
_PIPE_BYTES = 1 << 20  # F_SETPIPE_SZ: fewer, larger copies for ~10 MB batches
_F_SETPIPE_SZ = 1031
_PR_SET_PDEATHSIG = 1
_HEAD = struct.Struct("<QI")  # pickle length, buffer count; then one <Q length per buffer


class ChildFailed(RuntimeError):
    """The child could not prepare a batch (dead, hung, or its prepare raised)."""


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _read_exact(fd: int, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = os.readv(fd, [view[got:]])
        if k == 0:
            raise EOFError("the other end closed the pipe")
        got += k
    return buf


def send(fd: int, obj: Any) -> None:
    """One message: `obj` pickled (protocol 5), its buffers out of band and written as they are."""
    buffers: list[pickle.PickleBuffer] = []
    body = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    head = _HEAD.pack(len(body), len(raws)) + b"".join(struct.pack("<Q", r.nbytes) for r in raws)
    _write_all(fd, memoryview(head))
    _write_all(fd, memoryview(body))
    for r in raws:
        _write_all(fd, r)


def recv(fd: int) -> Any:
    size, count = _HEAD.unpack(_read_exact(fd, _HEAD.size))
    lengths = struct.unpack(f"<{count}Q", _read_exact(fd, 8 * count)) if count else ()
    body = _read_exact(fd, size)
    buffers = [_read_exact(fd, n) for n in lengths]
    return pickle.loads(body, buffers=buffers)


def _widen(fd: int) -> None:
    with contextlib.suppress(OSError):
        import fcntl

        fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_BYTES)


class PrepareChild:
    """The prepare of large batches in one child process, started on first use; thread-safe."""

    def __init__(self, min_events: int | None = None) -> None:
        self.min_events = MIN_EVENTS if min_events is None else min_events
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._known: set[str] = set()  # projections the child has been sent
        self._failed_at = -RESPAWN_AFTER_S
        self._closed = False
        self.batches = 0  # prepared by a child
        self.failures = 0  # batches a child could not prepare (prepared in process instead)

    def prepare(self, projection: Projection, raw: RawBatch) -> Any:
        """`projection.prepare_raw(raw)`, in the child when the batch is large enough and a child is
        (or can be) running; else on this thread."""
        if raw.table.num_rows >= self.min_events:
            with self._lock:
                try:
                    return self._in_child(projection, raw)
                except ChildFailed as exc:
                    self.failures += 1
                    self._failed_at = time.monotonic()
                    log.warning("prepare child: %s; preparing in process", exc)
                    self._kill()
                except _NoChild:
                    pass
        return projection.prepare_raw(raw)

    def _in_child(self, projection: Projection, raw: RawBatch) -> Any:
        proc = self._ensure()
        assert proc.stdin is not None and proc.stdout is not None
        out_fd, in_fd = proc.stdin.fileno(), proc.stdout.fileno()
        try:
            if projection.name not in self._known:
                send(out_fd, ("projection", projection))
                self._known.add(projection.name)
            send(out_fd, ("prepare", projection.name, raw))
            if not _wait_readable(in_fd, ANSWER_TIMEOUT_S):
                raise ChildFailed(f"no answer in {ANSWER_TIMEOUT_S:.0f} s")
            kind, value = recv(in_fd)
        except (OSError, EOFError, pickle.PickleError, struct.error) as exc:
            raise ChildFailed(f"the child is gone ({exc!r})") from None
        if kind != "ok":
            raise ChildFailed(f"its prepare raised: {value}")
        self.batches += 1
        return value

    def _ensure(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        if self._closed or time.monotonic() - self._failed_at < RESPAWN_AFTER_S:
            raise _NoChild
        self._kill()
        proc = subprocess.Popen(
            [sys.executable, "-m", "fleetlog.services.projector.prepare_child", str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, close_fds=True,
        )
        assert proc.stdin is not None and proc.stdout is not None
        _widen(proc.stdin.fileno())
        _widen(proc.stdout.fileno())
        self._proc = proc
        self._known.clear()
        log.info("prepare child started (pid %d)", proc.pid)
        return proc

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for stream in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                if stream is not None:
                    stream.close()
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)

    def close(self) -> None:
        """End the child (closing its pipe ends its loop; it is killed if it does not)."""
        with self._lock:
            self._closed = True
            proc = self._proc
            if proc is not None and proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
            self._kill()


class _NoChild(Exception):
    """No child now (closed, or waiting after a failure): prepare in process."""


def _wait_readable(fd: int, timeout: float) -> bool:
    import select

    readable, _, _ = select.select([fd], [], [], timeout)
    return bool(readable)


def _die_with(parent: int) -> None:
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(libc_name, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the prctl: nobody would signal us
        os._exit(1)


def main(parent: int) -> None:
    """The child's loop: projections as they are sent, then one answer per batch, in order."""
    _die_with(parent)
    from fleetlog.projections._base import RawBatch  # noqa: F401 (unpickled below)

    # The pipes get private descriptors: a stray print or a library's output goes to stderr,
    # never into the protocol.
    in_fd, out_fd = os.dup(0), os.dup(1)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)
    projections: dict[str, Projection] = {}
    while True:
        try:
            message = recv(in_fd)
        except EOFError:
            return  # the parent closed the pipe (stopped, or died)
        if message[0] == "projection":
            projections[message[1].name] = message[1]
            continue
        _, name, raw = message
        try:
            answer: tuple[str, Any] = ("ok", projections[name].prepare_raw(raw))
        except Exception as exc:  # the parent prepares this batch itself
            answer = ("error", f"{type(exc).__name__}: {exc}")
        del raw
        send(out_fd, answer)


if __name__ == "__main__":
    main(int(sys.argv[1]))
