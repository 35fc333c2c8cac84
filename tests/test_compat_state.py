"""fleetlog.compat.state and .state_scope exercised the way LangBot's own state-store tests do:
the host's model objects (duck-typed here with SimpleNamespace), a real broker and server."""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace
from typing import Any

from fleetlog import Fleet
from fleetlog.compat.state import PersistentStateStore
from fleetlog.compat.state_scope import (
    STATE_KEY_ALIASES,
    VALID_STATE_SCOPES,
    build_state_context,
    build_state_scope_key,
    build_state_scope_keys,
    get_binding_identity,
    normalize_state_key,
)


def _event(conversation_id: str | None = "conv-1", actor_id: str | None = "u-1", subject_id: str | None = None,
           thread_id: str | None = None) -> Any:
    return SimpleNamespace(
        bot_id="bot-1", workspace_id="ws-1", conversation_id=conversation_id, thread_id=thread_id,
        actor=SimpleNamespace(actor_type="user", actor_id=actor_id) if actor_id else None,
        subject=SimpleNamespace(subject_type="doc", subject_id=subject_id) if subject_id else None,
    )


def _binding(enable: bool = True, scopes: tuple[str, ...] = ("conversation", "actor"), binding_id: str | None = "b-1",
             scope_type: str | None = None, scope_id: str | None = None) -> Any:
    return SimpleNamespace(binding_id=binding_id, scope=SimpleNamespace(scope_type=scope_type, scope_id=scope_id),
                           state_policy=SimpleNamespace(enable_state=enable, state_scopes=list(scopes)))


DESCRIPTOR = SimpleNamespace(id="plugin:acme/runner/default")


def test_scope_helpers_match_the_originals_v2_keys() -> None:
    assert VALID_STATE_SCOPES == ("conversation", "actor", "subject", "runner")
    assert STATE_KEY_ALIASES == {"conversation_id": "external.conversation_id"}
    assert normalize_state_key("conversation_id") == "external.conversation_id"
    assert get_binding_identity(_binding(binding_id=None, scope_type="group", scope_id="g1")) == "group:g1"
    assert get_binding_identity(_binding(binding_id=None)) == "unknown_binding"
    raw = json.dumps({"version": 2, "scope": "runner", "runner_id": DESCRIPTOR.id, "binding_identity": "b-1",
                      "bot_id": "bot-1", "workspace_id": "ws-1"}, sort_keys=True, separators=(",", ":"))
    assert build_state_scope_key("runner", _event(), _binding(), DESCRIPTOR) == \
        "runner:v2:" + hashlib.sha256(raw.encode()).hexdigest()
    assert build_state_scope_key("subject", _event(), _binding(), DESCRIPTOR) is None
    assert set(build_state_scope_keys(_event(), _binding(), DESCRIPTOR)) == {"conversation", "actor", "runner"}
    ctx = build_state_context(_event(subject_id="s1"), _binding(), DESCRIPTOR)
    assert set(ctx) == {"scope_keys", "binding_identity", "bot_id", "workspace_id", "conversation_id", "thread_id",
                        "actor_type", "actor_id", "subject_type", "subject_id"}
    assert ctx["subject_id"] == "s1" and len(ctx["scope_keys"]) == 4


async def test_apply_update_then_snapshot(fleet: Fleet) -> None:
    store = PersistentStateStore(fleet)
    ok = await store.apply_update_from_event(_event(), _binding(), DESCRIPTOR, "conversation", "topic", {"a": 1})
    assert ok == (True, None)
    assert await store.apply_update_from_event(_event(), _binding(), DESCRIPTOR, "actor", "lang", "fr",
                                               None) == (True, None)  # the trailing logger, positional
    snap = await store.build_snapshot_from_event(_event(), _binding(), DESCRIPTOR)
    assert snap == {"conversation": {"topic": {"a": 1}, "external.conversation_id": "conv-1"},
                    "actor": {"lang": "fr"}, "subject": {}, "runner": {}}
    disabled = await store.build_snapshot_from_event(_event(), _binding(enable=False), DESCRIPTOR)
    assert disabled == {"conversation": {}, "actor": {}, "subject": {}, "runner": {}}


async def test_policy_and_value_errors_in_the_originals_words(fleet: Fleet) -> None:
    store = PersistentStateStore(fleet)
    apply = store.apply_update_from_event
    assert await apply(_event(), _binding(enable=False), DESCRIPTOR, "actor", "k", 1) == \
        (False, "State is disabled by binding policy")
    assert await apply(_event(), _binding(), DESCRIPTOR, "galaxy", "k", 1) == (False, "Invalid scope: galaxy")
    assert await apply(_event(), _binding(), DESCRIPTOR, "runner", "k", 1) == \
        (False, 'Scope "runner" not enabled by binding policy')
    assert await apply(_event(actor_id=None), _binding(), DESCRIPTOR, "actor", "k", 1) == \
        (False, 'Missing identity for scope "actor"')
    ok, error = await apply(_event(), _binding(), DESCRIPTOR, "actor", "k", {1, 2})
    assert not ok and error is not None and error.startswith("Value is not JSON-serializable")
    assert await apply(_event(), _binding(), DESCRIPTOR, "actor", "k", "x" * (256 * 1024)) == \
        (False, "Value size 262146 bytes exceeds limit 262144 bytes")


async def test_state_api_handlers_get_set_delete_list(fleet: Fleet) -> None:
    store = PersistentStateStore(fleet)
    ctx = build_state_context(_event(), _binding(), DESCRIPTOR)
    key = ctx["scope_keys"]["conversation"]
    for name in ("b", "a", "c", "conversation_id"):
        ok = await store.state_set(key, name, {"v": name}, DESCRIPTOR.id, ctx["binding_identity"], "conversation",
                                   ctx)
        assert ok == (True, None)
    assert await store.state_get(key, "a") == {"v": "a"}
    assert await store.state_get(key, "conversation_id") == {"v": "conversation_id"}  # the alias
    assert await store.state_get(key, "missing") is None
    assert await store.state_list(key) == (["a", "b", "c", "external.conversation_id"], False)
    assert await store.state_list(key, limit=2) == (["a", "b"], True)
    assert await store.state_list(key, prefix="ext") == (["external.conversation_id"], False)
    assert await store.state_delete(key, "a") is True
    assert await store.state_delete(key, "a") is False
    assert await store.state_get(key, "a") is None
    other = build_state_context(_event(conversation_id="conv-2"), _binding(), DESCRIPTOR)
    mismatch = await store.state_set(key, "x", 1, DESCRIPTOR.id, ctx["binding_identity"], "conversation", other)
    assert mismatch[0] is False and "does not match" in str(mismatch[1])
    await store.clear_all()
    assert await store.state_list(key) == ([], False)
    snap = await store.build_snapshot_from_event(_event(), _binding(), DESCRIPTOR)
    assert snap["conversation"] == {"external.conversation_id": "conv-1"}
