"""Drop-in for LangBot's `PersistentStateStore`, backed by fleetlog's scoped state.

`PersistentStateStore(fleet)` takes a connected async `Fleet` instead of a database engine;
the methods keep their names, arguments, async nature and return shapes. Policy and value
errors come back as `(False, <the original's words>)`, as they did. Every read waits for this
store's own last write (its token), so a read after a write sees it.
"""

from __future__ import annotations

from typing import Any

from fleetlog.compat.state_scope import VALID_STATE_SCOPES, binding_of, context_of
from fleetlog.schemas.state import StateBinding, StateContext, StatePolicy, normalize_state_key
from fleetlog.services.backbone.errors import FleetValidationError
from fleetlog.services.client.fleet import Fleet

__all__ = ["MAX_VALUE_JSON_BYTES", "PersistentStateStore"]

MAX_VALUE_JSON_BYTES = 256 * 1024
_STREAM = "FLEET_STATE"


class PersistentStateStore:
    """Host-owned runner state: scoped, policy-checked, JSON values of at most 256 KiB."""

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet
        self._seen = 0  # FLEET_STATE seq of this store's last write: its reads wait for it

    def _wrote(self, seq: int | None) -> None:
        if seq and seq > self._seen:
            self._seen = seq

    def _min_seq(self) -> dict[str, int] | None:
        return {_STREAM: self._seen} if self._seen else None

    async def build_snapshot_from_event(self, event: Any, binding: Any, descriptor: Any) -> dict[str, dict[str, Any]]:
        """All four scopes' keys and values, enabled scopes only; external.conversation_id seeded."""
        snap = await self._fleet.state.snapshot(context_of(event, descriptor), binding_of(binding),
                                                min_seq=self._min_seq())
        return {"conversation": dict(snap.conversation), "actor": dict(snap.actor), "subject": dict(snap.subject),
                "runner": dict(snap.runner)}

    async def apply_update_from_event(self, event: Any, binding: Any, descriptor: Any, scope: str, key: str,
                                      value: Any, logger: Any = None) -> tuple[bool, str | None]:
        """Upsert one key of one scope from the event's context; (ok, error)."""
        return await self._set(scope, key, value, context_of(event, descriptor), binding_of(binding))

    async def _set(self, scope: str, key: str, value: Any, context: StateContext,
                   binding: StateBinding) -> tuple[bool, str | None]:
        try:
            write = await self._fleet.state.set(scope, key, value, context=context, binding=binding)
        except FleetValidationError as exc:  # StatePolicyError among them: the original's words
            return False, exc.rule
        self._wrote(write.seq)
        return True, None

    async def state_get(self, scope_key: str, state_key: str) -> Any:
        """The value, or None when missing."""
        entry = await self._fleet.state.entry_at(scope_key, normalize_state_key(state_key), min_seq=self._min_seq())
        return entry.value if entry.found else None

    async def state_set(self, scope_key: str, state_key: str, value: Any, runner_id: str, binding_identity: str,
                        scope: str, context: dict[str, Any] | None = None,
                        logger: Any = None) -> tuple[bool, str | None]:
        """Set one value (State API handlers); (ok, error).

        fleetlog derives the scope key from the context, so the given `scope_key` must be the one
        `build_state_context` made from that context (else `(False, <why>)`).
        """
        ctx = context or {}
        try:
            state_ctx = StateContext(
                runner_id=runner_id, **{k: ctx.get(k) for k in (
                    "bot_id", "workspace_id", "conversation_id", "thread_id", "actor_type", "actor_id",
                    "subject_type", "subject_id")})
        except Exception as exc:
            return False, f"context: {exc}"
        # The binding as far as the store knows it: its identity, and a policy allowing this scope.
        binding = StateBinding(binding_id=binding_identity, state_policy=StatePolicy(
            enable_state=True, state_scopes=tuple(VALID_STATE_SCOPES)))
        try:
            derived = self._fleet.state.scope_key(scope, context=state_ctx, binding=binding)
        except FleetValidationError as exc:
            return False, exc.rule
        if derived != scope_key:
            return False, (f"scope_key {scope_key!r} does not match the context and binding identity given "
                           f"(they give {derived!r})")
        return await self._set(scope, state_key, value, state_ctx, binding)

    async def state_delete(self, scope_key: str, state_key: str) -> bool:
        """True if a value was deleted, False if none was there."""
        deletion = await self._fleet.state.delete_key(scope_key, normalize_state_key(state_key))
        self._wrote(deletion.seq)
        return deletion.deleted

    async def state_list(self, scope_key: str, prefix: str | None = None, limit: int = 100) -> tuple[list[str], bool]:
        """Keys of one scope in key order, at most min(limit, 100); (keys, has_more)."""
        page = await self._fleet.state.list(scope_key, normalize_state_key(prefix) if prefix else None,
                                            min(limit, 100), min_seq=self._min_seq())
        return list(page.keys), page.has_more

    async def clear_all(self) -> None:
        """Delete every state entry (for tests), one tombstone per key."""
        while True:  # a page at a time: an answer is cut to the connection's max payload
            answer = await self._fleet.sql("SELECT scope_key, key FROM state LIMIT 1000", min_seq=self._min_seq())
            if not answer.rows:
                return
            for scope_key, key in answer.rows:
                await self.state_delete(scope_key, key)
