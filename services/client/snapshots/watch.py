"""`watch --exec/--post`: the hook contract for subscribers who are not the taker.

A durable pull consumer on FLEET_DIFFS (one per `durable` name, filtered to the
subjects followed) delivers each diff record; every configured hook is run to its end,
then the message is acked (ack_sync: the broker confirmed it). A restart with the same
durable continues after the last acked diff. A hook run is at-least-once: a watcher
killed after a hook ran but before its ack runs that hook again for that diff.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from fleetlog.schemas import subjects
from fleetlog.schemas.snapshots import EVENT_VERSION, SnapshotDiff
from fleetlog.services.client.snapshots.hooks import run_hook
from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

__all__ = ["default_durable", "diff_subject", "serve_hooks"]

log = logging.getLogger("fleetlog.snapshots")

DIFFS = "FLEET_DIFFS"
ACK_WAIT_S = 300.0  # longer than hooks run (HOOK_TIMEOUT_S per command): no redelivery mid-hook
_diff = msgspec.json.Decoder(SnapshotDiff)


def diff_subject(host: str | None, agent: str | None) -> str:
    return (f"fleet.diff.{'*' if host is None else subjects.escape_token(host)}"
            f".{'*' if agent is None else subjects.escape_token(agent)}")


def default_durable(subject: str) -> str:
    """A stable consumer name for one filter subject: the same watch resumes where it stopped."""
    return "fleetlog-snapwatch-" + hashlib.sha256(subject.encode()).hexdigest()[:16]


async def serve_hooks(nc: Client, subject: str, commands: list[str], *, durable: str,
                      after_seq: int | None = None, count: int | None = None,
                      on_diff: Callable[[int, SnapshotDiff], Awaitable[None]] | None = None) -> int:
    """Run `commands` for every diff on `subject`, acking each after its hooks; returns the diffs handled.

    A new durable starts after `after_seq` (None: with the next diff); an existing one
    continues from its own position (`after_seq` is then ignored)."""
    js = nc.jetstream()
    try:
        await js.consumer_info(DIFFS, durable)
    except NotFoundError:  # not there yet: create it at the asked position
        if after_seq is None:
            config = ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT,
                                    deliver_policy=DeliverPolicy.NEW, filter_subject=subject, ack_wait=ACK_WAIT_S)
        else:
            config = ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT,
                                    deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                    opt_start_seq=max(0, after_seq) + 1, filter_subject=subject,
                                    ack_wait=ACK_WAIT_S)
        await js.add_consumer(DIFFS, config)
    sub = await js.pull_subscribe_bind(durable, DIFFS)
    handled = 0
    try:
        while count is None or handled < count:
            try:
                msgs = await sub.fetch(1, timeout=5.0)
            except (TimeoutError, NatsTimeout):
                continue
            for msg in msgs:
                assert msg.metadata is not None
                diff = _decode(msg.data)
                if diff is not None:
                    context: dict[str, Any] = {"diff_fields": diff.diff_fields, "timestamp": diff.timestamp}
                    for command in commands:
                        await asyncio.to_thread(run_hook, diff.agent, "on_diff", command, context)
                    if on_diff is not None:
                        await on_diff(msg.metadata.sequence.stream, diff)
                    handled += 1
                await msg.ack_sync()
    finally:
        await sub.unsubscribe()
    return handled


def _decode(data: bytes) -> SnapshotDiff | None:
    try:
        diff = _diff.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        return None
    return diff if diff.v >= EVENT_VERSION else None  # a v1 (JSON Pointer) diff names no fields
