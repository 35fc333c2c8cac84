"""What the secure-broker tests share: a secure broker with the services on it as `service`,
identities issued the way `fleetlog identities add` issues them, raw nats-py clients on a seed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import nats
from fleetlog.services.backbone.nkeyauth import Identity
from fleetlog.services.node.broker import EmbeddedBroker, free_port, reload_secure_broker
from fleetlog.services.node.identities import Registry
from fleetlog.services.node.server import Server

from fleetlog import FleetSettings

Node = tuple[EmbeddedBroker, Server, FleetSettings]


@asynccontextmanager
async def secure_node(tmp_path: Path, **settings: object) -> AsyncIterator[Node]:
    broker = EmbeddedBroker(tmp_path / "broker", port=free_port(), secure=True)
    await broker.start()
    s = FleetSettings(**{"nats_url": broker.url, "data_dir": tmp_path / "data", "spool_dir": tmp_path / "spool",
                         "batch_wait_s": 0.01, "reactors": False,
                         "credentials": broker.credentials_path("service-fleetlog"), **settings})
    server = Server(s)
    await server.start()
    try:
        yield broker, server, s
    finally:
        await server.stop()
        await broker.stop()


async def identity(broker: EmbeddedBroker, role: str, name: str, host: str | None = None) -> Path:
    """A new identity's seed file (outside the broker's dir, as `identities add --out` writes it)."""
    out = broker.data_dir.parent / "seeds" / f"{role}-{name}.nk"
    Registry(broker.data_dir).add(role, name, host, out=out)
    assert await reload_secure_broker(broker.data_dir)
    assert oct(out.stat().st_mode)[-3:] == "600" and out.read_text().startswith("SU")
    return out


async def raw(broker: EmbeddedBroker, creds: Path, **options: object) -> nats.NATS:
    """A plain nats-py client on the seed file as nats-py takes it, with the identity's inbox
    root; its async errors (the broker's permission refusals) in `nc._fleetlog_errors`."""
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    options = {"nkeys_seed": str(creds), "inbox_prefix": Identity.load(creds).inbox_prefix, **options}
    nc = await nats.connect(broker.url, error_cb=on_error, allow_reconnect=False, **options)  # type: ignore[arg-type]
    nc._fleetlog_errors = errors  # type: ignore[attr-defined]
    return nc


def errors_of(nc: nats.NATS) -> list[str]:
    return [str(e) for e in nc._fleetlog_errors]  # type: ignore[attr-defined]
