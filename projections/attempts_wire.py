r"""The attempt log's payloads one at a time: the wire structs, and the per-row path.

A payload is decoded by msgspec into `_Wire`: the attempt's own struct (its fields, rules,
defaults and tag, derived from `AttemptRecorded` so they cannot drift), except that

* a pane must have the client's shape, `{"format": str, "text": <JSON string>[,
  "truncated": bool]}` (services/client/attempts/panes.py), and its text is `msgspec.Raw`: located
  and checked as JSON, never turned into a `str`. The stored pane is
  `{"format":F,"text":T[,"truncated":B]}` with T the text's bytes as they came;
* extras (small) are decoded with the decoder's own type and stored as msgspec writes them
  (decoded in the struct: a separate decode of a `Raw` cost 0.13 µs more per event).

Then the runtime's other rules: the subject (`fleet.attempt.<agent>.<action>`, escaped)
and `ts` (`parse_ts`). `strict_row` does all of that for one payload; the batch path
(attempts_raw) checks the same rules over whole columns and sends here only the rows it
cannot vouch for by those column checks. `_Fast` is `_Wire` with `id` and `ts` as plain
strings: their rules (the UUID pattern, ISO-8601) are checked over the column there.

For what the SDK publishes this stores exactly what the decoder's path stores
(`attempts_table`: typed decode, then msgspec writes each pane). A client that writes a
pane's keys in another order, with whitespace or with escapes msgspec does not write
(`\u00e9`, `\/`) gets the same pane back from every query, but the stored text keeps
its escapes. Which path folds an event depends only on its bytes, so a rebuild stores
what the live view stored, however the stream is batched (unless a whole batch's bulk fold
fails and the decoder's path folds it: docs/architecture.md, the bulk fold path).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec
import pyarrow as pa
from fleetlog.schemas import AttemptRecorded, parse_ts, subjects

__all__ = ["DECODE_ERRORS", "FAST", "POOL", "SCHEMA", "Columns", "Unusual", "encode", "fast", "head",
           "strict_row", "tail"]


class _Pane(msgspec.Struct, forbid_unknown_fields=True, frozen=True, gc=False):
    """The client's pane (services/client/attempts/panes.py), its text located but not parsed."""

    format: str
    text: msgspec.Raw  # a JSON string (checked by `pane_json` or over the column), as it sits in the payload
    truncated: bool | msgspec.UnsetType = msgspec.UNSET


def _wire_struct(name: str, plain: tuple[str, ...]) -> type[msgspec.Struct]:
    """`AttemptRecorded` with the client's pane shape, and the fields in `plain` as plain
    `str`: otherwise the same names, types, rules, defaults and tag (derived, so the two
    cannot drift)."""
    fields: list[tuple[str, Any, Any]] = []
    for f in msgspec.structs.fields(AttemptRecorded):
        if f.name in ("pane_before", "pane_after"):
            fields.append((f.name, _Pane | None, None))
        else:
            type_ = str if f.name in plain else f.type
            default = f.default if f.default_factory is msgspec.NODEFAULT else msgspec.field(
                default_factory=f.default_factory)
            fields.append((f.name, type_, msgspec.NODEFAULT if f.required else default))
    config = AttemptRecorded.__struct_config__
    return msgspec.defstruct(
        name, fields, kw_only=True, tag_field=config.tag_field, tag=config.tag, frozen=True, gc=False
    )


