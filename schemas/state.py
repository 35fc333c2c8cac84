"""Scoped agent state: set and delete (tombstone) on one compacted subject per key.

The contract other languages need to write state themselves lives here too: the
scope-key derivation (`scope_key_for`), the binding identity, the key alias, the
value rules and the policy rules, in the order the replaced state store checked
them. The client checks them before publishing; the projection checks them again
on every event it folds, so a raw publish breaking a rule lands in rejects.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, ClassVar, Final

import msgspec

from . import subjects
from ._base import Event, IsoTs
from .answers import Answer

__all__ = [
    "DEFAULT_STATE_SCOPES",
    "MAX_KEY_CHARS",
    "MAX_VALUE_JSON_BYTES",
    "STATE_KEY_ALIASES",
    "STATE_SCOPES",
    "ElidedValue",
    "StateBinding",
    "StateContext",
    "StateDeleted",
    "StateEntry",
    "StateEvent",
    "StateGetQuery",
    "StateList",
    "StateListQuery",
    "StatePolicy",
    "StateRuleViolation",
    "StateSet",
    "StateSnapshot",
    "StateSnapshotQuery",
    "binding_identity_of",
    "check_scope",
    "elided_marker",
    "key_hash",
    "normalize_state_key",
    "rule_violation",
    "scope_key_for",
    "value_json",
]

STATE_SCOPES: Final = ("conversation", "actor", "subject", "runner")
DEFAULT_STATE_SCOPES: Final = ("conversation", "actor")
STATE_KEY_ALIASES: Final = {"conversation_id": "external.conversation_id"}
MAX_KEY_CHARS: Final = 255
MAX_VALUE_JSON_BYTES: Final = 256 * 1024  # 262,144: exactly this many bytes is accepted

# "<scope>:v2:<sha256 hex>". The scope part is not restricted here, so that a raw
# publish with an unknown scope reaches the projection's rule ("Invalid scope: x").
ScopeKey = Annotated[str, msgspec.Meta(pattern=r"^[^:]{1,64}:v2:[0-9a-f]{64}$")]
StateKey = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_KEY_CHARS)]
OptText = str | None


class StateRuleViolation(ValueError):
    """A state rule was broken: `field` names where, `rule` is the replaced store's exact words."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(rule)
        self.field = field
        self.rule = rule


class StatePolicy(msgspec.Struct, kw_only=True, frozen=True):
    """A binding's state policy: is state on, and which scopes may be used."""

    enable_state: bool = True
    state_scopes: tuple[str, ...] = DEFAULT_STATE_SCOPES


class StateBinding(msgspec.Struct, kw_only=True, frozen=True):
    """The binding an event arrived through: who is isolated from whom, and its policy."""

    binding_id: OptText = None
    scope_type: OptText = None
    scope_id: OptText = None
    state_policy: StatePolicy = msgspec.field(default_factory=StatePolicy)


class StateContext(msgspec.Struct, kw_only=True, frozen=True):
    """The event context that identifies the scopes: runner, bot, conversation, actor, subject."""

    runner_id: Annotated[str, msgspec.Meta(min_length=1)]
    bot_id: OptText = None
    workspace_id: OptText = None
    conversation_id: OptText = None
    thread_id: OptText = None
    actor_type: OptText = None
    actor_id: OptText = None
    subject_type: OptText = None
    subject_id: OptText = None


def binding_identity_of(binding: StateBinding) -> str:
    """binding_id if set, else "<scope_type>:<scope_id>" when both are set, else "unknown_binding"."""
    if binding.binding_id:
        return binding.binding_id
    if binding.scope_type and binding.scope_id:
        return f"{binding.scope_type}:{binding.scope_id}"
    return "unknown_binding"


def _hashed(scope: str, parts: dict[str, Any]) -> str:
    raw = json.dumps({"version": 2, "scope": scope, **parts}, sort_keys=True, separators=(",", ":"),
                     ensure_ascii=False)
    return f"{scope}:v2:{hashlib.sha256(raw.encode('utf-8')).hexdigest()}"


def scope_key_for(scope: str, context: StateContext, binding_identity: str) -> str | None:
    """The scope key, or None when the context lacks the identity that scope needs."""
    base = {"runner_id": context.runner_id, "binding_identity": binding_identity,
            "bot_id": context.bot_id, "workspace_id": context.workspace_id}
    if scope == "conversation":
        if not context.conversation_id:
            return None
        return _hashed(scope, {**base, "conversation_id": context.conversation_id, "thread_id": context.thread_id})
    if scope == "actor":
        if not context.actor_id:
            return None
        return _hashed(scope, {**base, "actor_type": context.actor_type or "user", "actor_id": context.actor_id})
    if scope == "subject":
        if not context.subject_id:
            return None
        return _hashed(scope, {**base, "subject_type": context.subject_type or "unknown",
                               "subject_id": context.subject_id})
    if scope == "runner":
        return _hashed(scope, base)
    return None


_IDENTITY_FIELD: Final = {"conversation": "context.conversation_id", "actor": "context.actor_id",
                          "subject": "context.subject_id", "runner": "context.runner_id"}


def check_scope(scope: str, policy: StatePolicy, context: StateContext | None, binding_identity: str) -> str:
    """The policy rules in the replaced store's order; returns the scope key."""
    if not policy.enable_state:
        raise StateRuleViolation("binding.state_policy.enable_state", "State is disabled by binding policy")
    if scope not in STATE_SCOPES:
        raise StateRuleViolation("scope", f"Invalid scope: {scope}")
    if scope not in policy.state_scopes:
        raise StateRuleViolation("binding.state_policy.state_scopes", f'Scope "{scope}" not enabled by binding policy')
    key = None if context is None else scope_key_for(scope, context, binding_identity)
    if key is None:
        raise StateRuleViolation(_IDENTITY_FIELD[scope], f'Missing identity for scope "{scope}"')
    return key


