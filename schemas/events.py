"""The one tagged union of every fleetlog event, and its one reusable decoder."""

from __future__ import annotations

from typing import Final

import msgspec

from .attempts import AttemptRecorded, AttemptsPurged
from .processors import (
    ProcessorLockChanged,
    ProcessorRunRecorded,
    ProcessorSessionDeleted,
    ProcessorSessionMarked,
)
from .runs import (
    RunCancelRequested,
    RunClaimed,
    RunCreated,
    RunEventAppended,
    RunFinalized,
    RunLeaseExpired,
    RunReleased,
    RunRenewed,
)
from .runtimes import RuntimeHeartbeat, RuntimeRegistered, RuntimeStatusChanged
from .snapshots import HostSnapshot, SnapshotDiff
from .state import StateDeleted, StateSet

__all__ = ["EVENT_TYPES", "AnyEvent", "decode_event", "encode_event", "event_decoder"]

AnyEvent = (
    AttemptRecorded
    | AttemptsPurged
    | RunCreated
    | RunClaimed
    | RunRenewed
    | RunReleased
    | RunLeaseExpired
    | RunFinalized
    | RunCancelRequested
    | RunEventAppended
    | RuntimeRegistered
    | RuntimeHeartbeat
    | RuntimeStatusChanged
    | StateSet
    | StateDeleted
    | HostSnapshot
    | SnapshotDiff
    | ProcessorSessionMarked
    | ProcessorSessionDeleted
    | ProcessorRunRecorded
    | ProcessorLockChanged
)

EVENT_TYPES: Final[tuple[type[msgspec.Struct], ...]] = AnyEvent.__args__

event_decoder: Final[msgspec.json.Decoder[AnyEvent]] = msgspec.json.Decoder(AnyEvent)
_encoder: Final = msgspec.json.Encoder()


def decode_event(data: bytes | str) -> AnyEvent:
    """Decode and validate one event; raises msgspec.ValidationError / DecodeError naming the field."""
    event: AnyEvent = event_decoder.decode(data)
    return event


def encode_event(event: msgspec.Struct) -> bytes:
    return _encoder.encode(event)
