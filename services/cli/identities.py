"""`fleetlog identities add|list|revoke`: the users of a secure broker (`fleetlog up --secure`).

They edit the registry under the broker's data dir and have the running broker reload its
config (nats-server reloads users and permissions on SIGHUP: no restart, no lost connection
of anyone else)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click
from fleetlog.services.node.broker import BrokerError, reload_secure_broker
from fleetlog.services.node.identities import ROLES, IdentityError, Registry, password_path

from ._common import Exit, fail, print_json, settings_from

__all__ = ["identities"]

data_dir_option = click.option(
    "--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="the data dir of `fleetlog up --secure` [env FLEETLOG_DATA_DIR; default: the user data dir]")


def _broker_dir(data_dir: Path | None) -> Path:
    return (data_dir or settings_from(None).data_dir) / "broker"


def _reload(broker_dir: Path) -> str:
    try:
        reloaded = asyncio.run(reload_secure_broker(broker_dir))
    except BrokerError as exc:
        fail(Exit.ERROR, str(exc))
    if reloaded:
        return "the broker reloaded its permissions"
    return "no secure broker runs there: it applies at `up --secure`"


@click.group()
def identities() -> None:
    """Users and permissions of a secure broker (docs/security.md)."""


@identities.command("add")
@click.argument("role", type=click.Choice(ROLES))
@click.argument("name")
@click.option("--host", default=None, help="agents: the one host whose snapshots it may publish (default any)")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="where to write the nkey seed file, never overwritten (default ./ROLE-NAME.nk); the broker "
                   "keeps only the public key")
@data_dir_option
def add(role: str, name: str, host: str | None, out: Path | None, data_dir: Path | None) -> None:
    """Make an identity; writes its nkey seed file (mode 0600) for `credentials=` / FLEETLOG_CREDENTIALS
    (and `nats.connect(url, nkeys_seed=FILE)`)."""
    broker_dir = _broker_dir(data_dir)
    path = out or Path(f"{role}-{name}.nk")
    try:
        entry = Registry(broker_dir).add(role, name, host, out=path)
    except IdentityError as exc:
        fail(Exit.USAGE, str(exc))
    login = f"; dashboard password in {password_path(path)}" if "http" in entry else ""
    click.echo(f"{entry['user']}: seed in {path} (public key {entry['nkey']}){login}; {_reload(broker_dir)}")


@identities.command("list")
@click.option("--json", "as_json", is_flag=True)
@data_dir_option
def list_(as_json: bool, data_dir: Path | None) -> None:
    """The identities and their public keys (the registry holds no secret)."""
    try:
        users = [{k: u[k] for k in ("user", "role", "name", "host", "nkey")}
                 for u in Registry(_broker_dir(data_dir)).load()]
    except IdentityError as exc:
        fail(Exit.ERROR, str(exc))
    if as_json:
        print_json(users)
        return
    for u in users:
        click.echo(f"{u['user']}\t{u['role']}\t{u['name']}\t{u['nkey']}" + (f"\thost={u['host']}" if u["host"] else ""))


@identities.command("revoke")
@click.argument("user")
@data_dir_option
def revoke(user: str, data_dir: Path | None) -> None:
    """Remove an identity (USER as listed: ROLE-NAME); the broker refuses it from now on."""
    broker_dir = _broker_dir(data_dir)
    if not Registry(broker_dir).revoke(user):
        fail(Exit.NOT_FOUND, f"no identity {user!r}")
    click.echo(f"{user}: revoked; {_reload(broker_dir)}")