def normalize_state_key(key: str) -> str:
    """The accepted alias: `conversation_id` is stored as `external.conversation_id`."""
    return STATE_KEY_ALIASES.get(key, key)


def value_json(value: Any) -> str:
    """The value as the replaced store stored it (json.dumps, non-ASCII kept), size-checked.

    Departure: NaN and ±Infinity are refused (they are not JSON and cannot cross the wire).
    """
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise StateRuleViolation("value", f"Value is not JSON-serializable: {exc}") from None
    size = len(text.encode("utf-8"))
    if size > MAX_VALUE_JSON_BYTES:
        raise StateRuleViolation("value", f"Value size {size} bytes exceeds limit {MAX_VALUE_JSON_BYTES} bytes")
    return text


def key_hash(key: str) -> str:
    """The last subject token: 160 bits of sha256 of the (aliased) key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:40]


# -- events -----------------------------------------------------------------------------------


class StateEvent(Event, kw_only=True, frozen=True):
    """One write to one key of one scope. The subject is unique per (scope_key, key), and
    FLEET_STATE keeps one message per subject: the stream is the compacted table."""

    STREAM: ClassVar[str] = "FLEET_STATE"

    scope_key: ScopeKey
    key: StateKey
    binding_identity: str = "unknown_binding"
    # What the scope key was derived from, and the policy the writer was under:
    # the projection re-derives the key and re-checks the policy from these.
    context: StateContext | None = None
    policy: StatePolicy = msgspec.field(default_factory=StatePolicy)

    @property
    def scope(self) -> str:
        return self.scope_key.split(":", 1)[0]

    def subject(self) -> str:
        return subjects.state(self.scope, self.scope_key.rsplit(":", 1)[1], key_hash(self.key))


class StateSet(StateEvent, tag="state.set", kw_only=True, frozen=True):
    """Upsert. State-carrying: `created_at` is the first write's time (the client reads it
    from the subject's last message), so the last message alone rebuilds the row."""

    value: Any
    created_at: IsoTs | None = None  # None: this write created the key (created_at = ts)


class StateDeleted(StateEvent, tag="state.deleted", kw_only=True, frozen=True):
    """Tombstone: stays the subject's last message, so a rebuild never resurrects the value."""


def rule_violation(event: StateEvent) -> str | None:
    """The first rule `event` breaks (the words a reject records), or None."""
    try:
        expected = check_scope(event.scope, event.policy, event.context, event.binding_identity)
        if expected != event.scope_key:
            return (f"scope_key {event.scope_key!r} does not match the context and binding identity the event "
                    f"carries (they give {expected!r})")
        if event.key in STATE_KEY_ALIASES:
            return f'Key "{event.key}" must be written as "{STATE_KEY_ALIASES[event.key]}"'
        if isinstance(event, StateSet):
            value_json(event.value)
    except StateRuleViolation as exc:
        return exc.rule
    return None


# -- the state view's query contract ------------------------------------------------------------

MinSeq = dict[str, int] | None
ListLimit = Annotated[int, msgspec.Meta(ge=1, le=100)]


class StateGetQuery(msgspec.Struct, kw_only=True):
    scope_key: ScopeKey
    key: StateKey
    min_seq: MinSeq = None


class StateEntry(Answer, kw_only=True):
    scope_key: str
    key: str
    found: bool
    value: Any = None
    created_at: str | None = None
    updated_at: str | None = None
    seq: int | None = None  # FLEET_STATE sequence of the write the view holds


class StateListQuery(msgspec.Struct, kw_only=True):
    scope_key: ScopeKey
    prefix: str | None = None  # a plain prefix: % and _ are literal
    after: str | None = None  # keys strictly after this one (paging)
    limit: ListLimit = 100
    min_seq: MinSeq = None


class StateList(Answer, kw_only=True):
    scope_key: str
    keys: list[str]
    has_more: bool


class StateSnapshotQuery(msgspec.Struct, kw_only=True):
    scope_keys: dict[str, ScopeKey] = msgspec.field(default_factory=dict)  # scope -> key, enabled scopes only
    conversation_id: str | None = None  # seeds external.conversation_id when not stored
    min_seq: MinSeq = None


class ElidedValue(msgspec.Struct, kw_only=True):
    """A value left out of a snapshot so that the reply fits the connection's max_payload;
    `fleet.state.get(scope, key, context=...)` reads it."""

    scope: str  # conversation | actor | subject | runner
    key: str
    bytes: int  # its JSON size


# What an elided value is replaced with in its scope's dict (`StateSnapshot.elided` says which).
def elided_marker(size: int) -> dict[str, Any]:
    return {"fleetlog_elided": True, "bytes": size, "read_with": "state get"}


class StateSnapshot(Answer, kw_only=True):
    conversation: dict[str, Any] = msgspec.field(default_factory=dict)
    actor: dict[str, Any] = msgspec.field(default_factory=dict)
    subject: dict[str, Any] = msgspec.field(default_factory=dict)
    runner: dict[str, Any] = msgspec.field(default_factory=dict)
    # Values too big to send together: in their scope's dict each is `elided_marker(size)`;
    # the largest go first, so as many values as fit arrive whole.
    elided: list[ElidedValue] = msgspec.field(default_factory=list)
