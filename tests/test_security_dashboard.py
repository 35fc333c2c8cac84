"""A secure node's dashboard and /metrics ask for a reader's or admin's login (HTTP Basic),
checked against the salted hashes of the identities registry; over real HTTP."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.error
import urllib.request
from pathlib import Path

from fleetlog.services.dashboard.app import Dashboard
from fleetlog.services.node.broker import reload_secure_broker
from fleetlog.services.node.identities import Registry, password_path

from .security_helpers import identity, secure_node


def _get(url: str, login: tuple[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url)
    if login is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{login[0]}:{login[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as res:
            return res.status, dict(res.headers), res.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


async def test_the_dashboard_needs_a_reader_or_admin_login(tmp_path: Path) -> None:
    # data_dir holds the broker's dir, as for `up --secure`: the dashboard reads <data_dir>/broker's logins
    async with secure_node(tmp_path, data_dir=tmp_path) as (broker, _, settings):
        reader = await identity(broker, "reader", "dash")
        agent = await identity(broker, "agent", "a1")
        assert not password_path(agent).exists()  # an agent gets no dashboard login
        password = password_path(reader).read_text().strip()
        admin_password = password_path(broker.credentials_path("admin-fleetlog")).read_text().strip()
        registry = (broker.data_dir / "identities.json").read_text()
        assert password not in registry and admin_password not in registry  # salted hashes only
        assert oct(password_path(reader).stat().st_mode)[-3:] == "600"
        dashboard = Dashboard(settings, "127.0.0.1", 0)
        await dashboard.start()
        try:
            url = dashboard.url
            for login in (None, ("reader-dash", "wrong"), ("agent-a1", password), ("reader-dash", "")):
                status, headers, _ = await asyncio.to_thread(_get, url + "/", login)
                assert status == 401 and headers["WWW-Authenticate"].startswith('Basic realm="fleetlog"'), login
                assert (await asyncio.to_thread(_get, url + "/metrics", login))[0] == 401
            assert (await asyncio.to_thread(_get, url + "/healthz"))[0] == 200  # liveness stays open
            status, _, body = await asyncio.to_thread(_get, url + "/", ("reader-dash", password))
            assert status == 200 and b"<html" in body.lower()
            status, _, body = await asyncio.to_thread(_get, url + "/metrics", ("admin-fleetlog", admin_password))
            assert status == 200 and b"fleetlog_" in body
            assert Registry(broker.data_dir).revoke("reader-dash")
            assert await reload_secure_broker(broker.data_dir)
            assert (await asyncio.to_thread(_get, url + "/", ("reader-dash", password)))[0] == 401  # at once
        finally:
            await dashboard.stop()
        assert json.loads(registry)["users"][0]["http"]["scrypt"] == [16384, 8, 1]
