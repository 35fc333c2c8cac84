"""Guarded commands (DESIGN §3.2): read the last message of a subject, publish with an expected sequence.

JetStream decides: a publish carrying `Nats-Expected-Last-Subject-Sequence: N` is
stored only if the subject's last message is still N (0 = the subject is empty),
so of any number of concurrent writers exactly one wins and the others get
`WrongLastSequence` (JetStream error 10071) and retry on fresh state. With
`Nats-Expected-Last-Subject-Sequence-Subject` the check applies to another
subject of the same stream: a run's result event is stored only while the run's
lifecycle subject is where the writer saw it (a fence decided at write time).

Reads use direct get (`allow_direct` streams): one request, no consumer. On a
replicated stream (R3) a direct get is answered by any replica, and a follower may not
hold the latest write yet: a guarded command would then read stale state (and lose its
race over and over) and read-your-writes would break. So on a replicated stream the
reads go to the stream leader instead (`$JS.API.STREAM.MSG.GET`, same one request, JSON
with base64 data). Whether a stream is replicated is asked once per connection and
stream (kept for `_REPLICAS_TTL_S`: a stream scaled in place is noticed).
"""

from __future__ import annotations

import asyncio
import base64
import time
import weakref
from typing import Any, NamedTuple

import msgspec
from fleetlog.services.backbone.errors import FleetError, FleetUnavailable, PermissionDenied
from fleetlog.services.backbone.link import denials, request_or_refused
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

__all__ = ["BrokerRefused", "Guarded", "StoredMsg", "WrongLastSequence"]

WRONG_LAST_SEQUENCE = 10071
# The same refusal from a clustered stream's leader while another write to the subject is
# still being proposed ("wrong last sequence", no number): also a lost race.
WRONG_LAST_SEQUENCE_IN_FLIGHT = 10164
_LOST_RACE = (WRONG_LAST_SEQUENCE, WRONG_LAST_SEQUENCE_IN_FLIGHT)
NO_MESSAGE_FOUND = 10037
_REPLICAS_TTL_S = 30.0

# Per connection: stream -> (replicated?, when asked).
_replicated: weakref.WeakKeyDictionary[Client, dict[str, tuple[bool, float]]] = weakref.WeakKeyDictionary()


class WrongLastSequence(FleetError):
    """Another writer got there first: the subject moved past the expected sequence."""


class BrokerRefused(FleetError):
    """JetStream refused a guarded publish for a reason other than a lost race."""


class StoredMsg(NamedTuple):
    seq: int
    subject: str
    data: bytes


