"""Long commands report progress: plain `folded N/M` lines on stderr when not a terminal."""

from __future__ import annotations

import re
from pathlib import Path

from fleetlog.services.node.server import Server

from fleetlog import Fleet, FleetSettings

from .helpers import cli_json, cli_runner

_EVENTS = 3000
_LINE = re.compile(r"^(?P<label>\w+) \S+: folded (?P<folded>\d+)/(?P<target>\d+) \(\d+/s, ETA \S+\)$")


def _lines(stderr: str, label: str) -> list[tuple[int, int]]:
    """(folded, target) of each progress line `label` printed."""
    found = [_LINE.match(line) for line in stderr.splitlines()]
    return [(int(m["folded"]), int(m["target"])) for m in found if m and m["label"] == label]


async def test_rebuild_replica_and_export_print_folded_over_target_and_succeed(
        fleet: Fleet, server: Server, settings: FleetSettings, tmp_path: Path) -> None:
    for i in range(_EVENTS):
        fleet.attempts.record(agent=f"p{i % 7}", action="a", outcome="success", elapsed_s=float(i))
    token = await fleet.flush()
    end = token["FLEET_ATTEMPTS"]
    assert end >= _EVENTS
    cli = cli_runner(settings.nats_url, tmp_path)

    replica = await cli("replica", str(tmp_path / "r.duckdb"), "--json")
    assert cli_json(replica)["streams"]["FLEET_ATTEMPTS"] == end  # stdout is still the one JSON answer
    lines = _lines(replica.stderr, "replica")
    assert lines, replica.stderr
    folded, target = lines[-1]
    assert folded == target >= end  # the last line is where it stopped: caught up
    assert all(f <= t for f, t in lines)

    export = await cli("export", str(tmp_path / "out"))
    assert export.returncode == 0, export.stderr
    lines = _lines(export.stderr, "export")
    assert lines and lines[-1][0] == lines[-1][1] >= end, export.stderr

    rebuild = await cli("rebuild", "attempts")
    assert rebuild.returncode == 0, rebuild.stderr
    assert "is live" in rebuild.stdout
    lines = _lines(rebuild.stderr, "rebuild")
    assert lines and lines[-1][0] >= end, rebuild.stderr
