"""Drop-in for LangBot's runner state scope helpers (`...agent_runner.state_scope`).

The scope keys are fleetlog's (schemas/state.py), which are LangBot's v2 keys exactly: sha256
of the canonical JSON of {version: 2, scope, runner_id, binding_identity, bot_id,
workspace_id, + the scope's ids}. Event, binding and descriptor are duck-typed: the host's own
model objects (`event.actor.actor_id`, `binding.scope.scope_type`, `descriptor.id`, ...) work.
"""

from __future__ import annotations

from typing import Any

from fleetlog.schemas.state import (
    STATE_KEY_ALIASES,
    STATE_SCOPES,
    StateBinding,
    StateContext,
    StatePolicy,
    binding_identity_of,
    normalize_state_key,
    scope_key_for,
)

__all__ = [
    "STATE_KEY_ALIASES",
    "VALID_STATE_SCOPES",
    "binding_of",
    "build_state_context",
    "build_state_scope_key",
    "build_state_scope_keys",
    "context_of",
    "get_binding_identity",
    "normalize_state_key",
]

VALID_STATE_SCOPES = STATE_SCOPES


def _ids(obj: Any, type_attr: str, id_attr: str) -> tuple[str | None, str | None]:
    if not obj:
        return None, None
    return getattr(obj, type_attr, None), getattr(obj, id_attr, None)


def context_of(event: Any, descriptor: Any) -> StateContext:
    """fleetlog's StateContext for a host event and runner descriptor (attribute access)."""
    actor_type, actor_id = _ids(getattr(event, "actor", None), "actor_type", "actor_id")
    subject_type, subject_id = _ids(getattr(event, "subject", None), "subject_type", "subject_id")
    return StateContext(
        runner_id=descriptor.id, bot_id=getattr(event, "bot_id", None),
        workspace_id=getattr(event, "workspace_id", None), conversation_id=getattr(event, "conversation_id", None),
        thread_id=getattr(event, "thread_id", None), actor_type=actor_type, actor_id=actor_id,
        subject_type=subject_type, subject_id=subject_id,
    )


def binding_of(binding: Any) -> StateBinding:
    """fleetlog's StateBinding for a host binding (binding_id, scope.scope_type/scope_id, state_policy)."""
    scope = getattr(binding, "scope", None)
    policy = getattr(binding, "state_policy", None)
    state_policy = StatePolicy() if policy is None else StatePolicy(
        enable_state=bool(policy.enable_state), state_scopes=tuple(policy.state_scopes))
    return StateBinding(binding_id=getattr(binding, "binding_id", None) or None,
                        scope_type=getattr(scope, "scope_type", None) if scope else None,
                        scope_id=getattr(scope, "scope_id", None) if scope else None,
                        state_policy=state_policy)


def get_binding_identity(binding: Any) -> str:
    """binding_id, else "<scope_type>:<scope_id>", else "unknown_binding"."""
    return binding_identity_of(binding_of(binding))


def build_state_scope_key(scope: str, event: Any, binding: Any, descriptor: Any) -> str | None:
    """The storage key of one scope; None when the event lacks that scope's identity."""
    return scope_key_for(scope, context_of(event, descriptor), get_binding_identity(binding))


def build_state_scope_keys(event: Any, binding: Any, descriptor: Any) -> dict[str, str]:
    """Every scope key the event/binding pair has."""
    keys: dict[str, str] = {}
    for scope in VALID_STATE_SCOPES:
        key = build_state_scope_key(scope, event, binding, descriptor)
        if key:
            keys[scope] = key
    return keys


def build_state_context(event: Any, binding: Any, descriptor: Any) -> dict[str, Any]:
    """The State API context a run session stores (the original's keys)."""
    ctx = context_of(event, descriptor)
    return {
        "scope_keys": build_state_scope_keys(event, binding, descriptor),
        "binding_identity": get_binding_identity(binding),
        "bot_id": ctx.bot_id, "workspace_id": ctx.workspace_id, "conversation_id": ctx.conversation_id,
        "thread_id": ctx.thread_id, "actor_type": ctx.actor_type, "actor_id": ctx.actor_id,
        "subject_type": ctx.subject_type, "subject_id": ctx.subject_id,
    }
