"""JSON Schema export of every event type, for agents written in other languages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

from .events import EVENT_TYPES, AnyEvent

__all__ = ["event_schemas", "export_schemas"]


def event_schemas() -> dict[str, dict[str, Any]]:
    """`{event type tag: JSON Schema}` plus `"fleetlog.event"` for the whole union."""
    out: dict[str, dict[str, Any]] = {}
    for cls in EVENT_TYPES:
        tag = cls.__struct_config__.tag
        assert isinstance(tag, str)
        out[tag] = msgspec.json.schema(cls)
    out["fleetlog.event"] = msgspec.json.schema(AnyEvent)
    return out


def export_schemas(directory: str | Path) -> list[Path]:
    """Write one `<type>.schema.json` per event type (and the union); return the paths."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for tag, schema in sorted(event_schemas().items()):
        path = target / f"{tag}.schema.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        written.append(path)
    return written