_Wire: Any = _wire_struct("_Wire", ())  # a Struct class built at import: attributes unknown to mypy
# The batch path's struct: the UUID pattern was 0.6 µs of the 1.0 µs decode of a pane-less
# event (Python's `re`, per event); RE2 over the column costs 0.1.
_Fast: Any = _wire_struct("_Fast", ("id", "ts"))
# Decoded alone, a tagged struct takes a payload without `type`; in a union (as the
# decoder's event union does) the tag is required. `_NotAttempt` (a tag no client sends)
# only makes the struct part of a union.
_NotAttempt = msgspec.defstruct("_NotAttempt", [], tag_field="type", tag="\x00", frozen=True, gc=False)
_wire: msgspec.json.Decoder[Any] = msgspec.json.Decoder(_Wire | _NotAttempt)
fast: msgspec.json.Decoder[Any] = msgspec.json.Decoder(_Fast | _NotAttempt)
FAST: Any = _Fast
encode = msgspec.json.Encoder().encode
# What a payload can raise on this path: anything else is a bug, not a row for the decoder.
DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, ValueError, RecursionError)
_TAILS = {msgspec.UNSET: b"}", True: b',"truncated":true}', False: b',"truncated":false}'}
tail = _TAILS.__getitem__


def head(format_: str) -> bytes:
    """A pane's JSON up to its text: `{"format":<format as msgspec writes it>,"text":`."""
    return b'{"format":' + encode(format_) + b',"text":'


# The fold's Arrow buffers (~12 MB a batch with 2 KB panes) come from the system allocator:
# pyarrow's default (mimalloc) hands freed pages back to the kernel at once, so each batch
# page-faulted its buffers in again (table build 10-18 µs per 2 KB event against 3-4).
POOL = pa.system_memory_pool()
SCHEMA = pa.schema([
    ("id", pa.string()), ("seq", pa.int64()), ("ts", pa.string()), ("ts_utc", pa.timestamp("us", tz="UTC")),
    ("agent", pa.string()), ("action", pa.string()), ("outcome", pa.string()), ("elapsed_s", pa.float64()),
    ("pane_before", pa.string()), ("pane_after", pa.string()), ("extras", pa.string()),
])


class Unusual(Exception):
    """A row this path does not vouch for: the decoder judges it."""


def pane_json(pane: _Pane | None) -> bytes | None:
    """The pane's JSON: `{"format":F,"text":`, the text's bytes as they came (copied once,
    never parsed or written again) and `}` (or the `truncated` member and `}`).

    msgspec has checked the text is one valid JSON value while locating it; it must be a
    string (anything else goes to the decoder, which may accept it: a pane is any object).
    """
    if pane is None:
        return None
    text = bytes(pane.text)
    if text[0] != 0x22:  # '"'
        raise Unusual
    return head(pane.format) + text + tail(pane.truncated)


Row = tuple[Any, datetime, bytes | None, bytes | None, bytes]  # decoded, ts parsed, panes' and extras' JSON


def strict_row(payload: memoryview, subject: str) -> Row | None:
    """One payload by every rule, or None: the decoder judges it."""
    try:
        e: Any = _wire.decode(payload)
        if type(e) is not _Wire:
            raise Unusual
        before = pane_json(e.pane_before)
        after = pane_json(e.pane_after)
        extras = encode(e.extras)
        at = parse_ts(e.ts)
    except (*DECODE_ERRORS, Unusual):
        return None
    if subject != subjects.attempt(e.agent, e.action):
        return None
    return e, at, before, after, extras


class Columns:
    """The attempts table's columns, filled row by row (the decoder's path, and the rows the
    batch path's column checks left to `strict_row`)."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.seqs: list[int] = []
        self.ts: list[str] = []
        self.at: list[datetime] = []
        self.agents: list[str] = []
        self.actions: list[str] = []
        self.outcomes: list[str] = []
        self.elapsed: list[float] = []
        self.before: list[bytes | None] = []
        self.after: list[bytes | None] = []
        self.extras: list[bytes] = []

    def add(self, seq: int, e: Any, at: datetime, before: bytes | None, after: bytes | None,
            extras: bytes) -> None:
        """One row (`e` an AttemptRecorded or a `_Wire`): its fields, panes' and extras' JSON."""
        self.ids.append(e.id)
        self.seqs.append(seq)
        self.ts.append(e.ts)
        self.at.append(at)
        self.agents.append(e.agent)
        self.actions.append(e.action)
        self.outcomes.append(e.outcome)
        self.elapsed.append(e.elapsed_s)
        self.before.append(before)
        self.after.append(after)
        self.extras.append(extras)
