"""Drop-in for agnes' `SessionProcessorStateRepository`, backed by fleetlog's processor bookkeeping.

`SessionProcessorStateRepository(fleet=None)` takes a `FleetSync` (default: the process's shared
one, fleetlog.compat.connect / `FLEETLOG_NATS_URL`) where the original took a DuckDB connection.
Synchronous like the original; the keyword names, return shapes and the scan rule (the 50 ms
mtime window) are the original's, carried out by `fleet.processors` (docs/architecture.md).
A read right after a write from the same repository sees it (the family's session token).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from fleetlog.compat._shared import shared
from fleetlog.services.client.sync import FleetSync

__all__ = ["SessionProcessorStateRepository"]


class SessionProcessorStateRepository:
    """Per-(processor, session file) bookkeeping: what was processed, when it was read, its MD5."""

    def __init__(self, fleet: FleetSync | None = None) -> None:
        self._fleet = fleet

    @property
    def _api(self) -> Any:
        return (self._fleet or shared()).processors

    def is_processed(self, processor_name: str, session_file: str, file_hash: str) -> bool:
        """A row exists for (processor_name, session_file) and its hash equals `file_hash`."""
        return bool(self._api.is_processed(processor_name, session_file, file_hash))

    def mark_processed(self, processor_name: str, session_file: str, username: str, items_count: int,
                       file_hash: str, read_at: datetime | None = None) -> None:
        """Upsert the row: processed_at = read_at (default now, UTC), the rest overwritten."""
        self._api.mark_processed(processor_name, session_file, username, items_count, file_hash, read_at)

    def delete_for_processors(self, processor_names: list[str]) -> int:
        """Delete every row of these processors; the number deleted ([] → 0)."""
        if not processor_names:
            return 0
        return int(self._api.delete_for_processors(list(processor_names)))

    def max_processed_at(self, processor_name: str) -> datetime | None:
        result: datetime | None = self._api.max_processed_at(processor_name)
        return result

    def activity_since(self, processor_name: str, since: datetime) -> dict[str, Any]:
        """{"last_processed_at": ..., "items_extracted": n} over rows processed at or after `since`."""
        result: dict[str, Any] = self._api.activity_since(processor_name, since)
        return result

    def processed_session_files(self, processor_name: str) -> set[str]:
        result: set[str] = self._api.processed_session_files(processor_name)
        return result

    def get_states_for_session_files(self, processor_name: str,
                                     session_files: Iterable[str]) -> dict[str, dict[str, Any]]:
        """{session_file: {"processed_at", "items_extracted"}} for the files that have a row ([] → {})."""
        files = list(session_files)
        if not files:
            return {}
        states = self._api.get_states_for_session_files(processor_name, files)
        return {k: {"processed_at": v["processed_at"], "items_extracted": v["items_extracted"]}
                for k, v in states.items()}

    def scan_unprocessed_for(self, processor_name: str, session_dir: Path) -> list[tuple[str, Path]]:
        """[(username, path)] of the session files this processor has to (re)process."""
        result: list[tuple[str, Path]] = self._api.scan_unprocessed_for(processor_name, Path(session_dir))
        return result
