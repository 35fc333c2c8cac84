"""Bad input, proven, for attempts: hypothesis-drawn garbage interleaved with valid events
on a raw nats-py client (tests/bad_input_cases.py says what is drawn and checked)."""

from __future__ import annotations

import msgspec
from fleetlog.schemas import AttemptRecorded, RunCreated, RunState, encode_event, new_event_id, now_iso
from fleetlog.services.node.server import Server

from fleetlog import Fleet

from .bad_input_cases import Family, run_family


def _attempt(i: int, ts: str) -> msgspec.Struct:
    return AttemptRecorded(id=new_event_id(), ts=ts, agent=f"bad-in-{i % 4}", action=f"act{i % 3}",
                           outcome="success", elapsed_s=i / 10, extras={"i": i})


ATTEMPTS = Family(
    projection="attempts", stream="FLEET_ATTEMPTS", table="attempts", key_sql="CAST(id AS VARCHAR)",
    valid=_attempt, key=lambda e: str(e.id), strings=("agent", "action", "outcome"),  # type: ignore[attr-defined]
    numbers=("elapsed_s",), free="extras", subject_token=2, dup_field="outcome", dup_sql="outcome",
)


def _foreign(i: int) -> tuple[str, bytes]:
    """A run's creation on an attempt subject: a valid event of another family."""
    run = RunCreated(id=new_event_id(), ts=now_iso(),
                     state=RunState(run_id=f"r{i}", runner_id="x", status="queued", created_at=1))
    return f"fleet.attempt.bad-in-0.act{i % 3}", encode_event(run)


async def test_attempts_survive_generated_bad_input(fleet: Fleet, server: Server) -> None:
    tried = await run_family(fleet, ATTEMPTS, n_examples=30, ts=now_iso(), foreign=_foreign)
    assert sum(tried.values()) > 100 and tried.get("valid", 0) >= 30
