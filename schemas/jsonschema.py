"""JSON Schema export of every event type, for agents written in other languages.

Besides the payload schema, each event type's export carries what a client needs to
put the event on the wire (docs/wire.md explains them):

* `x-fleetlog-subject`: a template such as `fleet.attempt.{agent}.{action}`. Each
  `{placeholder}` names the payload field it comes from (a `/`-separated path into nested
  objects, `{state/run_id}`, so that a template splits into tokens on `.`), optionally with a
  transform after `|` (`{scope_key|hash}`); the value is then escaped by `x-fleetlog-escaping`.
  `x-fleetlog-placeholders` spells out each placeholder.
* `x-fleetlog-stream`, `x-fleetlog-limits` (size, dedup window, retention) and
  `x-fleetlog-publish` (fire-and-forget, guarded, or fleetlog's own).

The templates are derived from the event classes' own `subject()` (never kept by
hand): `subject()` runs on a sample event whose every field holds a distinct
sentinel, each subject token is traced back to the one field (and transform) that
produces it, and the template is checked on a second sample with other sentinels.
A subject built some other way fails the export instead of exporting a wrong template.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgspec
import msgspec.inspect as mi

from . import subjects
from ._base import Event
from .events import EVENT_TYPES, AnyEvent
from .state import key_hash
from .streams import by_name, stream_for_subject

__all__ = [
    "DEFAULT_MAX_EVENT_BYTES",
    "ESCAPING",
    "HEADERS",
    "PUBLISH",
    "TRANSFORMS",
    "Placeholder",
    "event_schemas",
    "export_schemas",
    "subject_template",
]

# FleetSettings.max_event_bytes' default (FLEETLOG_MAX_EVENT_BYTES); the schemas layer cannot
# import the settings, so tests/test_wire.py holds the two equal.
DEFAULT_MAX_EVENT_BYTES: Final = 512 * 1024

# transform name -> (function of the field's value, what it does, in words)
TRANSFORMS: Final[dict[str, tuple[Callable[[str], str], str]]] = {
    "scope": (lambda v: v.split(":", 1)[0], "the text before the first ':'"),
    "hash": (lambda v: v.rsplit(":", 1)[1], "the text after the last ':'"),
    "sha256_40": (key_hash, "the first 40 lowercase hex digits of the SHA-256 of the value's UTF-8 bytes"),
}

ESCAPING: Final = (
    "Each placeholder's value (integers as decimal) becomes one subject token, escaped character by "
    "character: printable ASCII (0x21-0x7E) other than '.', '*', '>' and '%' stays; a non-ASCII character "
    "stays unless its Unicode general category is Other (Cc, Cf, Cs, Co, Cn) or Separator (Zs, Zl, Zp); "
    "every other character becomes '%XX' per UTF-8 byte, XX two uppercase hex digits "
    "(space -> %20, '.' -> %2E, '%' -> %25, TAB -> %09, U+00A0 -> %C2%A0). An empty value is refused."
)

HEADERS: Final[dict[str, str]] = {
    "Nats-Msg-Id": "always: the event's `id`. JetStream drops a second message with the same id inside the "
                   "stream's duplicate window; the views drop it at any distance.",
    "Nats-Expected-Last-Subject-Sequence": "guarded publishes: the stream sequence of the subject's last "
                                           "message as read (direct get), 0 when the subject is empty. "
                                           "JetStream refuses with err_code 10071 when another writer got "
                                           "there first: read again and retry.",
    "Nats-Expected-Last-Subject-Sequence-Subject": "optional, with the header above: check the last sequence "
                                                   "of this other subject (wildcards allowed) instead of the "
                                                   "message's own.",
}

# How a client other than fleetlog's may publish each event type (docs/wire.md, "Publish modes").
# Kept beside the templates; tests/test_wire.py checks it names every event type exactly once.
PUBLISH: Final[dict[str, tuple[str, str]]] = {
    "attempt.recorded": ("fire-and-forget", "acked publish with Nats-Msg-Id"),
    "attempt.purged": ("fleetlog", "request `fleetlog.attempts.purge` {\"days\": N} of the query service; it "
                                   "publishes the purge"),
    **{tag: ("guarded", "Nats-Expected-Last-Subject-Sequence = the last seq of `fleet.run.<run_id>.state` "
                        "(0 to create); the payload carries the run's whole state")
       for tag in ("run.created", "run.claimed", "run.renewed", "run.released", "run.lease_expired",
                   "run.finalized", "run.cancel_requested")},
    "run.event": ("fire-and-forget", "first write per (run_id, sequence) wins; while the run is claimed carry "
                                     "the claim's `fence` (else a reject), or publish guarded with "
                                     "...-Subject = `fleet.run.<run_id>.state`"),
    "runtime.registered": ("fire-and-forget", "acked publish with Nats-Msg-Id"),
    "runtime.heartbeat": ("fire-and-forget", "`metadata` is the runtime's whole metadata after the merge"),
    "runtime.status": ("guarded", "guarded on `fleet.runtime.<runtime_id>.*` (...-Subject, a wildcard) so a "
                                  "newer heartbeat wins; fleetlog's stale marker publishes it"),
    "state.set": ("guarded", "Nats-Expected-Last-Subject-Sequence = the key subject's last seq (0: new key); "
                             "carry the first write's `created_at`"),
    "state.deleted": ("guarded", "as state.set"),
    "snapshot.taken": ("guarded", "Nats-Expected-Last-Subject-Sequence = the subject's last seq (0: the first); "
                                  "has_diff/diff_fields = compute_diff_fields(that message's data, data)"),
    "snapshot.diff": ("fire-and-forget", "the taker's, once after its snapshot is stored, only when diff_fields is "
                                         "non-empty; changes = {field: {from, to}}"),
    "proc.session": ("fire-and-forget", "or fenced under the processor lock: ...-Subject = `fleet.proc.<p>.lock`, "
                                        "sequence = the lock subject's last seq (the runner's marks)"),
    "proc.session.deleted": ("fire-and-forget", "the tombstone of one (processor, session file) row"),
    "proc.run": ("fire-and-forget", "one audit record per run, published when the run ends"),
    "proc.lock": ("guarded", "on `fleet.proc.<processor>.lock`: the acquired message's seq is the fence"),
}


@dataclass(frozen=True)
class Placeholder:
    """One `{...}` of a subject template: the payload field (`/`-separated path) and an optional transform."""

    field: str
    transform: str | None = None

    @property
    def name(self) -> str:
        return self.field if self.transform is None else f"{self.field}|{self.transform}"

    def rule(self) -> str:
        what = "its value" if self.transform is None else TRANSFORMS[self.transform][1]
        return f"payload field `{self.field}`: {what}, escaped"


def subject_template(cls: type[Event]) -> tuple[str, list[Placeholder]]:
    """The subject template of event class `cls` and its placeholders, derived from `cls.subject()`."""
    sentinels = _sentinels(cls, 0)
    tokens = cls(**_build(cls, sentinels)).subject().split(".")
    parts: list[str] = []
    used: list[Placeholder] = []
    for token in tokens:
        found = [p for p in _candidates(sentinels) if _render_one(p, sentinels) == token]
        if len(found) > 1:
            raise RuntimeError(f"{cls.__name__}: subject token {token!r} matches {[p.name for p in found]}")
        if found:
            parts.append("{" + found[0].name + "}")
            if found[0] not in used:
                used.append(found[0])
        else:
            parts.append(token)  # a constant of the class (`fleet`, `registration`, ...)
    template = ".".join(parts)
    other = _sentinels(cls, 500)
    rendered = ".".join(_render_one(_parse(p), other) if p.startswith("{") else p for p in parts)
    actual = cls(**_build(cls, other)).subject()
    if rendered != actual:
        raise RuntimeError(f"{cls.__name__}: template {template!r} gives {rendered!r}, subject() gives {actual!r}")
    return template, used


def event_schemas(max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> dict[str, dict[str, Any]]:
    """`{event type tag: JSON Schema}` plus `"fleetlog.event"` for the whole union."""
    out: dict[str, dict[str, Any]] = {}
    for cls in EVENT_TYPES:
        tag = cls.__struct_config__.tag
        assert isinstance(tag, str) and issubclass(cls, Event)
        template, placeholders = subject_template(cls)
        spec = by_name(cls.STREAM)
        sample = cls(**_build(cls, _sentinels(cls, 0))).subject()
        matched = stream_for_subject(sample)
        if matched is None or matched.name != spec.name:
            raise RuntimeError(f"{cls.__name__}: {sample!r} is not captured by its stream {spec.name}")
        mode, how = PUBLISH[tag]
        schema = msgspec.json.schema(cls)
        schema["x-fleetlog-subject"] = template
        schema["x-fleetlog-placeholders"] = {p.name: p.rule() for p in placeholders}
        schema["x-fleetlog-stream"] = spec.name
        schema["x-fleetlog-publish"] = {"mode": mode, "how": how}
        schema["x-fleetlog-limits"] = {
            "max_event_bytes": max_event_bytes,  # larger payloads become rejects ("oversize")
            "duplicate_window_s": spec.duplicate_window_s,
            "max_age_s": spec.max_age_s,
            "max_msgs_per_subject": spec.max_msgs_per_subject,
        }
        out[tag] = schema
    union = msgspec.json.schema(AnyEvent)
    union["x-fleetlog-escaping"] = ESCAPING
    union["x-fleetlog-transforms"] = {name: words for name, (_, words) in TRANSFORMS.items()}
    union["x-fleetlog-headers"] = HEADERS
    out["fleetlog.event"] = union
    return out


def export_schemas(directory: str | Path, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> list[Path]:
    """Write one `<type>.schema.json` per event type (and the union); return the paths."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for tag, schema in sorted(event_schemas(max_event_bytes).items()):
        path = target / f"{tag}.schema.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        written.append(path)
    return written


