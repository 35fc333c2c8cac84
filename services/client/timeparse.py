"""`since` values: a datetime, an ISO-8601 string, or relative `<number><s|m|h|d>`."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from fleetlog.schemas import parse_ts
from fleetlog.services.backbone.errors import FleetValidationError

__all__ = ["parse_since"]

_RELATIVE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)([smhd])$", re.IGNORECASE)
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_since(value: datetime | str | None, now: datetime | None = None) -> str | None:
    """Absolute UTC ISO-8601 time for `since`, or None. Raises FleetValidationError naming `since`."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC).isoformat()
    if not isinstance(value, str):
        raise FleetValidationError("since", f"must be a datetime, ISO-8601 text or <number><s|m|h|d>, "
                                            f"got {type(value).__name__}")
    text = value.strip()
    match = _RELATIVE.match(text)
    if match:
        seconds = float(match.group(1)) * _UNIT_S[match.group(2).lower()]
        return ((now or datetime.now(UTC)) - timedelta(seconds=seconds)).isoformat()
    try:
        return parse_ts(text).isoformat()
    except ValueError:
        raise FleetValidationError(
            "since", f"{value!r} is neither ISO-8601 nor a relative time like 24h, 90m, 1.5d"
        ) from None
