"""Session-processor bookkeeping: one row per (processor, session file), run audit records,
and the processor lock.

A processor reads `<session_dir>/<user>/<file>.jsonl` on its own cadence. What it
processed is one compacted subject per (processor, session file):
`proc.session` on `fleet.proc.<p>.session.<session_file>` (processed_at, items_extracted,
file_hash, username; each mark overwrites the row), and `proc.session.deleted` on
the same subject as its tombstone. Every run leaves one audit record (`proc.run` on
`fleet.proc.<p>.run.<run_id>`): the runner's stats, `ok`, and `unhandled_error` when
the runner itself failed. One lock per processor (`proc.lock` on
`fleet.proc.<p>.lock`) has at most one holder at a time, decided by JetStream's
expected last subject sequence; the stream seq of its `acquired` message is the
fencing token, and the runner's marks are published only while the lock subject is
where the holder left it, so a holder that lost its lock cannot write.

Version 2 (v=2 on every event of this family): version 1 had per-file content-hash
markers (`proc.file`) and start/finish run records; those are gone, not kept beside.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, ClassVar, Final

import msgspec

from . import subjects
from ._base import Event, Identity, Text, Version
from .answers import Answer

__all__ = [
    "LOCK_STATES",
    "ProcActivity",
    "ProcActivityQuery",
    "ProcLock",
    "ProcLockQuery",
    "ProcRun",
    "ProcRunList",
    "ProcRunRequest",
    "ProcRunStats",
    "ProcRunsQuery",
    "ProcSession",
    "ProcSessionList",
    "ProcSessionsQuery",
    "ProcSummary",
    "ProcSummaryList",
    "ProcSummaryQuery",
    "ProcessorEvent",
    "ProcessorLockChanged",
    "ProcessorRunRecorded",
    "ProcessorSessionDeleted",
    "ProcessorSessionMarked",
]

LOCK_STATES: Final = ("acquired", "renewed", "released")
SessionFile = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
Limit = Annotated[int, msgspec.Meta(ge=1, le=10_000)]


class ProcessorEvent(Event, kw_only=True, frozen=True):
    STREAM: ClassVar[str] = "FLEET_PROCESSORS"

    processor: Identity
    v: Version = 2


class ProcessorSessionMarked(ProcessorEvent, tag="proc.session", kw_only=True, frozen=True):
    """What `processor` took from one session file: the whole row (compacted per session file).

    `processed_at` is naive UTC (when the file was read: the runner takes it before hashing);
    None only in rows carried over from elsewhere, which a scan always surfaces. `fence` is
    the lock tenure the runner marked under (None for a plain `mark_processed`)."""

    session_file: SessionFile  # "<user dir>/<file>.jsonl"
    username: str
    items_extracted: int
    file_hash: str
    processed_at: datetime | None
    fence: int | None = None

    def subject(self) -> str:
        return subjects.proc_session(self.processor, self.session_file)


class ProcessorSessionDeleted(ProcessorEvent, tag="proc.session.deleted", kw_only=True, frozen=True):
    """The tombstone of one (processor, session file) row."""

    session_file: SessionFile

    def subject(self) -> str:
        return subjects.proc_session(self.processor, self.session_file)


class ProcessorRunRecorded(ProcessorEvent, tag="proc.run", kw_only=True, frozen=True):
    """One run's audit record, published once when the run ends: the runner's stats, `ok`
    (errors == 0 and no unhandled error) and `unhandled_error` ("Type: message") when the
    runner itself failed."""

    run_id: Identity
    session_dir: str = ""
    started_at: float | None = None  # epoch seconds
    finished_at: float | None = None
    scanned: int = 0
    processed: int = 0
    skipped: int = 0
    capped: int = 0
    errors: int = 0
    items_extracted: int = 0
    errors_detail: list[dict[str, str]] = msgspec.field(default_factory=list)
    ok: bool = True
    unhandled_error: str | None = None
    holder: str | None = None

    def subject(self) -> str:
        return subjects.proc_run(self.processor, self.run_id)


class ProcessorLockChanged(ProcessorEvent, tag="proc.lock", kw_only=True, frozen=True):
    """State-carrying lock record, written with an expected last subject sequence.

    `fence` is the stream seq of the `acquired` message this holder's tenure began
    with (None on that message itself: it is its own seq)."""

    holder: str | None
    state: Text  # "acquired" | "renewed" | "released"
    lease_expires_at: float | None = None
    fence: int | None = None

    def subject(self) -> str:
        return subjects.proc_lock(self.processor)


# ---- views, queries and answers (fleetlog.processors.*) ----


class ProcSession(msgspec.Struct, kw_only=True):
    """One bookkeeping row (the store's columns, plus the stream seq)."""

    processor: str
    session_file: str
    username: str
    processed_at: datetime | None  # naive UTC
    items_extracted: int
    file_hash: str
    seq: int


class ProcSessionsQuery(msgspec.Struct, kw_only=True):
    """A processor's rows: the named session files (any subset; the client sends chunks), or
    all of them by session_file, paged (`after` is the cursor)."""

    processor: str
    session_files: Annotated[list[str], msgspec.Meta(max_length=10_000)] | None = None
    after: str | None = None
    limit: Limit = 1000
    min_seq: dict[str, int] | None = None


class ProcSessionList(Answer, kw_only=True):
    items: list[ProcSession]
    next_cursor: str | None = None


class ProcActivityQuery(msgspec.Struct, kw_only=True):
    """Rows with processed_at >= since (naive UTC; None: every row)."""

    processor: str
    since: datetime | None = None
    min_seq: dict[str, int] | None = None


class ProcActivity(Answer, kw_only=True):
    last_processed_at: datetime | None = None
    items_extracted: int = 0
    sessions: int = 0


class ProcRun(msgspec.Struct, kw_only=True):
    processor: str
    run_id: str
    session_dir: str
    started_at: float | None
    finished_at: float | None
    scanned: int
    processed: int
    skipped: int
    capped: int
    errors: int
    items_extracted: int
    errors_detail: list[dict[str, str]]
    ok: bool
    unhandled_error: str | None
    holder: str | None
    seq: int


class ProcRunsQuery(msgspec.Struct, kw_only=True):
    """Run records, newest first; `run_id` picks one."""

    processor: str
    run_id: str | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 20
    before_seq: int | None = None
    min_seq: dict[str, int] | None = None


class ProcRunList(Answer, kw_only=True):
    items: list[ProcRun]
    next_cursor: int | None = None


class ProcLock(Answer, kw_only=True):
    """A processor's lock. `held`: acquired or renewed and the lease not past (the server's clock)."""

    processor: str
    holder: str | None = None
    state: str | None = None  # None: never locked
    fence: int | None = None
    lease_expires_at: float | None = None
    held: bool = False
    seq: int | None = None  # the lock subject's last seq (what fenced writes are guarded on)


class ProcLockQuery(msgspec.Struct, kw_only=True):
    processor: str
    now: float | None = None
    min_seq: dict[str, int] | None = None


class ProcSummaryQuery(msgspec.Struct, kw_only=True):
    now: float | None = None
    min_seq: dict[str, int] | None = None


class ProcSummary(msgspec.Struct, kw_only=True):
    processor: str
    sessions: int  # bookkeeping rows
    items_extracted: int
    last_processed_at: datetime | None
    runs: int
    last_run: ProcRun | None  # the newest run record
    lock_holder: str | None  # who holds the lock now (None: free)


class ProcSummaryList(Answer, kw_only=True):
    items: list[ProcSummary]


class ProcRunRequest(msgspec.Struct, kw_only=True):
    """`fleetlog.processors.run`: run a registered processor on the serving machine's sessions.
    `max_sessions_per_run` None: the server's FLEETLOG_PROCESSOR_MAX_PER_RUN."""

    processor: Identity
    max_sessions_per_run: int | None = None
    time_budget_seconds: Annotated[float, msgspec.Meta(ge=0)] = 150.0


class ProcRunStats(msgspec.Struct, kw_only=True):
    """What a run did (the store's keys, exactly)."""

    processor: str
    scanned: int
    processed: int
    skipped: int
    capped: int
    errors: int
    items_extracted: int
    errors_detail: list[dict[str, str]]
