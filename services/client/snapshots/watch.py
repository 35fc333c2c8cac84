"""`watch --exec/--post`: the hook contract for subscribers who are not the taker.

A durable pull consumer on FLEET_DIFFS (one per `durable` name, filtered to the
subjects followed) delivers each diff record; every configured hook is run to its end,
then the message is acked (ack_sync: the broker confirmed it). A restart with the same
durable continues with the first diff not acked, in order: the consumer has one diff out
at a time (`max_ack_pending` 1), so a diff a killed watcher had fetched comes again first,
once its ack wait (ACK_WAIT_S) runs out, before any later one. While hooks run, the
watcher tells the broker it is still working on the diff (`in_progress`), so a long hook
is never delivered twice. A hook run is at-least-once: a watcher killed after a hook ran
but before its ack runs that hook again for that diff.
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
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

__all__ = ["default_durable", "diff_subject", "serve_hooks"]

log = logging.getLogger("fleetlog.snapshots")

DIFFS = "FLEET_DIFFS"
# How long a fetched diff waits for its ack before it is delivered again: after a watcher was
# killed holding it (before: 300 s, and the diffs after it came first, out of order). Hooks
# that run longer are kept from redelivery by `in_progress` every third of it.
ACK_WAIT_S = 10.0
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
                                    deliver_policy=DeliverPolicy.NEW, filter_subject=subject, ack_wait=ACK_WAIT_S,
                                    max_ack_pending=1)
        else:
            config = ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT,
                                    deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                    opt_start_seq=max(0, after_seq) + 1, filter_subject=subject,
                                    ack_wait=ACK_WAIT_S, max_ack_pending=1)
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
                    working = asyncio.create_task(_in_progress(msg))
                    try:
                        for command in commands:
                            await asyncio.to_thread(run_hook, diff.agent, "on_diff", command, context)
                        if on_diff is not None:
                            await on_diff(msg.metadata.sequence.stream, diff)
                    finally:
                        working.cancel()
                    handled += 1
                await msg.ack_sync()
    finally:
        await sub.unsubscribe()
    return handled


async def _in_progress(msg: Msg) -> None:
    """Tell the broker every third of the ack wait that the diff's hooks still run."""
    while True:
        await asyncio.sleep(ACK_WAIT_S / 3)
        try:
            await msg.in_progress()
        except Exception as exc:  # the connection is going: the diff is delivered again, run again
            log.debug("in_progress for a diff failed: %s", exc)


def _decode(data: bytes) -> SnapshotDiff | None:
    try:
        diff = _diff.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        return None
    return diff if diff.v >= EVENT_VERSION else None  # a v1 (JSON Pointer) diff names no fields
