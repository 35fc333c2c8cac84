"""The publisher's local append-only spool: where events wait while the broker is away.

Layout: `<root>/<instance>/seg-<n>.log` files of length-prefixed msgpack records
`(subject, msg_id, payload, attempts)`, plus `cursor` (segment, offset of the first record
not yet acked). Each live publisher holds an exclusive `flock` on its instance
directory; a directory nobody holds belongs to a process that died, and the
next publisher on the machine adopts its records (`adopt_orphans`).

Records reach the OS with every append (`flush()`), so a SIGKILLed agent loses
nothing that reached the spool; they are fsynced only with `fsync=True` (durable mode's
option), else a power cut can lose the last moments.

A spool belongs to one fleet: `<instance>/fleet` names it (`{"fleet": id, "urls": [...]}`).
The id is the broker's identity (`fleet_identity`), stamped once the publisher has
connected; until then only the configured URL set is known. An adopter takes over only
orphans of its own fleet, or unstamped ones spooled for the same URL set, and only those
spooled by the same identity (nkey public key, or none on an open broker): another identity's
records would be refused by the broker's permissions. Any other orphan is left where it is
(and reported by `fleetlog spool status`) until a process of its fleet and identity starts.
When the spool reaches its byte cap, further records are dropped, counted
(`dropped`) and logged: fleetlog never blocks or crashes an agent instead. So are records
a disk error (ENOSPC, EFBIG, EIO) refuses; the segment is cut back to its last whole record.

Adopting an orphan takes its records in order, a batch at a time, up to this spool's cap;
the rest stays in the orphan (its cursor moved past what was taken), which is removed only
once all of it was taken. An unreadable record (zeros a power cut or a full disk left) is
set aside in the dead letter. Reading the files: spool_files.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import BinaryIO

from fleetlog.services.backbone.nkeyauth import identity_of
from fleetlog.services.writepath.spool_files import (
    LEN,
    SpoolDir,
    SpoolRecord,
    decode_record,
    encode_record,
    lock_exclusive,
    read_owner,
    scan,
    survey,
    write_cursor,
    write_owner,
)

__all__ = ["Spool", "SpoolDir", "SpoolRecord", "survey"]

log = logging.getLogger("fleetlog.spool")

_SEGMENT_BYTES = 64 * 1024 * 1024


class Spool:
    """One publisher's spool directory. Thread-safe: agents' threads may spill into it."""

    def __init__(self, root: Path, max_bytes: int, urls: list[str] | None = None, *, fsync: bool = False) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.dropped = 0
        self.urls = sorted(urls or [])
        self.fleet: str | None = None
        # Records are published as the connection's identity: a spool of another identity's
        # records drained with this one would be refused and dead-lettered, never delivered.
        who = identity_of(urls)
        self.identity = None if who is None else who.public_key
        self._lock = threading.Lock()
        self.root.mkdir(parents=True, exist_ok=True)
        # Lock first, under a hidden name, then rename into view: an adopter scanning the
        # root must never see an unlocked directory that belongs to a live publisher.
        name = uuid.uuid4().hex
        hidden = self.root / f".new-{name}"
        hidden.mkdir()
        self._lock_file = open(hidden / "lock", "wb")
        fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        write_owner(hidden, None, self.urls, self.identity)
        self.dir = self.root / name
        hidden.rename(self.dir)
        self._write_seg = 0
        self._writer: BinaryIO = open(self._seg_path(0), "ab")
        self._write_off = 0
        self._read_seg = 0
        self._read_off = 0
        self._pending_records = 0
        self._pending_bytes = 0

    # -- state -------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Records spooled and not yet acked."""
        return self._pending_records

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def _seg_path(self, n: int) -> Path:
        return self.dir / f"seg-{n:08d}.log"

    # -- writing -----------------------------------------------------------
    def append(self, records: list[SpoolRecord], *, stop_at_cap: bool = False) -> int:
        """Append records in order; returns how many were kept (the rest hit the cap).

        With `stop_at_cap` (adopting another spool), nothing past the first record that does
        not fit is taken, and nothing is counted as dropped: the caller keeps the rest.
        A disk error (ENOSPC, EFBIG, EIO) or a spool already closed at exit counts the records
        as dropped, like the cap: record() never raises for it."""
        kept = 0
        failed: BaseException | None = None
        with self._lock:
            if self._lock_file.closed:
                # After the exit hook's last pass (a daemon thread recording as the interpreter
                # ends): counted, logged once.
                if not self.dropped:
                    log.error("spool closed at exit: events recorded from now on are dropped (counted)")
                self.dropped += len(records)
                return 0
            chunks = []
            size = 0
            for rec in records:
                blob = encode_record(tuple(rec))
                need = LEN.size + len(blob)
                if self._pending_bytes + size + need > self.max_bytes:
                    if stop_at_cap:
                        break
                    self.dropped += 1
                    continue
                chunks.append(LEN.pack(len(blob)))
                chunks.append(blob)
                size += need
                kept += 1
            if chunks:
                try:
                    self._write(b"".join(chunks))
                except (OSError, ValueError) as exc:  # ValueError: the file is closed (after the exit's last pass)
                    failed = exc
                    self.dropped += kept
                    kept = 0
                else:
                    self._pending_records += kept
                    self._pending_bytes += size
        if failed is not None:
            log.error("spool write failed (%s): dropped %d events (%d dropped in total)",
                      failed, len(records), self.dropped)
        elif kept < len(records) and not stop_at_cap:
            log.error(
                "spool full (%d bytes cap): dropped %d events (%d dropped in total)",
                self.max_bytes, len(records) - kept, self.dropped,
            )
        return kept

    def _write(self, blob: bytes) -> None:
        """Write a run of records at the end of the current segment, all or nothing: after a
        partial write the file is cut back, so that it and `_write_off` stay in step."""
        try:
            self._writer.write(blob)
            self._writer.flush()
            if self.fsync:
                os.fsync(self._writer.fileno())
        except OSError:
            with contextlib.suppress(OSError, ValueError):
                self._writer.close()
            with contextlib.suppress(OSError):
                os.truncate(self._seg_path(self._write_seg), self._write_off)
            self._writer = open(self._seg_path(self._write_seg), "ab")
            raise
        self._write_off += len(blob)
        if self._write_off >= _SEGMENT_BYTES:
            self._writer.close()
            self._write_seg += 1
            self._write_off = 0
            self._writer = open(self._seg_path(self._write_seg), "ab")

    # -- reading -----------------------------------------------------------
    def peek(self, max_records: int) -> list[tuple[SpoolRecord, int, int, int]]:
        """Up to max_records oldest records, each with the (segment, offset) just after it and its size."""
        out: list[tuple[SpoolRecord, int, int, int]] = []
        with self._lock:
            seg, off = self._read_seg, self._read_off
            while len(out) < max_records and (seg, off) < (self._write_seg, self._write_off):
                path = self._seg_path(seg)
                with open(path, "rb") as f:
                    f.seek(off)
                    data = f.read(min(8 * 1024 * 1024, max(1, os.path.getsize(path) - off)))
                pos = 0
                while len(out) < max_records and pos + LEN.size <= len(data):
                    (n,) = LEN.unpack_from(data, pos)
                    if pos + LEN.size + n > len(data):
                        break
                    rec = SpoolRecord(*decode_record(data[pos + LEN.size : pos + LEN.size + n]))
                    pos += LEN.size + n
                    out.append((rec, seg, off + pos, LEN.size + n))
                off += pos
                if seg < self._write_seg and off >= os.path.getsize(path):
                    seg, off = seg + 1, 0
                elif pos == 0:
                    break
        return out

    def commit(self, seg: int, off: int, records: int, nbytes: int) -> None:
        """Mark everything before (seg, off) as acked; delete finished segments."""
        with self._lock:
            for old in range(self._read_seg, seg):
                self._seg_path(old).unlink(missing_ok=True)
            self._read_seg, self._read_off = seg, off
            # Persisted so that an adopter of this spool (after a crash) skips what was acked
            # (if the disk refuses, it re-publishes them: duplicates, removed downstream).
            write_cursor(self.dir, seg, off)
            self._pending_records -= records
            self._pending_bytes -= nbytes
            if self._pending_records == 0 and (seg, off) == (self._write_seg, self._write_off):
                # Fully drained: start over at an empty segment 0 so the directory stays small.
                self._writer.close()
                for old in range(self._read_seg, self._write_seg + 1):
                    self._seg_path(old).unlink(missing_ok=True)
                self._write_seg = self._read_seg = 0
                self._write_off = self._read_off = 0
                self._pending_bytes = 0
                write_cursor(self.dir, 0, 0)
                self._writer = open(self._seg_path(0), "ab")

    # -- orphans -----------------------------------------------------------
    def stamp(self, fleet: str | None) -> None:
        """This spool now belongs to `fleet` (the broker it connected to)."""
        with self._lock:
            self.fleet = fleet
            write_owner(self.dir, fleet, self.urls, self.identity)

    def _mine(self, other: Path) -> bool:
        """Whether an orphan belongs to this spool's fleet and identity (module docstring)."""
        fleet, urls, identity = read_owner(other)
        if identity != self.identity:
            return False
        if fleet is not None:
            return fleet == self.fleet
        return urls is None or urls == self.urls  # urls None: written before spools were keyed

    def adopt_orphans(self, only: str | None = None) -> tuple[int, list[str]]:
        """Copy the records of this fleet's spools whose process died into this one.

        Returns the count adopted and the names of orphans left because they belong to
        another fleet or identity (never drained into this one). `only` names one orphan to take whatever
        fleet it was stamped for (`fleetlog spool drain --adopt`: a fleet that no longer exists).
        Blocking file work: the publisher runs it in a worker thread."""
        adopted = 0
        foreign: list[str] = []
        for other in sorted(self.root.iterdir()):
            if other == self.dir or not other.is_dir() or other.name.startswith("."):
                continue
            if only is not None and other.name != only:
                continue
            if only is None and not self._mine(other):
                foreign.append(other.name)
                continue
            lock_path = other / "lock"
            if not lock_path.exists():
                continue
            try:
                fh = open(lock_path, "rb")
            except OSError:
                continue
            try:
                if not lock_exclusive(fh):
                    continue  # a live publisher holds it
                adopted += self._adopt(other)
            finally:
                fh.close()
        if foreign:
            log.warning("left %d spool(s) of another fleet or identity in %s: %s (see `fleetlog spool status`)",
                        len(foreign), self.root, ", ".join(foreign))
        return adopted, foreign

    def _adopt(self, other: Path) -> int:
        """Take a dead spool's records in order, a batch at a time, until this spool's cap; the
        rest stays there (its cursor moved past what was taken) and the directory is removed
        only once everything was taken. Unreadable records go to the dead letter."""
        kept = 0
        bad = 0
        batch: list[SpoolRecord] = []
        ends: list[tuple[int, int]] = []
        full = False
        last: tuple[int, int] | None = None

        def take() -> bool:
            nonlocal kept, last
            n = self.append(batch, stop_at_cap=True) if batch else 0
            kept += n
            if n:
                last = ends[n - 1]
            done = n == len(batch)
            batch.clear()
            ends.clear()
            return done

        for item, seg, end in scan(other):
            if isinstance(item, bytes):
                if not take():
                    full = True
                    break
                bad += 1
                self.set_aside("", "", item, f"unreadable record in the spool of a dead process ({other.name})",
                               raw=True)
                last = (seg, end)
                continue
            batch.append(item)
            ends.append((seg, end))
            if len(batch) >= 1000 and not take():
                full = True
                break
        else:
            full = not take()
        if bad:
            log.error("%d unreadable records in %s set aside in %s", bad, other, self.root / "dead-letter.jsonl")
        if full:
            if last is not None:
                write_cursor(other, *last)
            log.error("spool full (%d bytes cap): adopted %d events from %s, the rest stays there for later",
                      self.max_bytes, kept, other)
            return kept
        if kept:
            log.warning("adopted %d spooled events from %s", kept, other)
        shutil.rmtree(other, ignore_errors=True)
        return kept

    def set_aside(self, msg_id: str, subject: str, payload: bytes, reason: str, *, raw: bool = False) -> None:
        """Record an event that will never be published in `<root>/dead-letter.jsonl`
        (`raw`: bytes that are not a record at all, kept as hex)."""
        line = json.dumps({"id": msg_id, "subject": subject, "reason": reason,
                           "payload": payload.hex() if raw else payload.decode("utf-8", "replace")})
        try:
            with self._lock, open(self.root / "dead-letter.jsonl", "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError as exc:  # a disk error never reaches the agent
            log.error("could not write the dead letter (%s): event %s on %s lost (%s)", exc, msg_id, subject, reason)

    def close(self) -> None:
        """Release the directory; remove it when nothing is left in it."""
        with self._lock:
            if self._lock_file.closed:
                return
            with contextlib.suppress(OSError):
                self._writer.close()
            empty = self._pending_records == 0
            if empty:
                shutil.rmtree(self.dir, ignore_errors=True)
            self._lock_file.close()
