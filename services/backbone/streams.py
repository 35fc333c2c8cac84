"""Ensure the stream table of `fleetlog.schemas.streams` exists, idempotently, with the
configured number of replicas (`FLEETLOG_STREAM_REPLICAS`); and where each stream's replicas are."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import NamedTuple

from fleetlog.schemas.streams import DAY_S, STREAMS, StreamSpec
from fleetlog.services.backbone.config import FleetSettings
from fleetlog.services.backbone.errors import FleetError
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.client import JetStreamContext
from nats.js.errors import APIError, NotFoundError, ServiceUnavailableError

__all__ = ["ReplicasRefused", "StreamPlacement", "ensure_streams", "stream_config", "stream_placements"]


class ReplicasRefused(FleetError):
    """JetStream cannot hold a stream with the configured replicas (one server, too few peers)."""


class StreamPlacement(NamedTuple):
    """Where one stream lives: its replica count, the leader's server name, and the peers
    that are behind the leader (`name (N ops behind)`) or offline."""

    name: str
    replicas: int
    leader: str
    lagging: list[str]

log = logging.getLogger("fleetlog.streams")


def stream_config(spec: StreamSpec, settings: FleetSettings) -> StreamConfig:
    max_age = spec.max_age_s
    if spec.max_age_setting is not None:
        max_age = float(getattr(settings, spec.max_age_setting)) * DAY_S
    return StreamConfig(
        name=spec.name,
        description=f"fleetlog: {spec.holds}",
        subjects=list(spec.subjects),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=max_age,  # seconds; nats-py converts to ns
        max_msgs_per_subject=spec.max_msgs_per_subject,
        # JetStream refuses a dedup window longer than the max age (a short retention setting)
        duplicate_window=spec.duplicate_window_s if not max_age else min(spec.duplicate_window_s, max_age),
        num_replicas=settings.stream_replicas,
        allow_direct=True,  # guarded commands read the last message per subject with direct get
    )


async def ensure_streams(nc: Client, settings: FleetSettings) -> None:
    """Create missing streams with `settings.stream_replicas`; bring existing ones to the declared
    config. Replicas of an existing stream change only when `stream_replicas` was set
    (FLEETLOG_STREAM_REPLICAS or an argument), never from its default: a client started
    without it must not scale a cluster's R3 streams down to R1. JetStream scales a stream
    up or down in place on a cluster; a server that cannot hold that many copies refuses,
    and ReplicasRefused says why and what to set."""
    set_replicas = "stream_replicas" in settings.model_fields_set
    jsm = nc.jetstream()
    clustered = bool(getattr(nc, "_server_info", {}).get("cluster"))
    loop = asyncio.get_running_loop()
    for spec in STREAMS:
        wanted = stream_config(spec, settings)
        # On a cluster that has just (re)started, a stream's group may not have a leader yet
        # even though the meta leader exists: its API calls time out or answer 503 for a few
        # seconds. Wait for it (bounded); on one server such an error is real and raised.
        deadline = loop.time() + (_LEADERLESS_WAIT_S if clustered else 0.0)
        while True:
            try:
                await _ensure_one(jsm, spec.name, wanted, settings, set_replicas)
                break
            except (NatsTimeout, NoRespondersError, ServiceUnavailableError) as exc:
                if loop.time() >= deadline:
                    raise
                log.info("stream %s: no leader answers yet (%s); retrying", spec.name, type(exc).__name__)
                await asyncio.sleep(0.5)


_LEADERLESS_WAIT_S = 60.0


async def _ensure_one(jsm: JetStreamContext, name: str, wanted: StreamConfig, settings: FleetSettings,
                      set_replicas: bool) -> None:
    try:
        info = await jsm.stream_info(name)
    except NotFoundError:
        await _apply(jsm.add_stream(wanted), name, settings, "create")
        log.info("created stream %s (replicas %d)", name, settings.stream_replicas)
        return
    have = info.config
    if not set_replicas:
        wanted.num_replicas = have.num_replicas
    if (
        sorted(have.subjects or []) != sorted(wanted.subjects or [])
        or have.max_msgs_per_subject != wanted.max_msgs_per_subject
        or abs((have.max_age or 0) - (wanted.max_age or 0)) > 1e-6
        or not have.allow_direct
        or bool(have.allow_atomic)  # an older fleetlog's FLEET_PROCESSORS: nothing writes atomic batches
        or (have.num_replicas or 1) != (wanted.num_replicas or 1)
    ):
        await _apply(jsm.update_stream(wanted), name, settings, "update")
        log.info("updated stream %s (replicas %d -> %d)", name, have.num_replicas or 1, wanted.num_replicas or 1)


async def _apply(aw: Awaitable[object], name: str, settings: FleetSettings, what: str) -> None:
    try:
        await aw
    except APIError as exc:
        if settings.stream_replicas > 1 and exc.err_code in (_NOT_CLUSTERED, _INSUFFICIENT_RESOURCES, _REPLICAS):
            raise ReplicasRefused(
                f"JetStream refused to {what} stream {name} with stream_replicas={settings.stream_replicas} "
                f"(FLEETLOG_STREAM_REPLICAS): {exc.description} — it needs a JetStream cluster of at least "
                f"{settings.stream_replicas} servers; on one server set FLEETLOG_STREAM_REPLICAS=1"
            ) from None
        raise


# JetStream error codes that mean "cannot place this many replicas".
_NOT_CLUSTERED = 10074  # replicas > 1 not supported in non-clustered mode
_INSUFFICIENT_RESOURCES = 10023
_REPLICAS = 10005  # no suitable peers for placement


async def stream_placements(nc: Client) -> list[StreamPlacement]:
    """Each fleetlog stream's replicas, leader and lagging peers (`fleetlog status`)."""
    jsm = nc.jetstream(timeout=2.0)
    out: list[StreamPlacement] = []
    for spec in STREAMS:
        try:
            info = await jsm.stream_info(spec.name)
        except NotFoundError:
            continue
        except (NatsTimeout, NoRespondersError, APIError) as exc:
            # No leader to answer for this stream right now (an election, a lost quorum): say so.
            out.append(StreamPlacement(spec.name, 0, f"none ({type(exc).__name__})", []))
            continue
        cluster = info.cluster
        leader = (cluster.leader if cluster is not None else None) or "-"
        lagging = []
        for peer in (cluster.replicas or []) if cluster is not None else []:
            if peer.offline:
                lagging.append(f"{peer.name} (offline)")
            elif not peer.current:
                lagging.append(f"{peer.name} ({peer.lag or 0} ops behind)")
        out.append(StreamPlacement(spec.name, info.config.num_replicas or 1, leader, lagging))
    return out
