"""fleetlog's event contract: msgspec Structs in one tagged union, subjects, streams."""

from . import subjects
from ._base import Event, new_event_id, now_iso, parse_ts
from .attempts import CANONICAL_OUTCOMES, AttemptRecorded, AttemptsPurged
from .events import EVENT_TYPES, AnyEvent, decode_event, encode_event, event_decoder
from .jsonschema import event_schemas, export_schemas
from .processors import (
    ProcessorLockChanged,
    ProcessorRunRecorded,
    ProcessorSessionDeleted,
    ProcessorSessionMarked,
)
from .runs import (
    RUN_STATUSES,
    TERMINAL_RUN_STATUSES,
    RunCancelRequested,
    RunClaimed,
    RunCreated,
    RunEventAppended,
    RunFinalized,
    RunLeaseExpired,
    RunLifecycle,
    RunReleased,
    RunRenewed,
    RunState,
)
from .runtimes import RuntimeHeartbeat, RuntimeRegistered, RuntimeStatusChanged
from .snapshots import HostSnapshot, SnapshotDiff
from .state import STATE_SCOPES, StateDeleted, StateSet
from .streams import STREAMS, StreamSpec, stream_for_subject

__all__ = [
    "CANONICAL_OUTCOMES",
    "EVENT_TYPES",
    "RUN_STATUSES",
    "STATE_SCOPES",
    "STREAMS",
    "TERMINAL_RUN_STATUSES",
    "AnyEvent",
    "AttemptRecorded",
    "AttemptsPurged",
    "Event",
    "HostSnapshot",
    "ProcessorLockChanged",
    "ProcessorRunRecorded",
    "ProcessorSessionDeleted",
    "ProcessorSessionMarked",
    "RunCancelRequested",
    "RunClaimed",
    "RunCreated",
    "RunEventAppended",
    "RunFinalized",
    "RunLeaseExpired",
    "RunLifecycle",
    "RunReleased",
    "RunRenewed",
    "RunState",
    "RuntimeHeartbeat",
    "RuntimeRegistered",
    "RuntimeStatusChanged",
    "SnapshotDiff",
    "StateDeleted",
    "StateSet",
    "StreamSpec",
    "decode_event",
    "encode_event",
    "event_decoder",
    "event_schemas",
    "export_schemas",
    "new_event_id",
    "now_iso",
    "parse_ts",
    "stream_for_subject",
    "subjects",
]
