"""Pane snapshot normalisation, exactly as the attempt store this replaces did it."""

from __future__ import annotations

import json
from typing import Any

from fleetlog.services.backbone.errors import FleetValidationError

__all__ = ["normalize_pane"]


def normalize_pane(field: str, value: Any, max_chars: int) -> dict[str, Any] | None:
    """None → None; str s → {"format": "full", "text": s}; a dict with "format" → kept,
    its text tail-truncated; any other JSON value → {"format": "json-dump", "text": <its JSON>}.

    Texts keep their LAST max_chars characters and get "truncated": true when cut;
    the json-dump form is cut the same way but never says so (kept as it was).
    """
    if value is None:
        return None
    if isinstance(value, str):
        return _text("full", value, max_chars)
    if isinstance(value, dict) and "format" in value:
        out = dict(value)
        text = out.get("text")
        if isinstance(text, str) and len(text) > max_chars:
            out["text"] = text[-max_chars:]
            out["truncated"] = True
        return out
    try:
        dumped = json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise FleetValidationError(field, f"must be a string, a dict with 'format', or a JSON value ({exc})") from None
    return {"format": "json-dump", "text": dumped[-max_chars:]}


def _text(fmt: str, text: str, max_chars: int) -> dict[str, Any]:
    if len(text) > max_chars:
        return {"format": fmt, "text": text[-max_chars:], "truncated": True}
    return {"format": fmt, "text": text}
