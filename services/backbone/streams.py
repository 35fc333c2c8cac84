"""Ensure the stream table of `fleetlog.schemas.streams` exists, idempotently."""

from __future__ import annotations

import logging

from fleetlog.schemas.streams import DAY_S, STREAMS, StreamSpec
from fleetlog.services.backbone.config import FleetSettings
from nats.aio.client import Client
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

__all__ = ["ensure_streams", "stream_config"]

log = logging.getLogger("fleetlog.streams")


def stream_config(spec: StreamSpec, settings: FleetSettings, replicas: int = 1) -> StreamConfig:
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
        num_replicas=replicas,
        allow_direct=True,  # guarded commands read the last message per subject with direct get
        allow_atomic=spec.allow_atomic or None,
    )


async def ensure_streams(nc: Client, settings: FleetSettings, replicas: int = 1) -> None:
    """Create missing streams; bring existing ones to the declared config."""
    jsm = nc.jetstream()
    version = nc.connected_server_version
    atomic_ok = (version.major, version.minor) >= (2, 12)  # older servers lack atomic batches
    for spec in STREAMS:
        wanted = stream_config(spec, settings, replicas)
        if wanted.allow_atomic and not atomic_ok:
            log.warning("%s: nats-server %s has no atomic batch publish (2.12+): processor run records "
                        "written under a lock will be refused", spec.name, version)
            wanted.allow_atomic = None
        try:
            info = await jsm.stream_info(spec.name)
        except NotFoundError:
            await jsm.add_stream(wanted)
            log.info("created stream %s", spec.name)
            continue
        have = info.config
        if (
            sorted(have.subjects or []) != sorted(wanted.subjects or [])
            or have.max_msgs_per_subject != wanted.max_msgs_per_subject
            or abs((have.max_age or 0) - (wanted.max_age or 0)) > 1e-6
            or not have.allow_direct
            or bool(have.allow_atomic) != bool(wanted.allow_atomic)
        ):
            wanted.num_replicas = have.num_replicas
            await jsm.update_stream(wanted)
            log.info("updated stream %s", spec.name)
