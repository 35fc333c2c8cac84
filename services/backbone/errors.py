"""The exceptions a fleetlog user can see."""

from __future__ import annotations

from typing import Any

__all__ = ["FleetError", "FleetRefused", "FleetUnavailable", "FleetValidationError", "QueryError", "StaleError",
           "StaleHolderError", "check_identity"]


class FleetError(Exception):
    """Base of fleetlog's own errors."""


class FleetValidationError(FleetError, ValueError):
    """Bad input at the call: names the field and the rule. Nothing was published."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


class FleetRefused(FleetError, ValueError):
    """The rules refuse the change in the target's current state (a terminal run's status, a
    finished processor run's): nothing was written. A ValueError, as these were before; its own
    class so that callers (the CLI's exit codes) can tell a refusal from bad input."""


class PermissionDenied(FleetRefused, PermissionError):
    """The broker refused this identity a publish or request (`fleetlog up --secure`): the
    subject is outside its role's permissions (docs/security.md)."""

    def __init__(self, subject: str) -> None:
        self.subject = subject
        super().__init__(f"permission denied: this identity may not publish to {subject!r}")


class StaleError(FleetError, TimeoutError):
    """The view had not folded the requested position (min_seq) within the bounded wait."""


class QueryError(FleetError):
    """The query service answered with an error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class FleetUnavailable(FleetError, ConnectionError):
    """No query service answered (is `fleetlog up` / `fleetlog serve` running?)."""


class StaleHolderError(FleetError, PermissionError):
    """A write to a claimed run by someone who does not (or no longer) hold its claim."""


def check_identity(field: str, value: Any) -> str:
    """`value` if it can be an identity (a subject token: 1-256 characters), else FleetValidationError."""
    if not isinstance(value, str) or not value:
        raise FleetValidationError(field, f"must be a non-empty string, got {value!r}")
    if len(value) > 256:
        raise FleetValidationError(field, f"must be at most 256 characters, got {len(value)}")
    return value