class _Ack(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: dict[str, Any] | None = None


_ack_decoder = msgspec.json.Decoder(_Ack)


class _LeaderMsg(msgspec.Struct):
    subject: str
    seq: int
    data: str = ""  # base64


class _LeaderGet(msgspec.Struct):
    message: _LeaderMsg | None = None
    error: dict[str, Any] | None = None


_leader_decoder = msgspec.json.Decoder(_LeaderGet)


class Guarded:
    """Direct gets and expected-sequence publishes on one NATS connection."""

    def __init__(self, nc: Client, timeout_s: float = 5.0, failover_s: float = 15.0) -> None:
        self.nc = nc
        self.timeout_s = timeout_s
        # On a cluster a stream's leader can be away for a few seconds (its node lost, an
        # election): requests then time out or find no responder (503). Retrying them is safe:
        # reads are reads, and a publish repeats its Nats-Msg-Id, so if the first try was stored
        # the retry is acked as that duplicate (deduplication comes before the expected-sequence
        # check): a claim is never made twice. On one server a 503 means the stream is not
        # there, and nothing is retried.
        self.failover_s = failover_s
        self.failovers = 0  # retries made (for the fault tests' reports)

    async def _request(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> Any:
        clustered = bool(getattr(self.nc, "_server_info", {}).get("cluster"))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.failover_s if clustered else 0.0)
        denied_before = denials(self.nc, subject)
        while True:
            try:
                return await request_or_refused(self.nc, subject, payload, self.timeout_s, headers)
            except PermissionError:
                raise PermissionDenied(subject) from None
            except (NoRespondersError, NatsTimeout) as exc:
                # A refusal is final: never retried through a cluster's failover window.
                if denials(self.nc, subject) > denied_before:  # a secure broker refused this identity
                    raise PermissionDenied(subject) from None
                if loop.time() >= deadline:
                    what = "(is the stream there?)" if isinstance(exc, NoRespondersError) else (
                        f"within {self.timeout_s}s")
                    raise FleetUnavailable(f"JetStream did not answer {subject} {what}") from None
            self.failovers += 1
            await asyncio.sleep(0.25)

    async def last(self, stream: str, subject: str) -> StoredMsg | None:
        """The last message stored on `subject` (wildcards allowed), or None."""
        if await self._leader_reads(stream):
            return await self._leader_get(stream, {"last_by_subj": subject})
        msg = await self._request(f"$JS.API.DIRECT.GET.{stream}.{subject}", b"")
        return _stored(msg)

    async def get(self, stream: str, seq: int) -> StoredMsg | None:
        """The message stored at `seq`, or None if it is gone (deleted, aged out)."""
        return await self._read(stream, {"seq": seq})

    async def first(self, stream: str, subject: str) -> StoredMsg | None:
        """The first message still stored on `subject`, or None."""
        return await self.next(stream, subject, 0)

    async def next(self, stream: str, subject: str, seq: int) -> StoredMsg | None:
        """The first message stored on `subject` at or after `seq`, or None."""
        return await self._read(stream, {"seq": seq, "next_by_subj": subject})

    async def _read(self, stream: str, body: dict[str, object]) -> StoredMsg | None:
        if await self._leader_reads(stream):
            return await self._leader_get(stream, body)
        msg = await self._request(f"$JS.API.DIRECT.GET.{stream}", msgspec.json.encode(body))
        return _stored(msg)

    async def _leader_reads(self, stream: str) -> bool:
        """Whether `stream` is replicated (its reads then go to the leader; module docstring)."""
        known = _replicated.setdefault(self.nc, {})
        now = time.monotonic()
        hit = known.get(stream)
        if hit is not None and now - hit[1] < _REPLICAS_TTL_S:
            return hit[0]
        msg = await self._request(f"$JS.API.STREAM.INFO.{stream}", b"")
        info = msgspec.json.decode(msg.data)
        if "error" in info:
            raise FleetUnavailable(f"stream {stream}: {info['error'].get('description')}")
        replicated = int(info.get("config", {}).get("num_replicas", 1) or 1) > 1
        known[stream] = (replicated, now)
        return replicated

    async def _leader_get(self, stream: str, body: dict[str, object]) -> StoredMsg | None:
        msg = await self._request(f"$JS.API.STREAM.MSG.GET.{stream}", msgspec.json.encode(body))
        got = _leader_decoder.decode(msg.data)
        if got.error is not None:
            if got.error.get("err_code") == NO_MESSAGE_FOUND:
                return None
            raise BrokerRefused(f"message get on {stream} failed: {got.error.get('description')}")
        if got.message is None:
            return None
        return StoredMsg(got.message.seq, got.message.subject, base64.b64decode(got.message.data))

    async def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        msg_id: str,
        expected_last_seq: int | None,
        expected_subject: str | None = None,
    ) -> tuple[str, int, bool]:
        """Acked publish; returns (stream, seq, duplicate). Raises WrongLastSequence when beaten."""
        headers = {"Nats-Msg-Id": msg_id}
        if expected_last_seq is not None:
            headers["Nats-Expected-Last-Subject-Sequence"] = str(expected_last_seq)
            if expected_subject is not None:
                headers["Nats-Expected-Last-Subject-Sequence-Subject"] = expected_subject
        msg = await self._request(subject, payload, headers)
        ack = _ack_decoder.decode(msg.data)
        if ack.error is not None:
            if ack.error.get("err_code") in _LOST_RACE:
                raise WrongLastSequence(str(ack.error.get("description", "wrong last sequence")))
            raise BrokerRefused(f"JetStream refused the publish to {subject}: {ack.error.get('description')}")
        return ack.stream, ack.seq, ack.duplicate


def _stored(msg: Any) -> StoredMsg | None:
    headers = msg.headers or {}
    if headers.get("Status") == "404" or "Nats-Sequence" not in headers:
        if headers.get("Status") not in (None, "404"):
            raise BrokerRefused(f"direct get failed: {headers.get('Status')} {headers.get('Description', '')}")
        return None
    return StoredMsg(int(headers["Nats-Sequence"]), headers.get("Nats-Subject", ""), bytes(msg.data))
