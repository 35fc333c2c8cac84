"""The wire contract for any language (docs/wire.md, `fleetlog schemas export`).

The subject rendering and escaping below are written from docs/wire.md alone, as a client
in another language would write them; they never call fleetlog's `escape_token` or an
event's `subject()`. The class's `subject()` is only the judge they are compared with.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
import uuid
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from fleetlog.schemas import EVENT_TYPES, decode_event, export_schemas
from fleetlog.schemas.jsonschema import DEFAULT_MAX_EVENT_BYTES, PUBLISH, subject_template
from fleetlog.services.node.server import Server

from fleetlog import Fleet, FleetSettings

# -- a foreign client's implementation of docs/wire.md ------------------------------------------


def escape(value: str) -> str:
    """docs/wire.md, "Escaping"."""
    if value == "":
        raise ValueError("empty token")
    out = []
    for ch in value:
        if 0x21 <= ord(ch) <= 0x7E and ch not in ".*>%":
            out.append(ch)
        elif ord(ch) > 0x7F and unicodedata.category(ch)[0] not in "CZ":
            out.append(ch)
        else:
            out.append("".join(f"%{b:02X}" for b in ch.encode("utf-8")))
    return "".join(out)


def transform(name: str, value: str) -> str:
    """docs/wire.md, "Transforms"."""
    if name == "scope":
        return value.split(":", 1)[0]
    if name == "hash":
        return value.rsplit(":", 1)[1]
    if name == "sha256_40":
        return hashlib.sha256(value.encode("utf-8")).hexdigest()[:40]
    raise AssertionError(f"undocumented transform {name}")


def render(template: str, payload: dict[str, Any]) -> str:
    """A subject from an `x-fleetlog-subject` template and the JSON payload."""
    tokens = []
    for part in template.split("."):
        if not part.startswith("{"):
            tokens.append(part)
            continue
        path, _, how = part[1:-1].partition("|")
        value: Any = payload
        for step in path.split("/"):
            value = value[step]
        text = str(value)
        tokens.append(escape(transform(how, text) if how else text))
    return ".".join(tokens)


def scope_key(scope: str, context: dict[str, Any], binding_identity: str) -> str:
    """docs/wire.md, "State": the actor scope's key."""
    parts = {"version": 2, "scope": scope, "runner_id": context["runner_id"], "binding_identity": binding_identity,
             "bot_id": context.get("bot_id"), "workspace_id": context.get("workspace_id"),
             "actor_type": context.get("actor_type") or "user", "actor_id": context["actor_id"]}
    raw = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return f"{scope}:v2:{hashlib.sha256(raw.encode('utf-8')).hexdigest()}"


# -- the export agrees with the code -------------------------------------------------------------

NASTY = "a.b c*>%\t\u00a0é日本\u200b~"  # dot, space, wildcards, %, TAB, NBSP, printable non-ASCII, ZWSP (Cf)
TS = "2026-12-05T08:00:00+00:00"


def _id() -> str:
    return str(uuid.uuid4())


def _run_state(run_id: str) -> dict[str, Any]:
    return {"run_id": run_id, "runner_id": "r", "status": "queued", "created_at": 1_700_000_000}


SAMPLES: dict[str, dict[str, Any]] = {
    "attempt.recorded": {"agent": NASTY, "action": "x>" + NASTY, "outcome": "success", "elapsed_s": 1.0},
    "attempt.purged": {"before": TS},
    **{t: {"state": _run_state(NASTY)} for t in (
        "run.created", "run.claimed", "run.renewed", "run.released", "run.lease_expired", "run.finalized",
        "run.cancel_requested")},
    "run.event": {"run_id": NASTY, "sequence": 42, "event_type": "log"},
    "runtime.registered": {"runtime_id": NASTY},
    "runtime.heartbeat": {"runtime_id": NASTY},
    "runtime.status": {"runtime_id": NASTY, "status": "stale"},
    "state.set": {"scope_key": "actor:v2:" + "ab" * 32, "key": NASTY, "value": 1},
    "state.deleted": {"scope_key": "runner:v2:" + "cd" * 32, "key": "k"},
    "snapshot.taken": {"host": NASTY, "agent": "h.1"},
    "snapshot.diff": {"host": "h%1", "agent": NASTY, "diff_fields": ["x"], "changes": {"x": {"from": 1, "to": 2}}},
    "proc.session": {"processor": NASTY, "session_file": "u.1/s 1.jsonl", "username": "u", "items_extracted": 1,
                     "file_hash": "f.1", "processed_at": "2026-01-01T00:00:00"},
    "proc.session.deleted": {"processor": "p 1", "session_file": NASTY},
    "proc.run": {"processor": "p 1", "run_id": NASTY},
    "proc.lock": {"processor": NASTY, "holder": "h", "state": "acquired"},
}


