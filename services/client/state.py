"""Scoped agent state's client API: `fleet.state.set/get/entry/delete/list/snapshot/scope_key`.

Writes are guarded, awaited publishes (not fire-and-forget like attempts): a write
reads the key's subject's last message (direct get), builds the event (a set keeps
the first write's `created_at`; a delete of nothing publishes nothing) and
publishes it with `Nats-Expected-Last-Subject-Sequence`. A writer that lost a race
re-reads and retries, so the stream order is the write order and every write
returns its position: the consistency token that get/list/snapshot wait for.

Policy is checked here first, in the replaced store's order and words
(`StatePolicyError`, nothing published), and again by the projection.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any

import msgspec
from fleetlog.schemas import decode_event, encode_event, new_event_id, now_iso
from fleetlog.schemas.state import (
    MAX_KEY_CHARS,
    STATE_SCOPES,
    StateBinding,
    StateContext,
    StateDeleted,
    StateEntry,
    StateEvent,
    StateGetQuery,
    StateList,
    StateListQuery,
    StateRuleViolation,
    StateSet,
    StateSnapshot,
    StateSnapshotQuery,
    binding_identity_of,
    check_scope,
    normalize_state_key,
    rule_violation,
    scope_key_for,
    value_json,
)
from fleetlog.services.backbone.errors import FleetError, FleetValidationError
from fleetlog.services.backbone.guarded import Guarded, WrongLastSequence
from fleetlog.services.writepath.publisher import Receipt, Token

if TYPE_CHECKING:
    from fleetlog.services.client.seam import FleetClient

__all__ = ["StateAPI", "StateDeletion", "StatePolicyError", "StateSyncAPI", "StateWrite"]

STREAM = "FLEET_STATE"
MAX_RACES = 200  # lost races before giving up (20 writers on one key lose at most 19 in a row)
_WIRE: dict[type[StateEvent], msgspec.json.Decoder[Any]] = {
    StateSet: msgspec.json.Decoder(StateSet), StateDeleted: msgspec.json.Decoder(StateDeleted)}


class StatePolicyError(FleetValidationError):
    """A state rule refused the call; `rule` holds the replaced store's exact words."""


class StateWrite(msgspec.Struct, kw_only=True):
    """What `set` returns: where the write landed (`token` is the consistency token)."""

    scope_key: str
    key: str
    seq: int
    token: dict[str, int]
    created_at: str
    updated_at: str


class StateDeletion(msgspec.Struct, kw_only=True):
    """What `delete` returns; truthy iff something was there. `token` orders reads after it."""

    scope_key: str
    key: str
    deleted: bool
    seq: int | None
    token: dict[str, int]

    def __bool__(self) -> bool:
        return self.deleted


MinSeq = Token | Receipt | StateWrite | StateDeletion | None
ContextLike = StateContext | Mapping[str, Any]
BindingLike = StateBinding | Mapping[str, Any] | None


def _token(min_seq: MinSeq) -> dict[str, int] | None:
    if isinstance(min_seq, Receipt):
        return min_seq.token
    if isinstance(min_seq, StateWrite | StateDeletion):
        return dict(min_seq.token) or None
    return dict(min_seq) if min_seq else None


def _convert(field: str, value: Any, cls: type[Any]) -> Any:
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise FleetValidationError(field, f"must be a {cls.__name__} or a dict, got {type(value).__name__}")
    try:
        return msgspec.convert(dict(value), cls)
    except msgspec.ValidationError as exc:
        message = str(exc)
        if " - at `$." in message:
            rule, _, where = message.rpartition(" - at `$.")
            raise FleetValidationError(f"{field}.{where.rstrip('`')}", rule) from None
        raise FleetValidationError(field, message) from None


def as_context(context: ContextLike) -> StateContext:
    result: StateContext = _convert("context", context, StateContext)
    return result


def as_binding(binding: BindingLike) -> StateBinding:
    result: StateBinding = StateBinding() if binding is None else _convert("binding", binding, StateBinding)
    return result


def _policy_error(exc: StateRuleViolation) -> StatePolicyError:
    return StatePolicyError(exc.field, exc.rule)


def _state_key(key: Any) -> str:
    if not isinstance(key, str):
        raise FleetValidationError("key", f"must be a string, got {type(key).__name__}")
    text = normalize_state_key(key)
    if not text or len(text) > MAX_KEY_CHARS:
        raise FleetValidationError("key", f"must be 1 to {MAX_KEY_CHARS} characters, got {len(text)}")
    return text


class _Target:
    """One (scope, key) resolved and checked: what a write or a read addresses."""

    def __init__(self, scope: str, key: Any, context: ContextLike, binding: BindingLike) -> None:
        ctx, bnd = as_context(context), as_binding(binding)
        self.context = ctx
        self.policy = bnd.state_policy
        self.binding_identity = binding_identity_of(bnd)
        try:
            self.scope_key = check_scope(scope, self.policy, ctx, self.binding_identity)
        except StateRuleViolation as exc:
            raise _policy_error(exc) from None
        self.key = _state_key(key)


