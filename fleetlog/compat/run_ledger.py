"""Drop-in for LangBot's `RunLedgerStore`, backed by fleetlog's run ledger and runtimes.

`RunLedgerStore(fleet)` takes a connected async `Fleet` instead of a database engine. Every
method keeps the original's name, keyword names, async nature and return shape (dicts with the
original keys, tuples where it returned tuples); the behaviour is `fleet.runs` /
`fleet.runtimes` (docs/architecture.md, run ledger). What differs is in docs/migrating.md.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Final, TypeVar

import msgspec

from fleetlog.schemas.runs import RUN_STATUSES as _RUN_STATUSES
from fleetlog.schemas.runs import TERMINAL_RUN_STATUSES
from fleetlog.services.client.fleet import Fleet

__all__ = ["RUN_STATUSES", "TERMINAL_STATUSES", "RunLedgerStore"]

RUN_STATUSES: Final = set(_RUN_STATUSES)
TERMINAL_STATUSES: Final = set(TERMINAL_RUN_STATUSES)
T = TypeVar("T")

_RUN_KEYS: Final = (
    "id", "run_id", "event_id", "agent_id", "binding_id", "runner_id", "conversation_id", "thread_id",
    "workspace_id", "bot_id", "status", "status_reason", "queue_name", "priority", "requested_runtime_id",
    "claimed_by_runtime_id", "claim_lease_expires_at", "dispatch_attempts", "last_claimed_at", "created_at",
    "started_at", "finished_at", "updated_at", "deadline_at", "cancel_requested_at", "usage", "cost", "metadata",
)
_RUNTIME_KEYS: Final = (
    "id", "runtime_id", "status", "display_name", "endpoint", "version", "capabilities", "labels", "metadata",
    "last_heartbeat_at", "heartbeat_deadline_at", "created_at", "updated_at",
)
_EVENT_KEYS: Final = (
    "id", "run_id", "sequence", "type", "data", "usage", "created_at", "source", "artifact_refs", "metadata",
)


def _pick(view: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    data: dict[str, Any] = msgspec.to_builtins(view)
    return {k: data[k] for k in keys}


def _run(view: Any) -> dict[str, Any] | None:
    return None if view is None else _pick(view, _RUN_KEYS)


def _runtime(view: Any) -> dict[str, Any] | None:
    return None if view is None else _pick(view, _RUNTIME_KEYS)


def _event(view: Any) -> dict[str, Any] | None:
    return None if view is None else _pick(view, _EVENT_KEYS)


class _Clock:
    """The ledger's clock: real time, plus what the test hook moved it by, or pinned to a `now=`."""

    def __init__(self, base: Callable[[], float]) -> None:
        self.base = base
        self.offset = 0.0
        self.pinned: float | None = None

    def __call__(self) -> float:
        return self.pinned if self.pinned is not None else self.base() + self.offset