def test_every_event_type_exports_a_template_its_subject_agrees_with(tmp_path: Path) -> None:
    paths = export_schemas(tmp_path)
    exported = {p.name.removesuffix(".schema.json"): json.loads(p.read_text()) for p in paths}
    tags = {c.__struct_config__.tag for c in EVENT_TYPES}
    assert set(SAMPLES) == tags == set(PUBLISH)  # a new event type needs a sample and a publish mode
    union = exported["fleetlog.event"]
    assert {"Nats-Msg-Id", "Nats-Expected-Last-Subject-Sequence"} <= set(union["x-fleetlog-headers"])
    assert set(union["x-fleetlog-transforms"]) == {"scope", "hash", "sha256_40"}
    for tag, fields in SAMPLES.items():
        schema = exported[tag]
        payload = {"type": tag, "id": _id(), "ts": TS, **fields}
        event = decode_event(json.dumps(payload))  # the sample is a valid event
        assert render(schema["x-fleetlog-subject"], payload) == event.subject(), tag
        assert schema["x-fleetlog-stream"] == type(event).STREAM
        for placeholder in schema["x-fleetlog-placeholders"]:
            assert "{" + placeholder + "}" in schema["x-fleetlog-subject"]
        assert schema["x-fleetlog-limits"]["max_event_bytes"] == DEFAULT_MAX_EVENT_BYTES
        assert schema["x-fleetlog-publish"]["mode"] in ("fire-and-forget", "guarded", "fleetlog")
    # the escapes were really exercised, and the rule's examples hold
    assert "%2E" in render(exported["attempt.recorded"]["x-fleetlog-subject"], {"agent": "a.b", "action": "x"})
    assert [escape(v) for v in (" ", ".", "%", "\t", "\u00a0", "é", "\u200b")] == [
        "%20", "%2E", "%25", "%09", "%C2%A0", "é", "%E2%80%8B"]


def test_the_default_size_limit_is_the_settings_default() -> None:
    assert FleetSettings.model_fields["max_event_bytes"].default == DEFAULT_MAX_EVENT_BYTES


def test_a_subject_built_another_way_fails_the_export_instead_of_exporting_a_wrong_template() -> None:
    from fleetlog.schemas.attempts import AttemptEvent

    class Reversed(AttemptEvent, tag="test.reversed", kw_only=True, frozen=True):
        agent: str

        def subject(self) -> str:
            return "fleet.attempt." + self.agent[::-1] + ".x"

    with pytest.raises(RuntimeError, match="Reversed"):
        subject_template(Reversed)


# -- a bare NATS client, with nothing but the export and docs/wire.md ------------------------------


