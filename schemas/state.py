"""Scoped agent state: set and delete (tombstone) on one compacted subject per key."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Final

import msgspec

from . import subjects
from ._base import Event

__all__ = ["STATE_SCOPES", "StateDeleted", "StateEvent", "StateSet"]

STATE_SCOPES: Final = ("conversation", "actor", "subject", "runner")

ScopeKey = Annotated[str, msgspec.Meta(pattern=r"^(conversation|actor|subject|runner):v2:[0-9a-f]{64}$")]
StateKey = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]


class StateEvent(Event, kw_only=True, frozen=True):
    STREAM: ClassVar[str] = "FLEET_STATE"

    scope_key: ScopeKey
    key: StateKey
    binding_identity: str = "unknown_binding"

    @property
    def scope(self) -> str:
        return self.scope_key.split(":", 1)[0]

    def subject(self) -> str:
        import hashlib

        key_hash = hashlib.sha256(self.key.encode("utf-8")).hexdigest()[:40]
        return subjects.state(self.scope, self.scope_key.rsplit(":", 1)[1], key_hash)


class StateSet(StateEvent, tag="state.set", kw_only=True, frozen=True):
    value: Any


class StateDeleted(StateEvent, tag="state.deleted", kw_only=True, frozen=True):
    pass
