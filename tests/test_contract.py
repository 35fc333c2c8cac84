"""The event contract, without a broker: subject token escaping, the one tagged-union decoder,
UUIDv7 ids, and the stream table."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import msgspec
import pytest
from fleetlog.schemas import (
    EVENT_TYPES,
    STREAMS,
    AttemptRecorded,
    AttemptsPurged,
    HostSnapshot,
    ProcessorLockChanged,
    ProcessorRunRecorded,
    ProcessorSessionDeleted,
    ProcessorSessionMarked,
    RunCancelRequested,
    RunClaimed,
    RunCreated,
    RunEventAppended,
    RunFinalized,
    RunLeaseExpired,
    RunReleased,
    RunRenewed,
    RunState,
    RuntimeHeartbeat,
    RuntimeRegistered,
    RuntimeStatusChanged,
    SnapshotDiff,
    StateDeleted,
    StateSet,
    decode_event,
    encode_event,
    event_schemas,
    new_event_id,
    now_iso,
    stream_for_subject,
    subjects,
)
from fleetlog.schemas.subjects import escape_token, unescape_token
from hypothesis import example, given, settings
from hypothesis import strategies as st

AWKWARD = ["a.b", "x>", "*", ">", "%", "%2E", "%%", "a%2Eb", " ", "sp ace", "\t", "tab\there", "\n", "new\nline",
           "\r", "\x00", "\x01ctl", "\x7f", "ü", "ünïcödé ✓", "日本語", "\u00a0", "\u2028", "\u200b", "\u3000",
           "emoji 🚀", "..", "a..b", ".", "fleet.attempt.x.y", "a.*.>", "-_~!@#$^&()[]{}|;:'\",<?/\\+="]

identities = st.text(min_size=1, max_size=40)


def awkward_examples(fn: Callable[..., Any]) -> Callable[..., Any]:
    for value in AWKWARD:
        fn = example(value)(fn)
    return fn


# -- subject token escaping -------------------------------------------------------------


@settings(max_examples=400, deadline=None, database=None)
@given(identities)
@awkward_examples
def test_escape_is_reversible_and_subject_safe(value: str) -> None:
    token = escape_token(value)
    assert unescape_token(token) == value
    assert token
    for bad in (".", "*", ">"):
        assert bad not in token, (value, token)
    assert not any(c.isspace() for c in token), (value, token)
    assert all(c.isprintable() for c in token), (value, token)
    # every % starts a %XX escape
    i = 0
    while (i := token.find("%", i)) != -1:
        assert len(token) >= i + 3 and all(c in "0123456789ABCDEFabcdef" for c in token[i + 1 : i + 3]), token
        i += 3


@settings(max_examples=300, deadline=None, database=None)
@given(identities, identities)
def test_escape_is_injective(a: str, b: str) -> None:
    assert (escape_token(a) == escape_token(b)) == (a == b)


def test_escape_examples_and_refusals() -> None:
    assert escape_token("alpha-1_probe") == "alpha-1_probe"  # plain identities are untouched
    assert escape_token("a.b") == "a%2Eb"
    assert escape_token("%") == "%25"
    assert escape_token("x>") == "x%3E"
    assert escape_token("*") == "%2A"
    assert escape_token("a b") == "a%20b"
    assert escape_token("%2E") != escape_token(".")
    with pytest.raises(ValueError):
        escape_token("")
    with pytest.raises(TypeError):
        escape_token(5)  # type: ignore[arg-type]


def _matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: `*` one token, `>` one or more trailing tokens."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


@settings(max_examples=300, deadline=None, database=None)
@given(identities, identities, identities, identities)
@example("a.b", "c", "a", "b.c")
@example("a", "b.c", "a.b", "c")
@example("x>", "y", "x", "y")
@example("*", "probe", "victim", "probe")
@example("purge", "x", "a", "b")
@example("a b", "c", "a", "b c")
def test_an_agent_cannot_reach_another_agents_subject(agent: str, action: str, other: str, other_action: str) -> None:
    subject = subjects.attempt(agent, action)
    tokens = subject.split(".")
    assert len(tokens) == 4 and tokens[:2] == ["fleet", "attempt"]
    assert (unescape_token(tokens[2]), unescape_token(tokens[3])) == (agent, action)
    assert subject != subjects.attempt_purge()
    if (agent, action) != (other, other_action):
        assert subject != subjects.attempt(other, other_action)
    if agent != other:
        # a subscription (or permission) scoped to the other agent never sees this subject
        assert not _matches(f"fleet.attempt.{escape_token(other)}.>", subject)
        assert not _matches(f"fleet.attempt.{escape_token(other)}.*", subject)
    assert _matches(f"fleet.attempt.{escape_token(agent)}.*", subject)


# -- every event type: one instance, built from identities -----------------------------------

SCOPE_KEY = "conversation:v2:" + "ab" * 32


def _run_state(ident: str) -> RunState:
    return RunState(run_id=ident, runner_id="runner-1", status="created", created_at=1_700_000_000,
                    metadata={"k": [1, 2]}, lease_expires_at=1_700_000_060.5)


def _envelope() -> dict[str, Any]:
    return {"id": new_event_id(), "ts": now_iso()}


FACTORIES: dict[type[Any], Callable[[str], Any]] = {
    AttemptRecorded: lambda i: AttemptRecorded(
        **_envelope(), agent=i, action=i, outcome="success", elapsed_s=1.5,
        pane_before={"format": "full", "text": "x"}, pane_after=None, extras={"polls": 4}),
    AttemptsPurged: lambda i: AttemptsPurged(**_envelope(), before=now_iso(), days=30.0),
    RunCreated: lambda i: RunCreated(**_envelope(), state=_run_state(i)),
    RunClaimed: lambda i: RunClaimed(**_envelope(), state=_run_state(i), runtime_id="rt"),
    RunRenewed: lambda i: RunRenewed(**_envelope(), state=_run_state(i)),
    RunReleased: lambda i: RunReleased(**_envelope(), state=_run_state(i), reason="done"),
    RunLeaseExpired: lambda i: RunLeaseExpired(**_envelope(), state=_run_state(i)),
    RunFinalized: lambda i: RunFinalized(**_envelope(), state=_run_state(i)),
    RunCancelRequested: lambda i: RunCancelRequested(**_envelope(), state=_run_state(i)),
    RunEventAppended: lambda i: RunEventAppended(**_envelope(), run_id=i, sequence=3, event_type="message",
                                                 data={"text": "hi"}, fence=7),
    RuntimeRegistered: lambda i: RuntimeRegistered(**_envelope(), runtime_id=i, capabilities=["gpu"],
                                                   labels={"zone": "a"}),
    RuntimeHeartbeat: lambda i: RuntimeHeartbeat(**_envelope(), runtime_id=i, active_runs=2),
    RuntimeStatusChanged: lambda i: RuntimeStatusChanged(**_envelope(), runtime_id=i, status="stale"),
    StateSet: lambda i: StateSet(**_envelope(), scope_key=SCOPE_KEY, key=i, value={"v": [1, None]}),
    StateDeleted: lambda i: StateDeleted(**_envelope(), scope_key=SCOPE_KEY, key=i),
    HostSnapshot: lambda i: HostSnapshot(**_envelope(), host=i, agent=i, data={"cpu": 0.5}),
    SnapshotDiff: lambda i: SnapshotDiff(**_envelope(), host=i, agent=i, timestamp="2026-01-01T00:00:00+09:00",
                                         diff_fields=["a.b"], changes={"a.b": {"from": 1, "to": None}}),
    ProcessorSessionMarked: lambda i: ProcessorSessionMarked(**_envelope(), processor=i, session_file=f"{i}/s.jsonl",
                                                             username=i, items_extracted=2, file_hash="ab",
                                                             processed_at=datetime(2026, 1, 1, 0, 0, 0, 5)),
    ProcessorSessionDeleted: lambda i: ProcessorSessionDeleted(**_envelope(), processor=i, session_file=i),
    ProcessorRunRecorded: lambda i: ProcessorRunRecorded(**_envelope(), processor=i, run_id=i, scanned=3,
                                                         errors_detail=[{"session": "a", "error": "b"}], ok=False),
    ProcessorLockChanged: lambda i: ProcessorLockChanged(**_envelope(), processor=i, holder="me",
                                                         state="acquired", fence=1),
}


def _tag(cls: type[Any]) -> str:
    tag = cls.__struct_config__.tag
    assert isinstance(tag, str)
    return tag


def test_factories_cover_every_event_type() -> None:
    assert set(FACTORIES) == set(EVENT_TYPES)
    assert len({_tag(c) for c in EVENT_TYPES}) == len(EVENT_TYPES)  # tags are unique
    assert set(event_schemas()) == {_tag(c) for c in EVENT_TYPES} | {"fleetlog.event"}


@pytest.mark.parametrize("cls", EVENT_TYPES, ids=_tag)
def test_every_event_round_trips_through_the_one_decoder(cls: type[Any]) -> None:
    event = FACTORIES[cls]("ident-1")
    data = encode_event(event)
    wire = msgspec.json.decode(data)
    assert wire["type"] == _tag(cls)
    assert {"id", "type", "ts", "v"} <= set(wire)
    back = decode_event(data)
    assert type(back) is cls
    assert back == event
    assert encode_event(back) == data
    assert decode_event(data.decode()) == event  # str input too


@settings(max_examples=60, deadline=None, database=None)
@given(identities)
@awkward_examples
def test_every_event_subject_lands_in_exactly_its_own_stream(ident: str) -> None:
    names = [s.name for s in STREAMS]
    assert len(names) == len(set(names))
    for cls in EVENT_TYPES:
        event = FACTORIES[cls](ident)
        subject = event.subject()
        assert all(subject.split(".")), subject  # no empty tokens
        capturing = [s.name for s in STREAMS if any(_matches(p, subject) for p in s.subjects)]
        assert capturing == [cls.STREAM], (cls.__name__, subject, capturing)
        spec = stream_for_subject(subject)
        assert spec is not None and spec.name == cls.STREAM, (cls.__name__, subject)


def test_stream_table_sanity() -> None:
    names = {s.name for s in STREAMS}
    assert {cls.STREAM for cls in EVENT_TYPES} <= names
    attempts = next(s for s in STREAMS if s.name == "FLEET_ATTEMPTS")
    assert attempts.max_age_s == pytest.approx(30 * 86400)
    assert attempts.max_age_setting == "attempts_max_age_days"
    reject = subjects.reject("attempts")
    assert stream_for_subject(reject) is not None and stream_for_subject(reject).name == "FLEET_REJECTS"
    assert stream_for_subject("nope.nothing") is None
    assert stream_for_subject(subjects.attempt_purge()).name == "FLEET_ATTEMPTS"
    # no subject pattern is declared by two streams
    patterns = [p for s in STREAMS for p in s.subjects]
    assert len(patterns) == len(set(patterns))


# -- the decoder refuses bad events, naming the field -------------------------------------------------


def _attempt_wire(**override: Any) -> dict[str, Any]:
    wire = msgspec.json.decode(encode_event(FACTORIES[AttemptRecorded]("alpha")))
    wire.update(override)
    return {k: v for k, v in wire.items() if v is not _DROP}


_DROP = object()


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"type": "attempt.nope"}, "type"),
        ({"type": 5}, "type"),
        ({"type": _DROP}, "type"),
        ({"id": _DROP}, "id"),
        ({"id": "not-a-uuid"}, "id"),
        ({"id": "0190b5a2-7c3e-7a00-8000-00000000000"}, "id"),  # one digit short
        ({"id": 12345}, "id"),
        ({"ts": _DROP}, "ts"),
        ({"ts": 1700000000}, "ts"),
        ({"agent": 5}, "agent"),
        ({"agent": ""}, "agent"),
        ({"agent": _DROP}, "agent"),
        ({"action": None}, "action"),
        ({"outcome": ""}, "outcome"),
        ({"elapsed_s": "1.5"}, "elapsed_s"),
        ({"elapsed_s": -1}, "elapsed_s"),
        ({"elapsed_s": True}, "elapsed_s"),
        ({"elapsed_s": _DROP}, "elapsed_s"),
        ({"extras": [1, 2]}, "extras"),
        ({"pane_before": "raw text"}, "pane_before"),
        ({"v": "1"}, "v"),
    ],
    ids=lambda v: str(v) if not isinstance(v, dict) else ",".join(f"{k}={v[k]!r}"[:30] for k in v),
)
def test_decoder_rejects_bad_events_naming_the_field(override: dict[str, Any], field: str) -> None:
    data = msgspec.json.encode(_attempt_wire(**override))
    with pytest.raises(msgspec.ValidationError) as exc_info:
        decode_event(data)
    message = str(exc_info.value)
    assert f"$.{field}" in message or f"`{field}`" in message, message


def test_decoder_rejects_invalid_json_and_non_objects() -> None:
    for data in (b"{not json", b"", b"\xff\xfe"):
        with pytest.raises(msgspec.DecodeError):
            decode_event(data)
    for data in (b"[]", b"5", b'"attempt.recorded"', b"null"):
        with pytest.raises(msgspec.ValidationError):
            decode_event(data)


# -- UUIDv7 ids ---------------------------------------------------------------------------------------


def test_event_ids_are_uuid_v7_and_time_ordered() -> None:
    before_ms = time.time_ns() // 1_000_000
    ids = [new_event_id() for _ in range(5000)]
    after_ms = time.time_ns() // 1_000_000
    assert len(set(ids)) == len(ids)
    stamps = []
    for text in ids:
        u = uuid.UUID(text)
        assert str(u) == text  # canonical lowercase 8-4-4-4-12
        assert u.version == 7 and u.variant == uuid.RFC_4122, text
        ms = u.int >> 80
        assert before_ms <= ms <= after_ms
        stamps.append(ms)
    assert stamps == sorted(stamps)  # the time prefix never goes back
    # across milliseconds, id order (as text and as UUID) is time order
    for a, b, ma, mb in zip(ids, ids[1:], stamps, stamps[1:], strict=False):
        if ma < mb:
            assert a < b and uuid.UUID(a) < uuid.UUID(b)
    time.sleep(0.002)
    later = new_event_id()
    assert later > max(ids)
    # the decoder accepts our ids (and any RFC 4122 id)
    event = FACTORIES[AttemptRecorded]("x")
    assert decode_event(encode_event(event)).id == event.id