class StateAPI:
    def __init__(self, fleet: FleetClient) -> None:
        self._fleet = fleet

    # -- helpers -------------------------------------------------------------
    def scope_key(self, scope: str, *, context: ContextLike, binding: BindingLike = None) -> str:
        """The scope key of `scope` for this context and binding; policy errors as for a write."""
        ctx, bnd = as_context(context), as_binding(binding)
        try:
            return check_scope(scope, bnd.state_policy, ctx, binding_identity_of(bnd))
        except StateRuleViolation as exc:
            raise _policy_error(exc) from None

    async def _last(self, subject: str) -> tuple[int, StateEvent | None]:
        """The subject's last message: (seq or 0, the event if it is a valid state event)."""
        msg = await Guarded(await self._fleet.nats()).last(STREAM, subject)
        if msg is None:
            return 0, None
        try:
            event = decode_event(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return msg.seq, None  # garbage: the view holds nothing for this key
        if not isinstance(event, StateEvent) or rule_violation(event) is not None:
            return msg.seq, None
        return msg.seq, event

    async def _publish(self, event: StateEvent, expected: int) -> int | None:
        """Guarded publish; the seq, or None when another writer got there first."""
        g = Guarded(await self._fleet.nats())
        try:
            _, seq, _ = await g.publish(event.subject(), self._fleet_payload(event), msg_id=event.id,
                                        expected_last_seq=expected)
        except WrongLastSequence:
            return None
        return seq

    def _fleet_payload(self, event: StateEvent) -> bytes:
        """Encode, then decode with the event's own type: the wire rules, checked before publishing."""
        payload = encode_event(event)
        limit = self._fleet.settings.max_event_bytes
        if len(payload) > limit:
            raise FleetValidationError("event", f"encoded size {len(payload)} bytes exceeds max_event_bytes {limit}")
        try:
            _WIRE[type(event)].decode(payload)
        except msgspec.ValidationError as exc:
            rule, _, where = str(exc).rpartition(" - at `$.")
            raise FleetValidationError(where.rstrip("`") or "event", rule or str(exc)) from None
        return payload

    async def _backoff(self, attempt: int) -> None:
        await asyncio.sleep(random.uniform(0, min(0.05, 0.002 * attempt)))

    # -- writes --------------------------------------------------------------
    async def set(self, scope: str, key: str, value: Any, *, context: ContextLike,
                  binding: BindingLike = None) -> StateWrite:
        """Upsert one key (created_at kept, updated_at refreshed); returns its position."""
        target = _Target(scope, key, context, binding)
        try:
            text = value_json(value)
        except StateRuleViolation as exc:
            raise _policy_error(exc) from None
        plain = msgspec.json.decode(text.encode("utf-8"))  # exactly the JSON the size rule measured
        subject = ""
        for attempt in range(MAX_RACES):
            event = StateSet(id=new_event_id(), ts=now_iso(), scope_key=target.scope_key, key=target.key,
                             binding_identity=target.binding_identity, context=target.context,
                             policy=target.policy, value=plain)
            subject = event.subject()
            expected, last = await self._last(subject)
            if isinstance(last, StateSet):
                event = msgspec.structs.replace(event, created_at=last.created_at or last.ts)
            seq = await self._publish(event, expected)
            if seq is not None:
                return StateWrite(scope_key=target.scope_key, key=target.key, seq=seq, token={STREAM: seq},
                                  created_at=event.created_at or event.ts, updated_at=event.ts)
            await self._backoff(attempt)
        raise FleetError(f"state set on {subject}: lost {MAX_RACES} races in a row to other writers")

    async def delete(self, scope: str, key: str, *, context: ContextLike, binding: BindingLike = None) -> StateDeletion:
        """Delete one key (a tombstone). Truthy iff a value was there; nothing is published otherwise."""
        target = _Target(scope, key, context, binding)
        subject = ""
        for attempt in range(MAX_RACES):
            event = StateDeleted(id=new_event_id(), ts=now_iso(), scope_key=target.scope_key, key=target.key,
                                 binding_identity=target.binding_identity, context=target.context,
                                 policy=target.policy)
            subject = event.subject()
            expected, last = await self._last(subject)
            if not isinstance(last, StateSet):
                token = {STREAM: expected} if expected else {}
                return StateDeletion(scope_key=target.scope_key, key=target.key, deleted=False,
                                     seq=expected or None, token=token)
            seq = await self._publish(event, expected)
            if seq is not None:
                return StateDeletion(scope_key=target.scope_key, key=target.key, deleted=True, seq=seq,
                                     token={STREAM: seq})
            await self._backoff(attempt)
        raise FleetError(f"state delete on {subject}: lost {MAX_RACES} races in a row to other writers")

    async def delete_key(self, scope_key: str, key: str) -> StateDeletion:
        """Delete one key addressed by its scope key alone (stores that kept only the scope key).

        The tombstone carries the context, binding identity and policy of the value it deletes
        (read from the subject's last message), so the projection re-derives the same scope key.
        """
        key = _state_key(key)
        subject = ""
        for attempt in range(MAX_RACES):
            subject = StateDeleted(id="", ts="", scope_key=scope_key, key=key).subject()
            expected, last = await self._last(subject)
            if not isinstance(last, StateSet):
                token = {STREAM: expected} if expected else {}
                return StateDeletion(scope_key=scope_key, key=key, deleted=False, seq=expected or None, token=token)
            event = StateDeleted(id=new_event_id(), ts=now_iso(), scope_key=last.scope_key, key=last.key,
                                 binding_identity=last.binding_identity, context=last.context, policy=last.policy)
            seq = await self._publish(event, expected)
            if seq is not None:
                return StateDeletion(scope_key=scope_key, key=key, deleted=True, seq=seq, token={STREAM: seq})
            await self._backoff(attempt)
        raise FleetError(f"state delete on {subject}: lost {MAX_RACES} races in a row to other writers")

    # -- reads -------------------------------------------------------------------
    async def entry(self, scope: str, key: str, *, context: ContextLike, binding: BindingLike = None,
                    min_seq: MinSeq = None) -> StateEntry:
        """One key with its metadata and the view's `as_of`; `found` is False when missing."""
        target = _Target(scope, key, context, binding)
        req = StateGetQuery(scope_key=target.scope_key, key=target.key, min_seq=_token(min_seq))
        return await self._fleet.request("fleetlog.state.get", req, StateEntry)

    async def entry_at(self, scope_key: str, key: str, *, min_seq: MinSeq = None) -> StateEntry:
        """One key addressed by its scope key (as `list` is), without the context that made it."""
        req = StateGetQuery(scope_key=scope_key, key=_state_key(key), min_seq=_token(min_seq))
        return await self._fleet.request("fleetlog.state.get", req, StateEntry)

    async def get(self, scope: str, key: str, *, context: ContextLike, binding: BindingLike = None,
                  min_seq: MinSeq = None) -> Any:
        """The value, or None when the key is missing."""
        entry = await self.entry(scope, key, context=context, binding=binding, min_seq=min_seq)
        return entry.value if entry.found else None

    async def list(self, scope_key: str, prefix: str | None = None, limit: int = 100, *, after: str | None = None,
                   min_seq: MinSeq = None) -> StateList:
        """Keys of one scope ordered by key, at most `limit` (capped at 100), with `has_more`.

        `prefix` is a plain prefix (`%` and `_` are literal); `after` pages on from a key.
        """
        if not isinstance(scope_key, str) or scope_key.split(":", 1)[0] not in STATE_SCOPES:
            raise FleetValidationError("scope_key", f'must be "<scope>:v2:<sha256 hex>", got {scope_key!r}')
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise FleetValidationError("limit", f"must be an integer >= 1 (at most 100 are returned), got {limit!r}")
        for field, text in (("prefix", prefix), ("after", after)):
            if text is not None and not isinstance(text, str):
                raise FleetValidationError(field, f"must be a string, got {type(text).__name__}")
        req = StateListQuery(scope_key=scope_key, prefix=prefix, after=after, limit=min(limit, 100),
                             min_seq=_token(min_seq))
        return await self._fleet.request("fleetlog.state.list", req, StateList)

    async def snapshot(self, context: ContextLike, binding: BindingLike = None, *,
                       min_seq: MinSeq = None) -> StateSnapshot:
        """All four scopes as dicts; empty for scopes that are disabled or have no key.

        The conversation scope gains `external.conversation_id` from the context when it is
        enabled and not stored (a stored value wins). A disabled policy gives four empty dicts.
        """
        ctx, bnd = as_context(context), as_binding(binding)
        policy, identity = bnd.state_policy, binding_identity_of(bnd)
        keys: dict[str, str] = {}
        if policy.enable_state:
            for scope in STATE_SCOPES:
                key = scope_key_for(scope, ctx, identity) if scope in policy.state_scopes else None
                if key is not None:
                    keys[scope] = key
        req = StateSnapshotQuery(scope_keys=keys, conversation_id=ctx.conversation_id if keys else None,
                                 min_seq=_token(min_seq))
        return await self._fleet.request("fleetlog.state.snapshot", req, StateSnapshot)


class StateSyncAPI:
    """The same API for `FleetSync`: every call blocks the calling thread."""

    def __init__(self, api: StateAPI, run: Callable[[Coroutine[Any, Any, Any]], Any]) -> None:
        self._api = api
        self._run = run
        self.scope_key = api.scope_key

    def set(self, *args: Any, **kwargs: Any) -> StateWrite:
        result: StateWrite = self._run(self._api.set(*args, **kwargs))
        return result

    def get(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(self._api.get(*args, **kwargs))

    def entry(self, *args: Any, **kwargs: Any) -> StateEntry:
        result: StateEntry = self._run(self._api.entry(*args, **kwargs))
        return result

    def delete(self, *args: Any, **kwargs: Any) -> StateDeletion:
        result: StateDeletion = self._run(self._api.delete(*args, **kwargs))
        return result

    def list(self, *args: Any, **kwargs: Any) -> StateList:
        result: StateList = self._run(self._api.list(*args, **kwargs))
        return result

    def snapshot(self, *args: Any, **kwargs: Any) -> StateSnapshot:
        result: StateSnapshot = self._run(self._api.snapshot(*args, **kwargs))
        return result
