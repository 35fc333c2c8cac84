"""Scoped-state rules without a broker: the exact scope-key hashing, binding identity, policy
errors in their order and words, the key alias, the value limit, and the event subject."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from fleetlog.schemas import STREAMS, decode_event, encode_event, new_event_id, now_iso
from fleetlog.schemas.state import (
    MAX_VALUE_JSON_BYTES,
    StateBinding,
    StateContext,
    StateDeleted,
    StatePolicy,
    StateRuleViolation,
    StateSet,
    binding_identity_of,
    check_scope,
    normalize_state_key,
    rule_violation,
    scope_key_for,
    value_json,
)
from fleetlog.schemas.streams import stream_for_subject

CTX = StateContext(runner_id="runner-1", bot_id="bot-7", workspace_id="ws-1", conversation_id="conv-1",
                   thread_id=None, actor_type=None, actor_id="u-42", subject_type=None, subject_id="ticket-9")
ALL_SCOPES = StatePolicy(state_scopes=("conversation", "actor", "subject", "runner"))


def expected_key(scope: str, extra: dict[str, Any], binding_identity: str = "b-1", ctx: StateContext = CTX) -> str:
    """The formula written out independently: sha256 of canonical JSON (sorted keys, "," and ":")."""
    payload = {"version": 2, "scope": scope, "runner_id": ctx.runner_id, "binding_identity": binding_identity,
               "bot_id": ctx.bot_id, "workspace_id": ctx.workspace_id, **extra}
    raw = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return f"{scope}:v2:" + hashlib.sha256(raw.encode("utf-8")).hexdigest()


def test_scope_keys_hash_exactly_the_documented_fields() -> None:
    assert scope_key_for("conversation", CTX, "b-1") == expected_key(
        "conversation", {"conversation_id": "conv-1", "thread_id": None})
    assert scope_key_for("actor", CTX, "b-1") == expected_key("actor", {"actor_type": "user", "actor_id": "u-42"})
    assert scope_key_for("subject", CTX, "b-1") == expected_key(
        "subject", {"subject_type": "unknown", "subject_id": "ticket-9"})
    assert scope_key_for("runner", CTX, "b-1") == expected_key("runner", {})
    # a literal, so that the formula itself cannot drift unnoticed
    raw = ('{"binding_identity":"b-1","bot_id":"bot-7","runner_id":"runner-1","scope":"runner",'
           '"version":2,"workspace_id":"ws-1"}')
    assert scope_key_for("runner", CTX, "b-1") == "runner:v2:" + hashlib.sha256(raw.encode()).hexdigest()


def test_scope_key_details() -> None:
    # a null thread still counts: it is hashed as null, and differs from a thread
    with_thread = StateContext(**{**_fields(CTX), "thread_id": "t-1"})
    assert scope_key_for("conversation", with_thread, "b-1") == expected_key(
        "conversation", {"conversation_id": "conv-1", "thread_id": "t-1"}, ctx=with_thread)
    assert scope_key_for("conversation", with_thread, "b-1") != scope_key_for("conversation", CTX, "b-1")
    # explicit types are used as given; empty ones fall back to the defaults
    typed = StateContext(**{**_fields(CTX), "actor_type": "bot", "subject_type": "issue"})
    assert scope_key_for("actor", typed, "b-1") == expected_key("actor", {"actor_type": "bot", "actor_id": "u-42"},
                                                                 ctx=typed)
    assert scope_key_for("subject", typed, "b-1") == expected_key(
        "subject", {"subject_type": "issue", "subject_id": "ticket-9"}, ctx=typed)
    blank = StateContext(**{**_fields(CTX), "actor_type": ""})
    assert scope_key_for("actor", blank, "b-1") == scope_key_for("actor", CTX, "b-1")
    # non-ASCII is hashed as UTF-8, not as \u escapes
    uni = StateContext(**{**_fields(CTX), "conversation_id": "會話-ü"})
    assert scope_key_for("conversation", uni, "b-1") == expected_key(
        "conversation", {"conversation_id": "會話-ü", "thread_id": None}, ctx=uni)
    # missing (or empty) ids: no key
    bare = StateContext(runner_id="runner-1", conversation_id="")
    assert [scope_key_for(s, bare, "b") for s in ("conversation", "actor", "subject")] == [None, None, None]
    assert scope_key_for("runner", bare, "b") is not None
    assert scope_key_for("nope", CTX, "b") is None
    # the binding identity and the runner separate everything
    keys = {scope_key_for("actor", CTX, b) for b in ("b-1", "b-2")}
    keys.add(scope_key_for("actor", StateContext(**{**_fields(CTX), "runner_id": "runner-2"}), "b-1"))
    assert len(keys) == 3


def _fields(ctx: StateContext) -> dict[str, Any]:
    return {f: getattr(ctx, f) for f in ctx.__struct_fields__}


def test_binding_identity() -> None:
    assert binding_identity_of(StateBinding(binding_id="bind-1", scope_type="team", scope_id="t1")) == "bind-1"
    assert binding_identity_of(StateBinding(scope_type="team", scope_id="t1")) == "team:t1"
    assert binding_identity_of(StateBinding(scope_type="team")) == "unknown_binding"
    assert binding_identity_of(StateBinding(binding_id="", scope_id="t1")) == "unknown_binding"
    assert binding_identity_of(StateBinding()) == "unknown_binding"


def _rule(scope: str, policy: StatePolicy, ctx: StateContext | None = CTX) -> str:
    with pytest.raises(StateRuleViolation) as exc_info:
        check_scope(scope, policy, ctx, "b-1")
    return exc_info.value.rule


def test_policy_errors_in_order_with_their_words() -> None:
    off = StatePolicy(enable_state=False)
    bare = StateContext(runner_id="r")
    # disabled wins over everything after it
    assert _rule("bogus", off, bare) == "State is disabled by binding policy"
    assert _rule("conversation", off) == "State is disabled by binding policy"
    # then an invalid scope, even when the policy lists it
    assert _rule("bogus", StatePolicy(state_scopes=("bogus",))) == "Invalid scope: bogus"
    # then a scope the policy does not enable (default: conversation, actor), even without identity
    assert _rule("subject", StatePolicy(), bare) == 'Scope "subject" not enabled by binding policy'
    assert _rule("runner", StatePolicy()) == 'Scope "runner" not enabled by binding policy'
    # then missing identity
    assert _rule("conversation", StatePolicy(), bare) == 'Missing identity for scope "conversation"'
    assert _rule("actor", StatePolicy(), bare) == 'Missing identity for scope "actor"'
    assert _rule("subject", ALL_SCOPES, bare) == 'Missing identity for scope "subject"'
    assert check_scope("runner", ALL_SCOPES, bare, "b").startswith("runner:v2:")


def test_value_rules() -> None:
    for bad in ({1, 2}, object(), b"bytes", float("nan"), {"x": float("inf")}):
        with pytest.raises(StateRuleViolation) as exc_info:
            value_json(bad)
        assert exc_info.value.rule.startswith("Value is not JSON-serializable: ")
        assert exc_info.value.field == "value"
    # the size is the UTF-8 length of json.dumps(value, ensure_ascii=False): exactly the limit is fine
    assert len(value_json("x" * (MAX_VALUE_JSON_BYTES - 2)).encode()) == MAX_VALUE_JSON_BYTES
    with pytest.raises(StateRuleViolation) as exc_info:
        value_json("x" * (MAX_VALUE_JSON_BYTES - 1))
    assert exc_info.value.rule == "Value size 262145 bytes exceeds limit 262144 bytes"
    # non-ASCII counts in UTF-8 bytes (ü = 2 bytes), default separators count too
    with pytest.raises(StateRuleViolation, match="Value size 262146 bytes"):
        value_json("ü" * (MAX_VALUE_JSON_BYTES // 2))
    assert value_json({"a": [1, 2]}) == '{"a": [1, 2]}'


def test_key_alias() -> None:
    assert normalize_state_key("conversation_id") == "external.conversation_id"
    assert normalize_state_key("external.conversation_id") == "external.conversation_id"
    assert normalize_state_key("conversation_idx") == "conversation_idx"


def _set(**kw: Any) -> StateSet:
    base: dict[str, Any] = {"id": new_event_id(), "ts": now_iso(), "key": "k", "value": 1, "context": CTX,
                            "binding_identity": "b-1"}
    base.update(kw)
    if "scope_key" not in base:
        base["scope_key"] = scope_key_for("conversation", base["context"], base["binding_identity"])
    return StateSet(**base)


def test_events_route_to_the_compacted_stream_and_carry_what_rules_need() -> None:
    event = _set(created_at="2026-01-01T00:00:00+00:00")
    assert decode_event(encode_event(event)) == event
    subject = event.subject()
    tokens = subject.split(".")
    assert tokens[:3] == ["fleet", "state", "conversation"] and len(tokens) == 5
    assert tokens[3] == event.scope_key.rsplit(":", 1)[1]
    assert tokens[4] == hashlib.sha256(b"k").hexdigest()[:40]
    spec = stream_for_subject(subject)
    assert spec is not None and spec.name == "FLEET_STATE" and spec.max_msgs_per_subject == 1
    assert next(s for s in STREAMS if s.name == "FLEET_STATE").max_age_s is None
    tomb = StateDeleted(id=new_event_id(), ts=now_iso(), scope_key=event.scope_key, key="k", context=CTX,
                        binding_identity="b-1")
    assert tomb.subject() == subject  # the tombstone replaces the value on the same subject
    assert rule_violation(event) is None and rule_violation(tomb) is None


def test_rule_violations_a_projection_sees() -> None:
    off = StatePolicy(enable_state=False)
    assert rule_violation(_set(policy=off)) == "State is disabled by binding policy"
    bogus = "bogus:v2:" + "0" * 64
    assert rule_violation(_set(scope_key=bogus)) == "Invalid scope: bogus"
    assert rule_violation(_set(policy=StatePolicy(state_scopes=("actor",)))) == \
        'Scope "conversation" not enabled by binding policy'
    assert rule_violation(_set(context=None, scope_key=scope_key_for("conversation", CTX, "b-1"))) == \
        'Missing identity for scope "conversation"'
    forged = _set(binding_identity="b-2", scope_key=scope_key_for("conversation", CTX, "b-1"))
    assert "does not match the context and binding identity" in (rule_violation(forged) or "")
    assert rule_violation(_set(key="conversation_id")) == \
        'Key "conversation_id" must be written as "external.conversation_id"'
    assert rule_violation(_set(value="x" * MAX_VALUE_JSON_BYTES)) == \
        "Value size 262146 bytes exceeds limit 262144 bytes"
