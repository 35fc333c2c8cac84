"""Bad input, proven, for the snapshots, state, runtimes, processors and runs families:
hypothesis-drawn garbage interleaved with valid events on a raw nats-py client
(tests/bad_input_cases.py says what is drawn and checked; attempts has its own file)."""

from __future__ import annotations

import msgspec
import pytest
from fleetlog.schemas import (
    AttemptRecorded,
    HostSnapshot,
    ProcessorRunRecorded,
    RunCreated,
    RunState,
    RuntimeRegistered,
    StateSet,
    encode_event,
    new_event_id,
    now_iso,
)
from fleetlog.schemas.state import StateContext, scope_key_for
from fleetlog.services.node.server import Server

from fleetlog import Fleet

from .bad_input_cases import Family, run_family


def _snapshot(i: int, ts: str) -> msgspec.Struct:
    return HostSnapshot(id=new_event_id(), ts=ts, host=f"h{i % 3}", agent=f"a{i % 5}", data={"i": i, "up": True})


def _state(i: int, ts: str) -> msgspec.Struct:
    context = StateContext(runner_id="r", conversation_id=f"c{i % 4}")
    scope_key = scope_key_for("conversation", context, "unknown_binding")
    assert scope_key is not None
    return StateSet(id=new_event_id(), ts=ts, scope_key=scope_key, key=f"k{i}", value={"i": i}, context=context)


def _runtime(i: int, ts: str) -> msgspec.Struct:
    return RuntimeRegistered(id=new_event_id(), ts=ts, runtime_id=f"rt{i}", metadata={"i": i})


def _proc_run(i: int, ts: str) -> msgspec.Struct:
    return ProcessorRunRecorded(id=new_event_id(), ts=ts, processor=f"p{i % 3}", run_id=f"run{i}", scanned=i)


def _run(i: int, ts: str) -> msgspec.Struct:
    return RunCreated(id=new_event_id(), ts=ts, state=RunState(run_id=f"bad-run-{i}", runner_id="r", status="queued",
                                                               created_at=1_700_000_000 + i))


FAMILIES = [
    Family(projection="snapshots", stream="FLEET_SNAPSHOTS", table="snapshots", key_sql="CAST(id AS VARCHAR)",
           valid=_snapshot, key=lambda e: str(e.id), strings=("host", "agent"), free="data"),  # type: ignore[attr-defined]
    Family(projection="state", stream="FLEET_STATE", table="state", key_sql="scope_key || '/' || key",
           valid=_state, key=lambda e: f"{e.scope_key}/{e.key}",  # type: ignore[attr-defined]
           strings=("scope_key", "key"), free="value"),
    Family(projection="runtimes", stream="FLEET_RUNTIMES", table="runtimes", key_sql="runtime_id",
           valid=_runtime, key=lambda e: str(e.runtime_id), strings=("runtime_id",), free="metadata"),  # type: ignore[attr-defined]
    Family(projection="processors", stream="FLEET_PROCESSORS", table="proc_runs", key_sql="processor || '/' || run_id",
           valid=_proc_run, key=lambda e: f"{e.processor}/{e.run_id}",  # type: ignore[attr-defined]
           strings=("processor", "run_id"), free="errors_detail"),
    Family(projection="runs", stream="FLEET_RUNS", table="runs", key_sql="run_id",
           valid=_run, key=lambda e: str(e.state.run_id), strings=("state",), free="state"),  # type: ignore[attr-defined]
]


@pytest.mark.parametrize("family", FAMILIES, ids=[f.projection for f in FAMILIES])
async def test_family_survives_generated_bad_input(fleet: Fleet, server: Server, family: Family) -> None:
    def foreign(i: int) -> tuple[str, bytes]:
        """An attempt (valid, another family's) on a subject of this family's no valid event uses:
        on a compacted stream (one message per subject) it would replace that event, as any
        later write to one's own subject does."""
        event = family.valid(1_000_000 + i, now_iso())
        other = AttemptRecorded(id=new_event_id(), ts=now_iso(), agent="a", action="b", outcome="ok", elapsed_s=1)
        return event.subject(), encode_event(other)  # type: ignore[attr-defined]

    tried = await run_family(fleet, family, n_examples=30, ts=now_iso(), foreign=foreign)
    assert sum(tried.values()) > 100 and tried.get("valid", 0) >= 30
