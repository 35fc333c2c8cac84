"""The publisher's local append-only spool: where events wait while the broker is away.

Layout: `<root>/<instance>/seg-<n>.log` files of length-prefixed msgpack records
`(subject, msg_id, payload, attempts)`, plus `cursor` (segment, offset of the first record
not yet acked). Each live publisher holds an exclusive `flock` on its instance
directory; a directory nobody holds belongs to a process that died, and the
next publisher on the machine adopts its records (`adopt_orphans`).

Records reach the OS with every append (`flush()`), so a SIGKILLed agent loses
nothing; they are not fsynced, so a power cut can lose the last moments.
When the spool reaches its byte cap, further records are dropped, counted
(`dropped`) and logged: fleetlog never blocks or crashes an agent instead.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import struct
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

import msgspec

__all__ = ["Spool", "SpoolRecord"]

log = logging.getLogger("fleetlog.spool")

_LEN = struct.Struct(">I")
_SEGMENT_BYTES = 64 * 1024 * 1024


class SpoolRecord(NamedTuple):
    subject: str
    msg_id: str
    payload: bytes
    attempts: int


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(tuple[str, str, bytes, int]).decode


class Spool:
    """One publisher's spool directory. Thread-safe: agents' threads may spill into it."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.dropped = 0
        self._lock = threading.Lock()
        self.root.mkdir(parents=True, exist_ok=True)
        # Lock first, under a hidden name, then rename into view: an adopter scanning the
        # root must never see an unlocked directory that belongs to a live publisher.
        name = uuid.uuid4().hex
        hidden = self.root / f".new-{name}"
        hidden.mkdir()
        self._lock_file = open(hidden / "lock", "wb")
        fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
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
    def append(self, records: list[SpoolRecord]) -> int:
        """Append records in order; returns how many were kept (the rest hit the cap)."""
        kept = 0
        with self._lock:
            chunks = []
            size = 0
            for rec in records:
                blob = _encode(tuple(rec))
                need = _LEN.size + len(blob)
                if self._pending_bytes + size + need > self.max_bytes:
                    self.dropped += 1
                    continue
                chunks.append(_LEN.pack(len(blob)))
                chunks.append(blob)
                size += need
                kept += 1
            if chunks:
                self._writer.write(b"".join(chunks))
                self._writer.flush()
                self._write_off += size
                self._pending_records += kept
                self._pending_bytes += size
                if self._write_off >= _SEGMENT_BYTES:
                    self._writer.close()
                    self._write_seg += 1
                    self._write_off = 0
                    self._writer = open(self._seg_path(self._write_seg), "ab")
        if kept < len(records):
            log.error(
                "spool full (%d bytes cap): dropped %d events (%d dropped in total)",
                self.max_bytes, len(records) - kept, self.dropped,
            )
        return kept

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
                while len(out) < max_records and pos + _LEN.size <= len(data):
                    (n,) = _LEN.unpack_from(data, pos)
                    if pos + _LEN.size + n > len(data):
                        break
                    rec = SpoolRecord(*_decode(data[pos + _LEN.size : pos + _LEN.size + n]))
                    pos += _LEN.size + n
                    out.append((rec, seg, off + pos, _LEN.size + n))
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
            # Persisted so that an adopter of this spool (after a crash) skips what was acked.
            (self.dir / "cursor").write_text(f"{seg} {off}")
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
                (self.dir / "cursor").write_text("0 0")
                self._writer = open(self._seg_path(0), "ab")

    # -- orphans -----------------------------------------------------------
    def adopt_orphans(self) -> int:
        """Copy the records of spools whose process died into this one; returns the count."""
        adopted = 0
        for other in sorted(self.root.iterdir()):
            if other == self.dir or not other.is_dir() or other.name.startswith("."):
                continue
            lock_path = other / "lock"
            if not lock_path.exists():
                continue
            try:
                fh = open(lock_path, "rb")
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # a live publisher holds it
                records = list(_read_dir(other))
                if records:
                    self.append(records)
                    adopted += len(records)
                    log.warning("adopted %d spooled events from %s", len(records), other)
                shutil.rmtree(other, ignore_errors=True)
            finally:
                fh.close()
        return adopted

    def set_aside(self, msg_id: str, subject: str, payload: bytes, reason: str) -> None:
        """Record an event that will never be published in `<root>/dead-letter.jsonl`."""
        line = json.dumps({"id": msg_id, "subject": subject, "reason": reason,
                           "payload": payload.decode("utf-8", "replace")})
        with self._lock, open(self.root / "dead-letter.jsonl", "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def close(self) -> None:
        """Release the directory; remove it when nothing is left in it."""
        with self._lock:
            self._writer.close()
            empty = self._pending_records == 0
            if empty:
                shutil.rmtree(self.dir, ignore_errors=True)
            self._lock_file.close()


def _read_dir(directory: Path) -> Iterator[SpoolRecord]:
    """Every unacked record of a dead publisher's spool, in order (a torn tail is skipped)."""
    seg, off = 0, 0
    cursor = directory / "cursor"
    if cursor.exists():
        raw = cursor.read_text().split()
        if len(raw) == 2:
            seg, off = int(raw[0]), int(raw[1])
    for path in sorted(directory.glob("seg-*.log")):
        n = int(path.stem.split("-")[1])
        if n < seg:
            continue
        data = path.read_bytes()
        pos = off if n == seg else 0
        while pos + _LEN.size <= len(data):
            (size,) = _LEN.unpack_from(data, pos)
            if pos + _LEN.size + size > len(data):
                break
            yield SpoolRecord(*_decode(data[pos + _LEN.size : pos + _LEN.size + size]))
            pos += _LEN.size + size
