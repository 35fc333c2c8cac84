"""Scoped state (issue 4) through the Python API: set/get/delete/list/snapshot, policy errors,
the alias, limits, binding isolation, read-your-writes. Real nats-server + real DuckDB."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import nats
import pytest
from fleetlog.services.client.state import StateDeletion, StatePolicyError, StateWrite

from fleetlog import Fleet, FleetSettings, FleetSync, FleetValidationError

STREAM = "FLEET_STATE"
CTX: dict[str, Any] = {"runner_id": "runner-1", "bot_id": "bot-1", "workspace_id": "ws-1",
                       "conversation_id": "conv-1", "actor_id": "user-1", "subject_id": "ticket-1"}
BIND: dict[str, Any] = {"binding_id": "bind-A"}
EVERY = {"binding_id": "bind-A", "state_policy": {"state_scopes": ["conversation", "actor", "subject", "runner"]}}


async def stream_last_seq(settings: FleetSettings) -> int:
    nc = await nats.connect(settings.nats_url)
    try:
        return int((await nc.jetstream().stream_info(STREAM)).state.last_seq)
    finally:
        await nc.close()


async def test_set_get_entry_upsert_keeps_created_at(fleet: Fleet) -> None:
    first = await fleet.state.set("conversation", "mood", {"v": "calm", "n": [1, 2]}, context=CTX, binding=BIND)
    assert isinstance(first, StateWrite) and first.token == {STREAM: first.seq}
    assert first.scope_key == fleet.state.scope_key("conversation", context=CTX, binding=BIND)
    assert first.created_at == first.updated_at
    assert await fleet.state.get("conversation", "mood", context=CTX, binding=BIND, min_seq=first) == \
        {"v": "calm", "n": [1, 2]}

    second = await fleet.state.set("conversation", "mood", "tense", context=CTX, binding=BIND)
    assert second.seq > first.seq
    entry = await fleet.state.entry("conversation", "mood", context=CTX, binding=BIND, min_seq=second)
    assert entry.found and entry.value == "tense" and entry.seq == second.seq
    assert entry.created_at == first.created_at  # kept
    assert entry.updated_at == second.updated_at and entry.updated_at >= first.updated_at  # refreshed
    assert set(msgspec.structs.asdict(entry)) == {"scope_key", "key", "found", "value", "created_at", "updated_at",
                                                  "seq", "as_of", "lag", "lag_s"}
    assert entry.as_of[STREAM] >= second.seq and entry.lag[STREAM] >= 0

    # missing -> None; JSON null is stored and read back as None too, but `entry` tells them apart
    assert await fleet.state.get("conversation", "nothing", context=CTX, binding=BIND, min_seq=second) is None
    missing = await fleet.state.entry("conversation", "nothing", context=CTX, binding=BIND)
    assert not missing.found and missing.value is None and missing.created_at is None
    nul = await fleet.state.set("conversation", "nul", None, context=CTX, binding=BIND)
    assert (await fleet.state.entry("conversation", "nul", context=CTX, binding=BIND, min_seq=nul)).found
    for value in (0, 1.5, True, "ü 日本", [], {}, {"deep": {"er": [None, 1, "x"]}}):
        w = await fleet.state.set("actor", "v", value, context=CTX, binding=BIND)
        assert await fleet.state.get("actor", "v", context=CTX, binding=BIND, min_seq=w) == value


async def test_delete_true_iff_something_was_there(fleet: Fleet, settings: FleetSettings) -> None:
    w = await fleet.state.set("actor", "k", 1, context=CTX, binding=BIND)
    gone = await fleet.state.delete("actor", "k", context=CTX, binding=BIND)
    assert isinstance(gone, StateDeletion) and gone and gone.deleted and gone.seq == w.seq + 1
    assert await fleet.state.get("actor", "k", context=CTX, binding=BIND, min_seq=gone) is None
    before = await stream_last_seq(settings)
    again = await fleet.state.delete("actor", "k", context=CTX, binding=BIND)
    assert not again and again.deleted is False
    assert again.token == {STREAM: gone.seq}  # orders reads after the tombstone that is there
    never = await fleet.state.delete("actor", "never-set", context=CTX, binding=BIND)
    assert not never and never.token == {} and never.seq is None
    assert await stream_last_seq(settings) == before  # deleting nothing publishes nothing
    # set again after a delete: a new created_at
    back = await fleet.state.set("actor", "k", 2, context=CTX, binding=BIND)
    entry = await fleet.state.entry("actor", "k", context=CTX, binding=BIND, min_seq=back)
    assert entry.value == 2 and entry.created_at == back.created_at == back.updated_at
    assert entry.created_at > w.created_at


async def test_policy_errors_in_order_and_nothing_published(fleet: Fleet, settings: FleetSettings) -> None:
    before = await stream_last_seq(settings)
    off = {"state_policy": {"enable_state": False}}
    bare = {"runner_id": "runner-1"}
    cases: list[tuple[str, Any, Any, Any, str, str]] = [
        ("bogus", bare, off, {1}, "binding.state_policy.enable_state", "State is disabled by binding policy"),
        ("bogus", bare, BIND, {1}, "scope", "Invalid scope: bogus"),
        ("subject", bare, BIND, {1}, "binding.state_policy.state_scopes",
         'Scope "subject" not enabled by binding policy'),
        ("conversation", bare, BIND, {1}, "context.conversation_id", 'Missing identity for scope "conversation"'),
        ("actor", {**CTX, "actor_id": ""}, BIND, 1, "context.actor_id", 'Missing identity for scope "actor"'),
        ("conversation", CTX, BIND, {1}, "value", "Value is not JSON-serializable: Object of type set is not "
                                                  "JSON serializable"),
        ("conversation", CTX, BIND, "x" * 262_143, "value", "Value size 262145 bytes exceeds limit 262144 bytes"),
    ]
    for scope, ctx, binding, value, field, words in cases:
        with pytest.raises(StatePolicyError) as exc_info:
            await fleet.state.set(scope, "k", value, context=ctx, binding=binding)
        assert (exc_info.value.field, exc_info.value.rule) == (field, words)
        assert str(exc_info.value) == f"{field}: {words}"
    # reads and deletes apply the same scope rules
    with pytest.raises(StatePolicyError, match="State is disabled by binding policy"):
        await fleet.state.get("conversation", "k", context=CTX, binding=off)
    with pytest.raises(StatePolicyError, match='Scope "runner" not enabled'):
        await fleet.state.delete("runner", "k", context=CTX, binding=BIND)
    with pytest.raises(StatePolicyError, match="Invalid scope: nope"):
        fleet.state.scope_key("nope", context=CTX, binding=BIND)
    # bad shapes name the field
    for kwargs, field in (({"context": {"bot_id": "b"}}, "context"),
                          ({"context": {**CTX, "bot_id": 5}}, "context.bot_id"),
                          ({"context": CTX, "binding": {"state_policy": {"enable_state": "yes"}}},
                           "binding.state_policy.enable_state"),
                          ({"context": "runner-1"}, "context")):
        with pytest.raises(FleetValidationError) as exc_info:
            await fleet.state.set("conversation", "k", 1, **kwargs)
        assert exc_info.value.field.startswith(field), exc_info.value
    with pytest.raises(FleetValidationError) as exc_info:  # the whole event must fit max_event_bytes
        await fleet.state.set("conversation", "k", 1, context={**CTX, "bot_id": "b" * 600_000}, binding=BIND)
    assert exc_info.value.field == "event" and "max_event_bytes" in exc_info.value.rule
    assert await stream_last_seq(settings) == before

    exact = await fleet.state.set("conversation", "big", "x" * 262_142, context=CTX, binding=BIND)  # 262,144 bytes
    assert len(await fleet.state.get("conversation", "big", context=CTX, binding=BIND, min_seq=exact)) == 262_142


async def test_keys_alias_and_length(fleet: Fleet) -> None:
    w = await fleet.state.set("conversation", "conversation_id", "ext-1", context=CTX, binding=BIND)
    assert w.key == "external.conversation_id"
    assert await fleet.state.get("conversation", "external.conversation_id", context=CTX, binding=BIND,
                                 min_seq=w) == "ext-1"
    assert await fleet.state.get("conversation", "conversation_id", context=CTX, binding=BIND) == "ext-1"
    scope_key = fleet.state.scope_key("conversation", context=CTX, binding=BIND)
    assert (await fleet.state.list(scope_key, prefix="conversation_id")).keys == ["external.conversation_id"]
    assert (await fleet.state.list(scope_key)).keys == ["external.conversation_id"]
    assert await fleet.state.delete("conversation", "conversation_id", context=CTX, binding=BIND)

    long_key = "k" * 255
    w = await fleet.state.set("actor", long_key, 1, context=CTX, binding=BIND)
    assert await fleet.state.get("actor", long_key, context=CTX, binding=BIND, min_seq=w) == 1
    for bad in ("k" * 256, "", 5):
        with pytest.raises(FleetValidationError) as exc_info:
            await fleet.state.set("actor", bad, 1, context=CTX, binding=BIND)  # type: ignore[arg-type]
        assert exc_info.value.field == "key"
    awkward = ["a.b", "x>", "*", "%2E", "sp ace", "日本語", "line\nbreak"]
    for k in awkward:
        w = await fleet.state.set("actor", k, k, context=CTX, binding=BIND)
    for k in awkward:
        assert await fleet.state.get("actor", k, context=CTX, binding=BIND, min_seq=w) == k


async def test_list_order_plain_prefix_limit_and_paging(fleet: Fleet) -> None:
    keys = ["a%", "a%c", "a_b", "ab", "abc", "b", "A", "a", "ax_", "a_"]
    w = None
    for k in keys:
        w = await fleet.state.set("actor", k, 1, context=CTX, binding=BIND)
    sk = fleet.state.scope_key("actor", context=CTX, binding=BIND)
    page = await fleet.state.list(sk, min_seq=w)
    assert page.keys == sorted(keys) and page.has_more is False and page.scope_key == sk
    assert set(msgspec.structs.asdict(page)) == {"scope_key", "keys", "has_more", "as_of", "lag", "lag_s"}
    assert (await fleet.state.list(sk, prefix="a%")).keys == ["a%", "a%c"]  # % is literal
    assert (await fleet.state.list(sk, prefix="a_")).keys == ["a_", "a_b"]  # _ is literal
    assert (await fleet.state.list(sk, prefix="")).keys == sorted(keys)
    assert (await fleet.state.list(sk, prefix="zz")).keys == []
    three = await fleet.state.list(sk, limit=3)
    assert three.keys == sorted(keys)[:3] and three.has_more
    rest = await fleet.state.list(sk, after=three.keys[-1], limit=100)
    assert three.keys + rest.keys == sorted(keys) and not rest.has_more

    many = [f"m{i:03d}" for i in range(105)]
    for k in many:
        w = await fleet.state.set("runner", k, 0, context=CTX, binding=EVERY)
    rk = fleet.state.scope_key("runner", context=CTX, binding=EVERY)
    capped = await fleet.state.list(rk, limit=500, min_seq=w)
    assert capped.keys == many[:100] and capped.has_more  # at most 100
    assert (await fleet.state.list(rk, after=capped.keys[-1])).keys == many[100:]
    for bad in (0, -1, "5", True):
        with pytest.raises(FleetValidationError) as exc_info:
            await fleet.state.list(rk, limit=bad)  # type: ignore[arg-type]
        assert exc_info.value.field == "limit"
    with pytest.raises(FleetValidationError) as exc_info:
        await fleet.state.list("not-a-scope-key")
    assert exc_info.value.field == "scope_key"


async def test_snapshot_scopes_seed_and_disabled(fleet: Fleet) -> None:
    w = None
    for scope in ("conversation", "actor", "subject", "runner"):
        w = await fleet.state.set(scope, "where", scope, context=CTX, binding=EVERY)
    snap = await fleet.state.snapshot(CTX, EVERY, min_seq=w)
    assert set(msgspec.structs.asdict(snap)) == {"conversation", "actor", "subject", "runner", "elided", "as_of",
                                                 "lag", "lag_s"}
    assert snap.elided == []
    assert snap.conversation == {"where": "conversation", "external.conversation_id": "conv-1"}  # seeded
    assert (snap.actor, snap.subject, snap.runner) == ({"where": "actor"}, {"where": "subject"}, {"where": "runner"})
    # default policy: conversation + actor only
    default = await fleet.state.snapshot(CTX, {"binding_id": "bind-A"}, min_seq=w)
    assert default.conversation == {"where": "conversation", "external.conversation_id": "conv-1"}
    assert default.actor == {"where": "actor"} and default.subject == {} and default.runner == {}
    # a stored external.conversation_id wins over the context's
    w = await fleet.state.set("conversation", "conversation_id", "stored-ext", context=CTX, binding=EVERY)
    snap = await fleet.state.snapshot(CTX, EVERY, min_seq=w)
    assert snap.conversation["external.conversation_id"] == "stored-ext"
    # no id for a scope: that scope is empty (and nothing is seeded without a conversation)
    no_conv = {**CTX, "conversation_id": None, "subject_id": None}
    snap = await fleet.state.snapshot(no_conv, EVERY)
    assert snap.conversation == {} and snap.subject == {} and snap.actor == {"where": "actor"}
    # conversation not enabled: no seed either
    only_actor = {"binding_id": "bind-A", "state_policy": {"state_scopes": ["actor"]}}
    snap = await fleet.state.snapshot(CTX, only_actor)
    assert snap.conversation == {} and snap.actor == {"where": "actor"}
    # disabled policy: four empty dicts
    off = {"binding_id": "bind-A", "state_policy": {"enable_state": False}}
    snap = await fleet.state.snapshot(CTX, off)
    assert (snap.conversation, snap.actor, snap.subject, snap.runner) == ({}, {}, {}, {})
    assert STREAM in snap.as_of


async def test_a_snapshot_too_big_to_send_marks_its_largest_values(fleet: Fleet) -> None:
    """Five 250 kB values (each under the value limit) in one scope: the snapshot used to be a
    413 for good (it has no page or limit to ask for). The largest values are replaced by a
    marker naming their size, listed in `elided`, and each reads whole with state get."""
    w = None
    for i in range(5):
        w = await fleet.state.set("actor", f"k{i}", str(i) * (250_000 + i), context=CTX, binding=EVERY)
    w = await fleet.state.set("actor", "small", {"n": 1}, context=CTX, binding=EVERY)
    snap = await fleet.state.snapshot(CTX, EVERY, min_seq=w)
    assert snap.actor["small"] == {"n": 1}
    whole = {k for k, v in snap.actor.items() if isinstance(v, str)}
    marked = {e.key: e for e in snap.elided}
    assert whole and marked and whole | marked.keys() | {"small"} == set(snap.actor) and not whole & marked.keys()
    assert max(len(snap.actor[k]) for k in whole) < min(e.bytes for e in marked.values())  # the largest went
    for key, e in marked.items():
        assert e.scope == "actor" and e.bytes == 250_000 + int(key[1:]) + 2  # JSON: the quotes
        assert snap.actor[key] == {"fleetlog_elided": True, "bytes": e.bytes, "read_with": "state get"}
        assert await fleet.state.get("actor", key, context=CTX, binding=EVERY) == key[1:] * (e.bytes - 2)
    for key in whole:
        assert snap.actor[key] == key[1:] * (250_000 + int(key[1:]))


async def test_bindings_are_isolated(fleet: Fleet) -> None:
    a, b = {"binding_id": "bind-A"}, {"binding_id": "bind-B"}
    team = {"scope_type": "team", "scope_id": "t1"}  # identity "team:t1"
    w = await fleet.state.set("actor", "secret", "A's", context=CTX, binding=a)
    await fleet.state.set("actor", "secret", "team's", context=CTX, binding=team)
    w = await fleet.state.set("actor", "only-b", 1, context=CTX, binding=b)
    assert await fleet.state.get("actor", "secret", context=CTX, binding=b, min_seq=w) is None
    assert await fleet.state.get("actor", "secret", context=CTX, binding=a) == "A's"
    assert await fleet.state.get("actor", "secret", context=CTX, binding=team) == "team's"
    assert (await fleet.state.list(fleet.state.scope_key("actor", context=CTX, binding=b))).keys == ["only-b"]
    assert (await fleet.state.snapshot(CTX, b)).actor == {"only-b": 1}
    assert not await fleet.state.delete("actor", "secret", context=CTX, binding=b)
    assert await fleet.state.get("actor", "secret", context=CTX, binding=a) == "A's"
    # the runner and the conversation's thread are part of the identity too
    assert await fleet.state.get("actor", "secret", context={**CTX, "runner_id": "runner-2"}, binding=a) is None
    w = await fleet.state.set("conversation", "t", 1, context={**CTX, "thread_id": "th-1"}, binding=a)
    assert await fleet.state.get("conversation", "t", context=CTX, binding=a, min_seq=w) is None


async def test_read_your_writes_under_other_traffic(fleet: Fleet) -> None:
    """Every write's token makes get/list/snapshot see it, while attempts pour in; no token answers at once."""
    for i in range(40_000):  # a burst from another family, not yet folded
        fleet.attempts.record(agent=f"load-{i % 50}", action="probe", outcome="success", elapsed_s=0.1,
                              pane_before="x" * 500)
    for round_ in range(20):
        w = await fleet.state.set("actor", f"ryw-{round_}", round_, context=CTX, binding=BIND)
        assert await fleet.state.get("actor", f"ryw-{round_}", context=CTX, binding=BIND, min_seq=w) == round_
        page = await fleet.state.list(w.scope_key, prefix="ryw-", min_seq=w)
        assert f"ryw-{round_}" in page.keys and page.as_of[STREAM] >= w.seq
        assert (await fleet.state.snapshot(CTX, BIND, min_seq=w)).actor[f"ryw-{round_}"] == round_
        gone = await fleet.state.delete("actor", f"ryw-{round_}", context=CTX, binding=BIND)
        assert await fleet.state.get("actor", f"ryw-{round_}", context=CTX, binding=BIND, min_seq=gone) is None
    # without a token: an answer straight away, saying what it reflects
    entry = await fleet.state.entry("actor", "ryw-0", context=CTX, binding=BIND)
    assert STREAM in entry.as_of and STREAM in entry.lag
    await fleet.flush(60)


async def test_fleet_sync_state(settings: FleetSettings, fleet: Fleet) -> None:
    def work() -> tuple[Any, Any, bool, list[str]]:
        sync = FleetSync.connect(settings=settings)
        try:
            w = sync.state.set("actor", "sync-key", {"n": 1}, context=CTX, binding=BIND)
            value = sync.state.get("actor", "sync-key", context=CTX, binding=BIND, min_seq=w)
            snap = sync.state.snapshot(CTX, BIND, min_seq=w)
            gone = sync.state.delete("actor", "sync-key", context=CTX, binding=BIND)
            with pytest.raises(StatePolicyError):
                sync.state.set("nope", "k", 1, context=CTX, binding=BIND)
            keys = sync.state.list(sync.state.scope_key("actor", context=CTX, binding=BIND), min_seq=gone).keys
            return value, snap.actor, bool(gone), keys
        finally:
            sync.close()

    value, actor, deleted, keys = await asyncio.to_thread(work)
    assert value == {"n": 1} and actor == {"sync-key": {"n": 1}} and deleted and keys == []
