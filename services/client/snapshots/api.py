"""Host snapshots' client API, as agent containers take them (issue 11).

`gather` (no I/O to streams), `take` (the diff at take time, services/client/snapshots/take.py),
`tick` (take and fire `on_diff` hooks, never raising), `status`, the reads `latest`, `prev`,
`history`, `all_latest`, `diffs`, and `watch` (an ordered consumer on FLEET_DIFFS);
`serve_hooks` runs the hook contract for a subscriber (services/client/snapshots/watch.py).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import msgspec
from fleetlog.schemas.snapshots import (
    DiffList,
    DiffsQuery,
    SnapshotDiff,
    SnapshotHistoryQuery,
    SnapshotList,
    SnapshotsLatestQuery,
)
from fleetlog.services.backbone.errors import FleetValidationError, check_identity
from fleetlog.services.client.seam import session_token
from fleetlog.services.client.snapshots import watch as snapshot_watch
from fleetlog.services.client.snapshots.collector import host_facts
from fleetlog.services.client.snapshots.gather import gather
from fleetlog.services.client.snapshots.hooks import fire, hook_commands
from fleetlog.services.client.snapshots.take import Taker
from fleetlog.services.writepath.publisher import Receipt, Token
from nats.js.api import ConsumerConfig, DeliverPolicy

if TYPE_CHECKING:
    from fleetlog.services.client.seam import FleetClient

__all__ = ["SnapshotsAPI"]

log = logging.getLogger("fleetlog.snapshots")

SNAPSHOTS = "FLEET_SNAPSHOTS"
DIFFS = "FLEET_DIFFS"
MinSeq = Token | Receipt | None


def _limit(value: int, high: int = 500) -> int:
    return max(1, min(high, int(value)))


class SnapshotsAPI:
    def __init__(self, fleet: FleetClient) -> None:
        self._fleet = fleet
        self._taker = Taker(fleet)
        self.hostname = socket.gethostname() or "localhost"

    def _min_seq(self, min_seq: MinSeq) -> dict[str, int] | None:
        """The caller's token and this client's own stored snapshots: a client reads its own takes
        (their guarded publishes are not in the publisher's flush token)."""
        token = session_token(min_seq, SNAPSHOTS, self._taker.seen)
        if token is not None and self._taker.seen > token.get(SNAPSHOTS, 0):
            token[SNAPSHOTS] = self._taker.seen
        return token

    @staticmethod
    def gather(agent: str, session: str | None = None, *, with_host_facts: bool = False) -> dict[str, Any]:
        """The container's snapshot of `agent` (services/client/snapshots/gather.py); no stream I/O.

        `with_host_facts` adds the general host facts (disk, python, uptime) under `host_facts`:
        opt-in, as they would change every diff."""
        snap = gather(check_identity("agent", agent), session)
        if with_host_facts:
            snap["host_facts"] = host_facts()
        return snap

    async def take(self, agent: str, data: Mapping[str, Any] | None = None, *, host: str | None = None,
                   session: str | None = None, with_diff: bool = True) -> dict[str, Any]:
        """Store one snapshot of (host, agent) and return it with `has_diff` and `diff_fields`.

        `data=None` gathers; a given `data` is the snapshot exactly as made (a JSON object).
        The diff is against the previous snapshot of (host, agent) in stream order ([] for the
        first, or with `with_diff=False`); a non-empty one is also published as a diff record
        on `fleet.diff.<host>.<agent>`. With the broker away it still returns: diffed against
        the last snapshot this process knows, spooled, drained in order later."""
        agent = check_identity("agent", agent)
        host = check_identity("host", self.hostname if host is None else host)
        snap = await asyncio.to_thread(gather, agent, session) if data is None else _checked(data)
        taken = await self._taker.take(host, agent, snap, with_diff)
        return {**snap, "has_diff": bool(taken.diff_fields), "diff_fields": taken.diff_fields}

    async def tick(self, agent: str, *, session: str | None = None, hooks: Any = None,
                   host: str | None = None) -> dict[str, Any] | None:
        """Take a snapshot and fire `on_diff` hooks when it has a diff; never raises (None: logged)."""
        try:
            snap = await self.take(agent, host=host, session=session)
        except Exception as exc:
            log.warning("snapshot tick for %s failed: %s", agent, exc)
            return None
        try:
            commands = hook_commands(hooks)
            if snap["has_diff"] and commands:
                fire(agent, "on_diff", commands, {"diff_fields": snap["diff_fields"],
                                                  "timestamp": snap.get("timestamp")})
        except Exception as exc:
            log.warning("snapshot tick for %s: on_diff hooks: %s", agent, exc)
        return snap

    async def status(self, agent: str, *, host: str | None = None, hooks: Any = None,
                     min_seq: MinSeq = None) -> dict[str, Any]:
        """The newest stored snapshot (from the view, never gathered) and how many hooks are configured."""
        return {"snapshot": await self.latest(agent, host, min_seq=min_seq),
                "hooks_configured": {"on_diff": len(hook_commands(hooks))}}

    async def latest(self, agent: str, host: str | None = None, *, min_seq: MinSeq = None) -> dict[str, Any] | None:
        """The newest stored snapshot of (host, agent) with has_diff/diff_fields, or None."""
        page = await self.history(agent, host, limit=1, min_seq=min_seq)
        return page.items[0].snapshot() if page.items else None

    async def prev(self, agent: str, host: str | None = None, *, min_seq: MinSeq = None) -> dict[str, Any] | None:
        """The stored snapshot before the newest one of (host, agent), or None."""
        page = await self.history(agent, host, limit=2, min_seq=min_seq)
        return page.items[1].snapshot() if len(page.items) > 1 else None

    async def history(self, agent: str, host: str | None = None, limit: int = 10, before_seq: int | None = None,
                      *, min_seq: MinSeq = None) -> SnapshotList:
        """(host, agent)'s stored snapshots, newest first; `next_cursor` pages on (as `before_seq`)."""
        req = SnapshotHistoryQuery(host=self.hostname if host is None else host, agent=agent, limit=_limit(limit),
                                   before_seq=before_seq, min_seq=self._min_seq(min_seq))
        return await self._fleet.request("fleetlog.snapshots.history", req, SnapshotList)

    async def all_latest(self, host: str | None = None, agent: str | None = None, limit: int = 100,
                         after: list[str] | tuple[str, str] | None = None, *, min_seq: MinSeq = None) -> SnapshotList:
        """The newest snapshot of every (host, agent), by host then agent; `next_after` pages on."""
        req = SnapshotsLatestQuery(host=host, agent=agent, after=list(after) if after else None,
                                   limit=_limit(limit), min_seq=self._min_seq(min_seq))
        return await self._fleet.request("fleetlog.snapshots.latest", req, SnapshotList)

    async def diffs(self, host: str | None = None, agent: str | None = None, after_seq: int = 0, limit: int = 100,
                    *, min_seq: MinSeq = None) -> DiffList:
        """The diff records, oldest first after `after_seq` (a FLEET_DIFFS seq)."""
        req = DiffsQuery(host=host, agent=agent, after_seq=max(0, int(after_seq)), limit=_limit(limit),
                         min_seq=self._min_seq(min_seq))
        return await self._fleet.request("fleetlog.snapshots.diffs", req, DiffList)

    async def watch(self, host: str | None = None, agent: str | None = None, *,
                    after_seq: int | None = None) -> AsyncIterator[tuple[int, SnapshotDiff]]:
        """Diff records as they are published: (FLEET_DIFFS seq, record), in stream order.

        From the first iteration on by default; from `after_seq` + 1 to replay first. An
        ordered consumer straight on FLEET_DIFFS (no query service); records that do not
        decode, and v1 diffs, are skipped (the projector records them as rejects)."""
        js = (await self._fleet.nats()).jetstream()
        if after_seq is None:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.NEW)
        else:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                    opt_start_seq=max(0, int(after_seq)) + 1)
        sub = await js.subscribe(snapshot_watch.diff_subject(host, agent), stream=DIFFS, ordered_consumer=True,
                                 config=config)
        try:
            async for msg in sub.messages:
                diff = snapshot_watch._decode(msg.data)
                if diff is None:
                    continue
                assert msg.metadata is not None
                yield msg.metadata.sequence.stream, diff
        finally:
            await sub.unsubscribe()

    async def serve_hooks(self, commands: list[str], host: str | None = None, agent: str | None = None, *,
                          durable: str | None = None, after_seq: int | None = None, count: int | None = None,
                          on_diff: Callable[[int, SnapshotDiff], Awaitable[None]] | None = None) -> int:
        """Run the on_diff hook contract for every diff followed, from a durable, resumable position.

        At-least-once: each diff's hooks run to their end before it is acked."""
        subject = snapshot_watch.diff_subject(host, agent)
        return await snapshot_watch.serve_hooks(
            await self._fleet.nats(), subject, commands, durable=durable or snapshot_watch.default_durable(subject),
            after_seq=after_seq, count=count, on_diff=on_diff)


def _checked(data: Any) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise FleetValidationError("data", f"must be a JSON object (a dict), got {type(data).__name__}")
    bad = next((k for k in data if not isinstance(k, str)), None)
    if bad is not None:
        raise FleetValidationError("data", f"keys must be strings, got {bad!r}")
    snap = dict(data)
    try:
        msgspec.json.encode(snap)
    except (TypeError, msgspec.EncodeError, ValueError, OverflowError) as exc:
        raise FleetValidationError("data", f"must be JSON-encodable: {exc}") from None
    return snap
