"""compose.yaml agrees with the code (docker may not run here): the NATS nodes use the flags
`up --cluster` uses, with names and routes to each other; the fleetlog nodes' settings are
real FleetSettings fields, R3 on all three URLs."""

from __future__ import annotations

import json
import re
from pathlib import Path

from fleetlog.services.node.cluster import CLUSTER_NAME, cluster_args

from fleetlog import FleetSettings

COMPOSE = Path(__file__).resolve().parent.parent / "compose.yaml"


def _services(text: str) -> dict[str, str]:
    """Each top-level service's block of text (two-space indented names under `services:`)."""
    body = text.split("\nservices:\n", 1)[1].split("\nvolumes:\n", 1)[0]
    parts = re.split(r"^  ([\w-]+):\n", body, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def _command(block: str) -> list[str]:
    m = re.search(r"command: (\[.*?\])", block, flags=re.S)
    assert m is not None, block
    return list(json.loads(m.group(1)))


def _env(text: str) -> dict[str, str]:
    m = re.search(r"environment: &fleetlog-env\n((?:    \w+: .*\n)+)", text)
    assert m is not None
    return {k: v.strip().strip('"') for k, v in (line.strip().split(": ", 1) for line in m.group(1).splitlines())}


def test_nats_nodes_use_the_cluster_flags_of_up_cluster() -> None:
    text = COMPOSE.read_text()
    services = _services(text)
    nats = sorted(name for name in services if name.startswith("nats-"))
    assert nats == ["nats-1", "nats-2", "nats-3"]  # R3 needs three servers
    ours = {a for a in cluster_args("nats://127.0.0.1:1", ["nats://127.0.0.1:2"], 3) if a.startswith("--")}
    for name in nats:
        flags = dict(a.split("=", 1) if "=" in a else (a, "") for a in _command(services[name]))
        assert ours <= set(flags), (name, ours - set(flags))
        assert flags["--name"] == name  # JetStream in a cluster needs server names
        assert "--jetstream" in flags and flags["--store_dir"]
        assert flags["--cluster_name"] == CLUSTER_NAME
        port = flags["--cluster"].rsplit(":", 1)[1]
        assert set(flags["--routes"].split(",")) == {f"nats://{o}:{port}" for o in nats if o != name}


def test_fleetlog_nodes_settings_are_real_and_r3_on_every_node() -> None:
    text = COMPOSE.read_text()
    services = _services(text)
    fleetlog_nodes = sorted(name for name in services if name.startswith("fleetlog-"))
    assert len(fleetlog_nodes) == 2  # two serve nodes, one queue group
    volumes = {re.search(r"volumes: \[.*?\"(fleetlog-\d):/data\"\]", services[n]).group(1)  # type: ignore[union-attr]
               for n in fleetlog_nodes}
    assert len(volumes) == 2  # each folds its own DuckDB replica
    env = _env(text)
    fields = {f"FLEETLOG_{name.upper()}" for name in FleetSettings.model_fields}
    assert set(env) <= fields, set(env) - fields
    settings = FleetSettings(**{k.removeprefix("FLEETLOG_").lower(): v for k, v in env.items()})
    assert settings.stream_replicas == 3
    assert settings.servers() == [f"nats://nats-{i}:4222" for i in (1, 2, 3)]
    for n in fleetlog_nodes:
        assert "<<: *fleetlog" in services[n]
    assert "fleetlog serve" in text