class RunLedgerStore:
    """Host-owned runs, their result events and the runtime registry."""

    def __init__(self, fleet: Fleet, clock: Callable[[], float] | None = None) -> None:
        self._fleet = fleet
        self._clock = _Clock(clock or time.time)
        fleet.runs.clock = self._clock
        fleet.runtimes.clock = self._clock
        self._token: dict[str, int] = {}  # heartbeats are fire-and-forget: reads wait for our last one

    async def _at(self, now: datetime | None, call: Callable[[], Awaitable[T]]) -> T:
        if now is None:
            return await call()
        self._clock.pinned = now.timestamp()
        try:
            return await call()
        finally:
            self._clock.pinned = None

    async def expire_claim_for_tests(self, run_id: str) -> None:
        """Test hook replacing the original tests' SQL update: move this ledger's clock past the
        run's lease (every lease and heartbeat deadline ages with it)."""
        run = await self._fleet.runs.get(run_id)
        if run is not None and run.claim_lease_expires_at is not None:
            self._clock.offset += max(0.0, run.claim_lease_expires_at - self._clock() + 1.0)

    # -- runs --------------------------------------------------------------------------
    async def create_run(
        self, *, run_id: str, event_id: str | None, binding_id: str | None, runner_id: str,
        conversation_id: str | None = None, thread_id: str | None = None, workspace_id: str | None = None,
        bot_id: str | None = None, agent_id: str | None = None, deadline_at: int | float | None = None,
        authorization: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None,
        status: str = "running", queue_name: str | None = None, priority: int = 0,
        requested_runtime_id: str | None = None,
    ) -> dict[str, Any]:
        view = await self._fleet.runs.create(
            run_id, runner_id, status, queue_name=queue_name, priority=priority,
            requested_runtime_id=requested_runtime_id, conversation_id=conversation_id, thread_id=thread_id,
            workspace_id=workspace_id, bot_id=bot_id, agent_id=agent_id, binding_id=binding_id, event_id=event_id,
            deadline_at=None if deadline_at is None else int(deadline_at), authorization=authorization,
            metadata=metadata,
        )
        return _pick(view, _RUN_KEYS)

    async def claim_next_run(
        self, *, runtime_id: str, queue_name: str | None = None, lease_seconds: int = 60,
        runner_ids: list[str] | None = None, conversation_id: str | None = None, bot_id: str | None = None,
        workspace_id: str | None = None, thread_id: str | None = None, strict_thread: bool = False,
    ) -> dict[str, Any] | None:
        claimed = await self._fleet.runs.claim_next(
            runtime_id, queue_name, max(int(lease_seconds), 1), runner_ids=runner_ids,
            conversation_id=conversation_id, bot_id=bot_id, workspace_id=workspace_id, thread_id=thread_id,
            strict_thread=strict_thread,
        )
        if claimed is None:
            return None
        return {**_pick(claimed, _RUN_KEYS), "claim_token": claimed.claim_token}

    async def renew_claim(self, *, run_id: str, claim_token: str, runtime_id: str | None = None,
                          lease_seconds: int = 60) -> dict[str, Any] | None:
        return _run(await self._fleet.runs.renew(run_id, claim_token, max(int(lease_seconds), 1), runtime_id))

    async def release_claim(self, *, run_id: str, claim_token: str, runtime_id: str | None = None,
                            status: str = "queued", status_reason: str | None = None) -> dict[str, Any] | None:
        return _run(await self._fleet.runs.release(run_id, claim_token, status, status_reason, runtime_id))

    async def release_expired_claims(self, *, now: datetime | None = None, status: str = "queued",
                                     status_reason: str = "claim lease expired",
                                     limit: int = 100) -> list[dict[str, Any]]:
        """Expired claims back to queued with reason "claim lease expired" (fleetlog's sweeper rule:
        `status` and `status_reason` other than those defaults are refused)."""
        if status != "queued" or status_reason != "claim lease expired":
            raise ValueError("release_expired_claims: fleetlog releases expired claims to 'queued' with reason "
                             "'claim lease expired' only")
        views = await self._at(now, lambda: self._fleet.runs.release_expired(limit))
        return [_pick(v, _RUN_KEYS) for v in views]

    async def append_event(
        self, *, run_id: str, sequence: int, event_type: str, data: dict[str, Any] | None = None,
        usage: dict[str, Any] | None = None, source: str = "runner", artifact_refs: list[Any] | None = None,
        metadata: dict[str, Any] | None = None, claim_token: str | None = None,
    ) -> dict[str, Any] | None:
        view = await self._fleet.runs.append_event(run_id, sequence, event_type, data, usage, source, artifact_refs,
                                                   metadata, claim_token=claim_token)
        return _event(view)

    async def append_audit_event(self, *, run_id: str, event_type: str, data: dict[str, Any] | None = None,
                                 metadata: dict[str, Any] | None = None) -> dict[str, Any] | None:
        return _event(await self._fleet.runs.append_audit_event(run_id, event_type, data, metadata))

    async def finalize_run(
        self, *, run_id: str, status: str, status_reason: str | None = None, usage: dict[str, Any] | None = None,
        cost: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None,
        claim_token: str | None = None, runtime_id: str | None = None,
    ) -> dict[str, Any] | None:
        view = await self._fleet.runs.finalize(run_id, status, status_reason, usage, cost, metadata,
                                               claim_token=claim_token, runtime_id=runtime_id)
        return _run(view)

    async def validate_active_claim(self, *, run_id: str, runtime_id: str, claim_token: str) -> bool:
        return await self._fleet.runs.validate_active_claim(run_id, claim_token, runtime_id)

    async def request_cancel(self, *, run_id: str, status_reason: str | None = None) -> dict[str, Any] | None:
        return _run(await self._fleet.runs.request_cancel(run_id, status_reason))

    async def get_run(self, run_id: str) -> dict[str, Any] | None:
        return _run(await self._fleet.runs.get(run_id))

    async def list_runs(
        self, *, conversation_id: str | None = None, statuses: list[str] | None = None, before_id: int | None = None,
        limit: int = 50, bot_id: str | None = None, workspace_id: str | None = None, thread_id: str | None = None,
        strict_thread: bool = False, runner_id: str | None = None, binding_id: str | None = None,
        agent_id: str | None = None,
    ) -> tuple[list[dict[str, Any]], int | None, bool, int]:
        """(items, next_cursor, has_more, total_count), newest first; `before_id` pages on."""
        page = await self._fleet.runs.list(
            conversation_id, statuses, runner_id, bot_id, workspace_id, thread_id, strict_thread, before_id,
            int(limit), binding_id=binding_id, agent_id=agent_id,
        )
        return [_pick(v, _RUN_KEYS) for v in page.items], page.next_cursor, page.has_more, page.total_count

    async def page_run_events(
        self, *, run_id: str, before_sequence: int | None = None, after_sequence: int | None = None,
        limit: int = 50, direction: str = "forward",
    ) -> tuple[list[dict[str, Any]], int | None, int | None, bool]:
        """(items, next_cursor, prev_cursor, has_more)."""
        page = await self._fleet.runs.events(run_id, before_sequence, after_sequence, int(limit), direction)
        return [_pick(v, _EVENT_KEYS) for v in page.items], page.next_cursor, page.prev_cursor, page.has_more

    # -- runtimes ----------------------------------------------------------------------
    async def register_runtime(
        self, *, runtime_id: str, status: str = "online", display_name: str | None = None,
        endpoint: str | None = None, version: str | None = None, capabilities: dict[str, Any] | None = None,
        labels: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None,
        heartbeat_deadline_seconds: int = 60,
    ) -> dict[str, Any]:
        """Upsert a runtime (always `online`: a registration is a sign of life in fleetlog)."""
        view = await self._fleet.runtimes.register(
            runtime_id, display_name, endpoint, version, capabilities, labels, metadata,
            max(int(heartbeat_deadline_seconds), 1),
        )
        return _pick(view, _RUNTIME_KEYS)

    async def heartbeat_runtime(
        self, *, runtime_id: str, status: str = "online", heartbeat_deadline_seconds: int = 60,
        capabilities: dict[str, Any] | None = None, labels: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """Refresh the heartbeat and merge metadata; None for an unknown runtime."""
        view = await self._fleet.runtimes.heartbeat(runtime_id, status, metadata)
        if view is None:
            return None
        self._token = await self._fleet.flush()  # acked, so the next read sees it
        return _pick(view, _RUNTIME_KEYS)

    async def get_runtime(self, runtime_id: str) -> dict[str, Any] | None:
        return _runtime(await self._fleet.runtimes.get(runtime_id, min_seq=self._min_seq()))

    def _min_seq(self) -> dict[str, int] | None:
        return dict(self._token) if self._token else None

    async def list_runtimes(self, *, statuses: list[str] | None = None, labels: dict[str, str] | None = None,
                            limit: int = 100) -> tuple[list[dict[str, Any]], int]:
        """(runtimes by id, total)."""
        answer = await self._fleet.runtimes.list(statuses, labels, int(limit), min_seq=self._min_seq())
        return [_pick(v, _RUNTIME_KEYS) for v in answer.items], answer.total

    async def mark_stale_runtimes(self, *, now: datetime | None = None, stale_status: str = "stale",
                                  stale_after_seconds: int | float | None = None) -> list[dict[str, Any]]:
        views = await self._fleet.runtimes.mark_stale_runtimes(now, stale_status, stale_after_seconds)
        return [_pick(v, _RUNTIME_KEYS) for v in views]

    # -- stats ---------------------------------------------------------------------------
    async def get_run_stats(self, *, start_time: int, end_time: int, runner_id: str | None = None) -> dict[str, Any]:
        stats = await self._fleet.runs.get_run_stats(start_time, end_time, runner_id)
        out: dict[str, Any] = msgspec.to_builtins(stats)
        return {k: v for k, v in out.items() if k not in ("as_of", "lag", "lag_s")}

    async def get_runtime_stats(self) -> dict[str, Any]:
        out: dict[str, Any] = msgspec.to_builtins(await self._fleet.runs.get_runtime_stats())
        out.pop("by_runtime", None)
        return out

    async def get_runner_stats(self, *, start_time: int, end_time: int, limit: int = 50) -> list[dict[str, Any]]:
        items = await self._fleet.runs.get_runner_stats(start_time, end_time, min(max(int(limit), 1), 100))
        return [msgspec.to_builtins(item) for item in items]