async def test_a_bare_nats_client_publishes_every_family_from_the_export_alone(
        fleet: Fleet, server: Server, settings: FleetSettings, tmp_path: Path) -> None:
    schemas = {p.name.removesuffix(".schema.json"): json.loads(p.read_text()) for p in export_schemas(tmp_path)}
    context = {"runner_id": "runner 1", "actor_id": "user.1"}
    skey = scope_key("actor", context, "bind.1")
    events: list[dict[str, Any]] = [
        {"type": "attempt.recorded", "agent": "wire agent.1", "action": "probe>*", "outcome": "success",
         "elapsed_s": 0.5},
        {"type": "snapshot.taken", "host": "host.example.com", "agent": "wire agent.1", "data": {"cpu": 2}},
        {"type": "state.set", "scope_key": skey, "key": "k.1 é", "binding_identity": "bind.1",
         "context": context, "value": {"n": 1}},
        {"type": "run.created", "state": _run_state("wire run.1")},
        {"type": "run.event", "run_id": "wire run.1", "sequence": 0, "event_type": "log", "data": {"line": "hi"}},
        {"type": "runtime.registered", "runtime_id": "rt.1", "capabilities": {"x": 1}},
        {"type": "runtime.heartbeat", "runtime_id": "rt.1", "status": "online", "active_runs": 1},
        {"type": "proc.session", "processor": "ingest.v1", "session_file": "al ice/a b.jsonl", "username": "alice",
         "items_extracted": 3, "file_hash": "h.1", "processed_at": "2026-01-01T00:00:00.5"},
        {"type": "proc.run", "processor": "ingest.v1", "run_id": "pr.1", "scanned": 2, "errors": 1, "ok": False},
        {"type": "proc.lock", "processor": "ingest.v1", "holder": "me", "state": "acquired",
         "lease_expires_at": 4_000_000_000.0},
    ]
    token: dict[str, int] = {}
    nc = await nats.connect(settings.nats_url)
    try:
        js = nc.jetstream()
        for fields in events:
            schema = schemas[fields["type"]]
            payload = {"id": _id(), "ts": TS, **fields}
            subject = render(schema["x-fleetlog-subject"], payload)
            headers = {"Nats-Msg-Id": payload["id"]}
            if schema["x-fleetlog-publish"]["mode"] == "guarded":
                headers["Nats-Expected-Last-Subject-Sequence"] = "0"  # every subject here is new
            else:
                assert schema["x-fleetlog-publish"]["mode"] == "fire-and-forget", fields["type"]
            ack = await js.publish(subject, json.dumps(payload).encode(), headers=headers)
            assert ack.stream == schema["x-fleetlog-stream"], fields["type"]
            token[ack.stream] = max(token.get(ack.stream, 0), ack.seq)
            if fields["type"] == "attempt.recorded":  # the same id again: JetStream drops it
                again = await js.publish(subject, json.dumps(payload).encode(), headers=headers)
                assert again.duplicate
    finally:
        await nc.close()

    page = await fleet.attempts.query(agent="wire agent.1", min_seq={"FLEET_ATTEMPTS": token["FLEET_ATTEMPTS"]})
    assert [(a.action, a.outcome) for a in page.items] == [("probe>*", "success")]
    snap = await fleet.snapshots.latest("wire agent.1", "host.example.com",
                                        min_seq={"FLEET_SNAPSHOTS": token["FLEET_SNAPSHOTS"]})
    assert snap == {"cpu": 2, "has_diff": False, "diff_fields": []}
    entry = await fleet.state.entry("actor", "k.1 é", context=context, binding={"binding_id": "bind.1"},
                                    min_seq={"FLEET_STATE": token["FLEET_STATE"]})
    assert entry.found and entry.value == {"n": 1}
    runs_seq = {"FLEET_RUNS": token["FLEET_RUNS"]}
    listed = await fleet.runs.list(runner_id="r", min_seq=runs_seq)
    assert [(r.run_id, r.status) for r in listed.items] == [("wire run.1", "queued")]
    run_events = await fleet.runs.events("wire run.1", min_seq=runs_seq)
    assert [(e.sequence, e.type, e.data) for e in run_events.items] == [(0, "log", {"line": "hi"})]
    runtime = await fleet.runtimes.get("rt.1", min_seq={"FLEET_RUNTIMES": token["FLEET_RUNTIMES"]})
    assert runtime is not None and (runtime.capabilities, runtime.active_runs) == ({"x": 1}, 1)
    proc_seq = {"FLEET_PROCESSORS": token["FLEET_PROCESSORS"]}
    rows = await fleet.processors.get_states_for_session_files("ingest.v1", ["al ice/a b.jsonl"], min_seq=proc_seq)
    assert rows["al ice/a b.jsonl"]["items_extracted"] == 3
    (proc_run,) = (await fleet.processors.runs("ingest.v1", run_id="pr.1", min_seq=proc_seq)).items
    assert (proc_run.scanned, proc_run.errors, proc_run.ok) == (2, 1, False)
    lock = await fleet.processors.lock("ingest.v1", min_seq=proc_seq)
    assert (lock.holder, lock.held) == ("me", True)
    rejects = await fleet.rejects(min_seq=token)
    assert rejects.items == []


async def test_a_payload_on_a_subject_escaped_wrongly_is_a_reject(
        fleet: Fleet, server: Server, settings: FleetSettings) -> None:
    """The escaping is exact: the projector compares the subject with the payload's, so a
    client that escapes by another rule (here: not at all, a dot splitting a token) is refused."""
    payload = {"type": "attempt.recorded", "id": _id(), "ts": TS, "agent": "a.b", "action": "x",
               "outcome": "success", "elapsed_s": 0.0}
    nc = await nats.connect(settings.nats_url)
    try:
        ack = await nc.jetstream().publish("fleet.attempt.a_b.x", msgspec.json.encode(payload),
                                           headers={"Nats-Msg-Id": payload["id"]})
    finally:
        await nc.close()
    rejects = await fleet.rejects(min_seq={"FLEET_ATTEMPTS": ack.seq})
    assert [r.reason for r in rejects.items] == ["subject mismatch: the payload belongs on 'fleet.attempt.a%2Eb.x'"]