# -- deriving a template: sentinels per field, traced back from the subject tokens --------------

def _sentinels(cls: type[Event], offset: int) -> dict[str, str | int]:
    """A distinct value for every string and integer field (`/`-separated paths into nested Structs).

    A string sentinel is shaped like a scope key (`f<n>:v2:<64 hex>`) so that every transform
    applies to it and gives a value no other field's sentinel gives."""
    out: dict[str, str | int] = {}

    def walk(info: mi.StructType, prefix: str) -> None:
        for f in info.fields:
            path = prefix + f.name
            kinds = f.type.types if isinstance(f.type, mi.UnionType) else (f.type,)
            n = offset + len(out) + 1
            if any(isinstance(k, mi.StrType) for k in kinds):
                out[path] = f"f{n}:v2:{n:064x}"
            elif any(isinstance(k, mi.IntType) for k in kinds):
                out[path] = 7_000_000 + n
            for k in kinds:
                if isinstance(k, mi.StructType):
                    walk(k, path + "/")

    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    walk(info, "")
    return out


def _build(cls: type[msgspec.Struct], sentinels: dict[str, str | int], prefix: str = "") -> dict[str, Any]:
    """Constructor keywords: sentinels where there are some, nested Structs built the same way.

    Struct constructors do not validate, so fields of other kinds may keep a placeholder value."""
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    kwargs: dict[str, Any] = {}
    for f in info.fields:
        path = prefix + f.name
        kinds = f.type.types if isinstance(f.type, mi.UnionType) else (f.type,)
        nested = [k for k in kinds if isinstance(k, mi.StructType)]
        if path in sentinels:
            kwargs[f.name] = sentinels[path]
        elif nested:
            kwargs[f.name] = nested[0].cls(**_build(nested[0].cls, sentinels, path + "/"))
        elif f.required:
            kwargs[f.name] = None
    return kwargs


def _candidates(sentinels: dict[str, str | int]) -> list[Placeholder]:
    out = []
    for path, value in sentinels.items():
        out.append(Placeholder(path))
        if isinstance(value, str):
            out.extend(Placeholder(path, t) for t in TRANSFORMS)
    return out


def _render_one(p: Placeholder, values: dict[str, str | int]) -> str:
    value = values[p.field]
    text = str(value) if p.transform is None else TRANSFORMS[p.transform][0](str(value))
    return subjects.escape_token(text)


def _parse(part: str) -> Placeholder:
    field, _, transform = part[1:-1].partition("|")
    return Placeholder(field, transform or None)
