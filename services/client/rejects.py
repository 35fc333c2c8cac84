"""One reject's exact bytes (`fleetlog rejects show SEQ --raw`).

Answers carry a reject's payload as a preview only (a 900 kB garbage message would not fit
a reply, services/query/builtins.py). The bytes themselves come from JetStream by
sequence: from the stream the event was published to (byte for byte what the projector
refused), else — aged out of it, or replaced on a compacted subject — from the copy on
FLEET_REJECTS, found by its `Fleetlog-Stream` / `Fleetlog-Seq` headers (scanned headers only).
"""

from __future__ import annotations

from typing import NamedTuple

import msgspec
from fleetlog.schemas import subjects
from fleetlog.schemas.answers import RejectRow, RejectsAnswer, RejectsQuery
from fleetlog.services.backbone.errors import FleetValidationError
from fleetlog.services.client.seam import FleetClient
from nats.aio.client import Client
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

__all__ = ["REJECTS_STREAM", "RawReject", "find_reject", "reject_raw"]

REJECTS_STREAM = "FLEET_REJECTS"
SCAN_MAX = 100_000  # rejects-stream headers read before giving up on finding the copy


class RawReject(NamedTuple):
    row: RejectRow
    data: bytes
    source: str  # the stream the bytes came from


async def find_reject(client: FleetClient, seq: int, stream: str | None = None,
                      projection: str | None = None) -> RejectRow:
    """The reject at `seq` (of `stream`, if several streams have one there); LookupError if none."""
    if seq < 1:
        raise FleetValidationError("seq", f"must be at least 1, got {seq}")
    query = RejectsQuery(projection=projection, stream=stream, seq=seq, limit=50)
    answer = await client.request("fleetlog.rejects", query, RejectsAnswer)
    streams = sorted({r.stream for r in answer.items})
    if not streams:
        where = f" of {stream}" if stream else ""
        raise LookupError(f"no reject at seq {seq}{where} (see `fleetlog rejects`)")
    if len(streams) > 1:
        raise FleetValidationError("stream", f"seq {seq} has rejects in {', '.join(streams)}: name one (--stream)")
    return answer.items[0]


async def reject_raw(client: FleetClient, seq: int, stream: str | None = None,
                     projection: str | None = None) -> RawReject:
    """The exact bytes of the reject at `seq`; LookupError if they are in no stream any more."""
    row = await find_reject(client, seq, stream, projection)
    nc = await client.nats()
    data = await _direct_get(nc, row.stream, {"seq": row.seq})
    if data is not None and data[1] == row.seq:
        return RawReject(row, data[0], row.stream)
    copy = await _from_rejects_stream(nc, row)
    if copy is None:
        raise LookupError(f"the bytes of {row.stream} seq {row.seq} are no longer in {row.stream} or {REJECTS_STREAM}")
    return RawReject(row, copy, REJECTS_STREAM)


async def _from_rejects_stream(nc: Client, row: RejectRow) -> bytes | None:
    """The copy's bytes, found by its headers. The copies are scanned headers only (one ordered
    push consumer), then the one found is fetched: a direct get per copy downloaded every
    reject in turn, up to SCAN_MAX round trips of up to ~1 MB each."""
    subject = subjects.reject(row.projection)
    js = nc.jetstream()
    try:
        info = await js.stream_info(REJECTS_STREAM, subjects_filter=subject)
    except NotFoundError:
        return None
    if not (info.state.subjects or {}).get(subject):
        return None
    sub = await js.subscribe(subject, stream=REJECTS_STREAM, ordered_consumer=True,
                             config=ConsumerConfig(headers_only=True, deliver_policy=DeliverPolicy.ALL))
    try:
        for _ in range(SCAN_MAX):
            try:
                msg = await sub.next_msg(timeout=5)
            except TimeoutError:
                return None
            headers = msg.headers or {}
            if headers.get("Fleetlog-Stream") == row.stream and headers.get("Fleetlog-Seq") == str(row.seq):
                got = await _direct_get(nc, REJECTS_STREAM, {"seq": msg.metadata.sequence.stream})
                return got[0] if got is not None else None
            if msg.metadata.num_pending == 0:
                return None
    finally:
        await sub.unsubscribe()
    return None


async def _direct_get(nc: Client, stream: str, body: dict[str, object], *,
                      with_headers: bool = False) -> tuple[bytes, int, dict[str, str]] | None:
    msg = await nc.request(f"$JS.API.DIRECT.GET.{stream}", msgspec.json.encode(body), timeout=5)
    headers = dict(msg.headers or {})
    if "Nats-Sequence" not in headers:
        status = headers.get("Status")
        if status not in (None, "404"):
            raise LookupError(f"{stream}: direct get answered {status} {headers.get('Description', '')}")
        return None
    return bytes(msg.data), int(headers["Nats-Sequence"]), headers if with_headers else {}
