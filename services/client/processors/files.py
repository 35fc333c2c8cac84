"""The session files a processor reads, and the scan rule that decides which to surface.

Sessions lie at `<session_dir>/<user dir>/<file>.jsonl`; a file's bookkeeping key is
`"<user dir>/<file>"`. The rule is the store's, kept exactly (its residual gap too):
a file is surfaced when it has no row, its row has no processed_at, it cannot be
stat'ed, its mtime is at or after processed_at, or its mtime lies within 50 ms
(inclusive) before processed_at and its MD5 differs from the stored one (or cannot be
read). A file whose mtime lies further before processed_at is skipped *without
hashing*: a content change that kept an older mtime goes unseen (documented gap).
Times compare in naive UTC.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec

__all__ = ["MTIME_WINDOW", "SessionFile", "compute_file_hash", "list_session_files", "mtime_utc", "parse_jsonl",
           "select_unprocessed", "utcnow"]

log = logging.getLogger("fleetlog.processors")

# Within this much before processed_at, an mtime cannot tell "written before the read" from
# "written during it" (filesystem timestamp granularity, clock skew): the hash decides.
MTIME_WINDOW = timedelta(milliseconds=50)
_EPOCH = datetime(1970, 1, 1)
_decode = msgspec.json.decode


def utcnow() -> datetime:
    """Now as naive UTC (the store's processed_at)."""
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True, slots=True)
class SessionFile:
    username: str  # the user directory's name
    key: str  # "<user dir>/<file>", the bookkeeping key
    path: Path


def compute_file_hash(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """MD5 hex digest of a file's content (the store's file_hash)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def parse_jsonl(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The JSON objects of a .jsonl file, one a line; blank lines are skipped, and so are
    malformed ones (with a warning naming the file and line) and lines that are not objects."""
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                value = _decode(line)
            except msgspec.DecodeError as exc:
                log.warning("%s:%d: malformed JSON line skipped: %s", path, number, exc)
                continue
            if isinstance(value, dict):
                yield value
            else:
                log.warning("%s:%d: not a JSON object, skipped", path, number)


def list_session_files(session_dir: Path) -> list[SessionFile]:
    """Every `*.jsonl` directly inside each directory directly under session_dir: directories in
    the order the filesystem lists them (not sorted, as the store), files sorted by name.
    Non-directories under session_dir are skipped; a missing session_dir has none.

    os.scandir rather than Path.glob: the same entries (pathlib's `*` matches dotfiles too),
    at a third of the cost on 10,000 sessions (docs/benchmarks.md)."""
    if not session_dir.is_dir():
        return []
    found: list[SessionFile] = []
    with os.scandir(session_dir) as top:
        user_dirs = [e for e in top if e.is_dir()]
    for user_dir in user_dirs:
        try:
            with os.scandir(user_dir.path) as inner:
                names = sorted(e.name for e in inner if e.name.endswith(".jsonl"))
        except OSError:  # gone or unreadable since the listing: it has no sessions to offer
            continue
        base = session_dir / user_dir.name
        found.extend(SessionFile(user_dir.name, f"{user_dir.name}/{name}", base / name) for name in names)
    return found


def mtime_utc(path: Path) -> datetime:
    """The file's mtime as naive UTC, to the microsecond (from st_mtime_ns: no float rounding)."""
    return _EPOCH + timedelta(microseconds=os.stat(path).st_mtime_ns // 1000)


def _us(at: datetime) -> int:
    """Microseconds since the epoch of a naive UTC datetime (exact: no float)."""
    d = at - _EPOCH
    return (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds


_WINDOW_US = MTIME_WINDOW // timedelta(microseconds=1)


def select_unprocessed(files: list[SessionFile], rows: Mapping[str, Mapping[str, Any]],
                       hash_file: Callable[[Path], str] = compute_file_hash) -> list[SessionFile]:
    """The files the rule surfaces (see the module docstring), in the order given.
    `rows`: key -> {"processed_at": naive UTC datetime | None, "file_hash": str, ...}.
    Compared as integer microseconds (what `mtime_utc` and processed_at both resolve to)."""
    out: list[SessionFile] = []
    for f in files:
        row = rows.get(f.key)
        processed_at = row.get("processed_at") if row is not None else None
        if row is None or processed_at is None:
            out.append(f)
            continue
        try:
            mtime = os.stat(f.path).st_mtime_ns // 1000
        except OSError:
            out.append(f)
            continue
        processed = _us(processed_at)
        if mtime >= processed:
            out.append(f)
        elif processed - mtime <= _WINDOW_US:
            try:
                same = hash_file(f.path) == row.get("file_hash")
            except OSError:
                same = False
            if not same:
                out.append(f)
    return out
