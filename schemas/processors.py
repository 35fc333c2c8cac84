"""Batch-processor bookkeeping: per-file markers, run records and the processor lock."""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec

from . import subjects
from ._base import Event, Identity, Text

__all__ = ["ProcessorEvent", "ProcessorFileMarked", "ProcessorLockChanged", "ProcessorRunRecorded"]


class ProcessorEvent(Event, kw_only=True, frozen=True):
    STREAM: ClassVar[str] = "FLEET_PROCESSORS"

    processor: Identity


class ProcessorFileMarked(ProcessorEvent, tag="proc.file", kw_only=True, frozen=True):
    """The latest known status of one file for one processor (compacted per file)."""

    file_path: str
    file_hash: Identity
    status: Text
    size: int | None = None
    detail: dict[str, Any] = msgspec.field(default_factory=dict)

    def subject(self) -> str:
        return subjects.proc_file(self.processor, self.file_hash)


class ProcessorRunRecorded(ProcessorEvent, tag="proc.run", kw_only=True, frozen=True):
    run_id: Identity
    status: Text
    started_at: int | None = None
    finished_at: int | None = None
    files_total: int = 0
    files_ok: int = 0
    files_failed: int = 0
    detail: dict[str, Any] = msgspec.field(default_factory=dict)

    def subject(self) -> str:
        return subjects.proc_run(self.processor, self.run_id)


class ProcessorLockChanged(ProcessorEvent, tag="proc.lock", kw_only=True, frozen=True):
    """State-carrying lock record, written with an expected last subject sequence."""

    holder: str | None
    state: Text  # "acquired" | "renewed" | "released" | "expired"
    lease_expires_at: float | None = None
    fence: int | None = None

    def subject(self) -> str:
        return subjects.proc_lock(self.processor)
