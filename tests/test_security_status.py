"""A denied record() in an agent's own process shows in `fleetlog status` (the spool dir's dead letters)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from .helpers import fleetlog_cmd
from .security_helpers import identity, secure_node

_AGENT = """
import asyncio, sys
from fleetlog import Fleet

async def main() -> None:
    url, creds, spool = sys.argv[1:4]
    async with Fleet.connect(url, credentials=creds, spool_dir=spool, ensure=False) as fleet:
        fleet.attempts.record(agent="victim", action="forged", outcome="success", elapsed_s=1.0)
        fleet.attempts.record(agent="mallory", action="honest", outcome="success", elapsed_s=1.0)
        await fleet.flush(timeout=60)
        s = fleet.publisher_stats()
        print(s.acked, s.dead_lettered)

asyncio.run(main())
"""


async def test_status_shows_an_agents_permission_denied_records(tmp_path: Path) -> None:
    async with secure_node(tmp_path) as (broker, _, _):
        creds = await identity(broker, "agent", "mallory")
        spool = tmp_path / "agent-spool"
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETLOG_")}
        agent = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", _AGENT, broker.url, str(creds),
                                                         str(spool)], capture_output=True, text=True, env=env,
                                        timeout=120)
        assert agent.returncode == 0 and agent.stdout.split() == ["1", "1"], agent.stderr  # the agent is gone now
        as_admin = {**env, "FLEETLOG_CREDENTIALS": str(broker.credentials_path("admin-fleetlog")),
                    "FLEETLOG_SPOOL_DIR": str(spool), "NO_COLOR": "1", "COLUMNS": "200"}
        res = await asyncio.to_thread(subprocess.run, [*fleetlog_cmd(), "status", "--json", "--nats", broker.url],
                                      capture_output=True, text=True, env=as_admin, timeout=120)
        assert res.returncode == 0, res.stderr
        letters = json.loads(res.stdout)["dead_letters"]
        assert (letters["count"], letters["permission_denied"], letters["unreadable"]) == (1, 1, 0)
        assert letters["newest"] == [{"subject": "fleet.attempt.victim.forged", "reason": "permission denied: this "
                                      "identity may not publish to 'fleet.attempt.victim.forged'"}]
        text = await asyncio.to_thread(subprocess.run, [*fleetlog_cmd(), "status", "--nats", broker.url],
                                       capture_output=True, text=True, env=as_admin, timeout=120)
        assert text.returncode == 0, text.stderr
        assert f"dead letters: 1 in {spool / 'dead-letter.jsonl'}, 1 permission denied" in text.stdout
        assert "fleet.attempt.victim.forged: permission denied" in text.stdout
