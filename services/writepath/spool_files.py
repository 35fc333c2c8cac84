"""A spool's files, as any process reads them: the record format, the cursor, the owner file,
and `survey` (`fleetlog spool status`). `Spool` (spool.py) is the one live publisher's side:
appending, draining, adopting the spools of dead processes.

A record is a 4-byte big-endian length and a msgpack `(subject, msg_id, payload, attempts)`.
The reader is built for files a crash left behind: read a chunk at a time (a dead spool can
hold a GiB), a torn tail ends a segment, a record that does not decode comes back as raw
bytes for the caller to set aside.
"""

from __future__ import annotations

import fcntl
import json
import logging
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

import msgspec

__all__ = [
    "LEN", "Owner", "SpoolDir", "SpoolRecord", "decode_record", "encode_record", "lock_exclusive", "read_owner",
    "read_records", "scan", "survey", "write_cursor", "write_owner",
]

log = logging.getLogger("fleetlog.spool")

LEN = struct.Struct(">I")


class SpoolRecord(NamedTuple):
    subject: str
    msg_id: str
    payload: bytes
    attempts: int


encode_record = msgspec.msgpack.Encoder().encode
decode_record = msgspec.msgpack.Decoder(tuple[str, str, bytes, int]).decode


class SpoolDir(NamedTuple):
    """What `survey` finds in one instance directory."""

    name: str
    fleet: str | None
    urls: list[str]
    records: int
    bytes: int
    live: bool  # a running publisher holds it
    identity: str | None = None  # the nkey public key its records were to be published as


def _cursor(directory: Path) -> tuple[int, int]:
    try:
        raw = (directory / "cursor").read_text().split()
    except OSError:
        return 0, 0
    if len(raw) == 2 and raw[0].isdigit() and raw[1].isdigit():
        return int(raw[0]), int(raw[1])
    return 0, 0


def write_cursor(directory: Path, seg: int, off: int) -> None:
    try:
        tmp = directory / "cursor.tmp"
        tmp.write_text(f"{seg} {off}")
        tmp.replace(directory / "cursor")
    except OSError as exc:
        log.error("could not write the spool cursor in %s (%s): acked events may be published again", directory, exc)


_CHUNK = 1 << 20


def scan(directory: Path) -> Iterator[tuple[SpoolRecord | bytes, int, int]]:
    """Every unacked record of a spool, in order, with (segment, offset just after it), read
    a chunk at a time. A record that does not decode (zeros where a power cut or a full disk
    left them) comes as its raw bytes; a torn tail (a length with too few bytes after it) ends
    the segment."""
    seg, off = _cursor(directory)
    for path in sorted(directory.glob("seg-*.log")):
        n = int(path.stem.split("-")[1])
        if n < seg:
            continue
        pos = off if n == seg else 0
        with open(path, "rb") as f:
            f.seek(pos)
            buf = b""
            while True:
                more = f.read(_CHUNK)
                buf += more
                at = 0
                while at + LEN.size <= len(buf):
                    (size,) = LEN.unpack_from(buf, at)
                    if at + LEN.size + size > len(buf):
                        break
                    blob = buf[at + LEN.size : at + LEN.size + size]
                    at += LEN.size + size
                    try:
                        item: SpoolRecord | bytes = SpoolRecord(*decode_record(blob))
                    except (msgspec.DecodeError, TypeError, ValueError):
                        item = blob
                    yield item, n, pos + at
                pos += at
                buf = buf[at:]
                if not more:
                    break


def read_records(directory: Path) -> Iterator[SpoolRecord]:
    """Every readable unacked record of a spool, in order (`scan`)."""
    for item, _seg, _end in scan(directory):
        if not isinstance(item, bytes):
            yield item


def lock_exclusive(fh: BinaryIO) -> bool:
    """Take the exclusive lock of a spool nobody runs. A few tries: `survey` holds its probe
    lock for an instant, and that must not make a dead spool look live."""
    for attempt in range(5):
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            if attempt < 4:
                time.sleep(0.002)
    return False


class Owner(NamedTuple):
    """Whose records a spool holds: the fleet (broker identity), the URL set, and the identity
    (nkey public key; None: an open broker) the records were going to be published as."""

    fleet: str | None
    urls: list[str] | None
    identity: str | None


def write_owner(directory: Path, fleet: str | None, urls: list[str], identity: str | None) -> None:
    tmp = directory / "fleet.tmp"
    tmp.write_text(json.dumps({"fleet": fleet, "urls": urls, "identity": identity}))
    tmp.replace(directory / "fleet")  # atomic: an adopter never reads half a file


def read_owner(directory: Path) -> Owner:
    try:
        raw = json.loads((directory / "fleet").read_text())
    except (OSError, ValueError):
        return Owner(None, None, None)
    fleet, urls, identity = raw.get("fleet"), raw.get("urls"), raw.get("identity")
    return Owner(fleet if isinstance(fleet, str) else None, sorted(urls) if isinstance(urls, list) else None,
                 identity if isinstance(identity, str) else None)


def survey(root: Path) -> list[SpoolDir]:
    """Every instance directory under a spool root: whose fleet, how much is waiting, live or orphaned."""
    out: list[SpoolDir] = []
    if not root.is_dir():
        return out
    for d in sorted(root.iterdir()):
        if not d.is_dir() or d.name.startswith(".") or not (d / "lock").exists():
            continue
        live = False
        with open(d / "lock", "rb") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                live = True
        records = 0
        nbytes = 0
        for rec in read_records(d):  # a live spool's torn tail (a write under way) is skipped
            records += 1
            nbytes += len(rec.payload)
        owner = read_owner(d)
        out.append(SpoolDir(d.name, owner.fleet, owner.urls or [], records, nbytes, live, owner.identity))
    return out
