"""A run's result events: `append_event` (awaited, fenced by JetStream), `emit_event`
(fire-and-forget, fenced by the view) and `append_audit_event` (host events at max + 1).

Each (run, sequence) is its own subject, `fleet.run.<run_id>.event.<sequence>`: the first
write stays the stored one forever and a direct get finds it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
from fleetlog.schemas import RunEventAppended, RunState, encode_event, new_event_id, now_iso, parse_ts, subjects
from fleetlog.schemas.runs import MaxSequence, MaxSequenceQuery, RunEventView
from fleetlog.services.backbone.errors import FleetValidationError
from fleetlog.services.backbone.guarded import Guarded, StoredMsg, WrongLastSequence
from fleetlog.services.client.runs import rules
from fleetlog.services.writepath.publisher import Receipt

if TYPE_CHECKING:
    from fleetlog.services.client.seam import FleetClient

__all__ = ["ResultEvents"]

STREAM = "FLEET_RUNS"
MAX_RETRIES = 64
_run_event = msgspec.json.Decoder(RunEventAppended)
_Refs = list[Any] | None


def _text(field: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise FleetValidationError(field, f"must be a non-empty string, got {value!r}")
    return value


def _dict(field: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise FleetValidationError(field, f"must be a dict, got {type(value).__name__}")
    return value


class ResultEvents:
    """Mixed into RunsAPI: the result-event half of `fleet.runs`."""

    _fleet: FleetClient
    _seen: int

    async def _guarded(self) -> Guarded:
        raise NotImplementedError

    async def _read(self, g: Guarded, run_id: str) -> tuple[RunState, int] | None:
        raise NotImplementedError

    def _note(self, seq: int) -> None:
        raise NotImplementedError

    def _event(
        self, run_id: str, sequence: int, type: str, data: Any, usage: Any, source: str, artifact_refs: Any,
        metadata: Any, fence: int | None,
    ) -> RunEventAppended:
        _text("run_id", run_id)
        if isinstance(sequence, bool) or not isinstance(sequence, int) or sequence < 0:
            raise FleetValidationError("sequence", f"must be an integer >= 0, got {sequence!r}")
        _text("type", type)
        if usage is not None and not isinstance(usage, dict):
            raise FleetValidationError("usage", f"must be a dict or None, got {type_name(usage)}")
        if artifact_refs is not None and not isinstance(artifact_refs, list):
            raise FleetValidationError("artifact_refs", f"must be a list, got {type_name(artifact_refs)}")
        return RunEventAppended(
            id=new_event_id(), ts=now_iso(), run_id=run_id, sequence=sequence, event_type=type,
            data=_dict("data", data), usage=usage, source=_text("source", source),
            artifact_refs=list(artifact_refs or []), metadata=_dict("metadata", metadata), fence=fence,
        )

    async def append_event(
        self, run_id: str, sequence: int, type: str, data: dict[str, Any] | None = None,
        usage: dict[str, Any] | None = None, source: str = "runner", artifact_refs: _Refs = None,
        metadata: dict[str, Any] | None = None, *, claim_token: str | None = None, fence: int | None = None,
    ) -> RunEventView | None:
        """Store a result event; idempotent on (run_id, sequence): a duplicate returns the stored one.

        While the run is claimed only its holder may append. The publish is guarded by the
        run's lifecycle sequence, so a claim that changes hands meanwhile refuses it.
        None for an unknown run.
        """
        draft = self._event(run_id, sequence, type, data, usage, source, artifact_refs, metadata, None)
        g = await self._guarded()
        state_subject = subjects.run_state(run_id)
        for _ in range(MAX_RETRIES):
            current = await self._read(g, run_id)
            if current is None:
                return None
            state, state_seq = current
            if source != "host":
                rules.check_holder(state, claim_token, fence, None, "append to")
            fence_now = state.fence if rules.held(state) else None
            event = msgspec.structs.replace(draft, id=new_event_id(), fence=fence_now)
            try:
                _, seq, _ = await g.publish(
                    event.subject(), encode_event(event), msg_id=event.id,
                    expected_last_seq=state_seq, expected_subject=state_subject,
                )
            except WrongLastSequence:
                continue  # the run's lifecycle moved: re-check who holds it
            self._note(seq)
            first = await g.first(STREAM, event.subject())
            if first is not None and first.seq != seq:
                return _event_view(first)  # (run_id, sequence) was taken: the first write stands
            return _event_view(StoredMsg(seq, event.subject(), encode_event(event)))
        raise TimeoutError(f"append_event {run_id!r}: lost {MAX_RETRIES} races in a row")

    def emit_event(
        self, run_id: str, sequence: int, type: str, data: dict[str, Any] | None = None,
        usage: dict[str, Any] | None = None, source: str = "runner", artifact_refs: _Refs = None,
        metadata: dict[str, Any] | None = None, *, fence: int | None = None,
    ) -> Receipt:
        """Fire-and-forget `append_event` for a holder's hot path: never blocks.

        Pass the claim's `fence`: the view refuses (to rejects, with the reason) a runner
        event whose fence is not the run's current claim at its stream position.
        """
        return self._fleet.emit(self._event(run_id, sequence, type, data, usage, source, artifact_refs,
                                            metadata, fence))

    async def append_audit_event(
        self, run_id: str, type: str, data: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None,
    ) -> RunEventView | None:
        """A host event at sequence max + 1 (1 for a run without events, as in the store); concurrent
        appends never share a sequence. None if no such run."""
        g = await self._guarded()
        if await self._read(g, run_id) is None:
            return None
        last = await g.last(STREAM, subjects.run_events(run_id))
        hint = -1
        if last is not None:
            try:
                hint = _run_event.decode(last.data).sequence
            except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
                pass  # not a result event (a server's reply stored there): the view's max decides
            token = {STREAM: max(last.seq, self._seen)}
            answer = await self._fleet.request(
                "fleetlog.runs.max_sequence", MaxSequenceQuery(run_id=run_id, min_seq=token), MaxSequence
            )
            hint = max(hint, answer.sequence if answer.sequence is not None else -1)
        sequence = max(hint, 0) + 1
        for _ in range(MAX_RETRIES * 16):
            event = self._event(run_id, sequence, type, data, None, "host", None, metadata, None)
            try:
                _, seq, _ = await g.publish(event.subject(), encode_event(event), msg_id=event.id, expected_last_seq=0)
            except WrongLastSequence:
                sequence += 1  # taken meanwhile: the next one
                continue
            self._note(seq)
            return _event_view(StoredMsg(seq, event.subject(), encode_event(event)))
        raise TimeoutError(f"append_audit_event {run_id!r}: no free sequence found")


def type_name(value: Any) -> str:
    return type(value).__name__


def _event_view(msg: StoredMsg) -> RunEventView:
    e = _run_event.decode(msg.data)
    return RunEventView(
        id=msg.seq, run_id=e.run_id, sequence=e.sequence, type=e.event_type, data=e.data, usage=e.usage,
        created_at=int(parse_ts(e.ts).timestamp()), source=e.source, artifact_refs=e.artifact_refs,
        metadata=e.metadata, fence=e.fence,
    )
