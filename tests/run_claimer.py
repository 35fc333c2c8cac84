"""One racing runtime, in its own process: claim until nothing is left, write what it got as JSON.

Used by tests/test_runs_race.py and bench/bench_runs.py:
    python tests/run_claimer.py NATS_URL RUNTIME_ID OUT.json SPOOL_DIR [START_AT_EPOCH]
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from fleetlog import Fleet, FleetSettings


async def main(url: str, runtime_id: str, out: Path, spool: Path, start_at: float) -> None:
    fleet = await Fleet.connect(settings=FleetSettings(nats_url=url, spool_dir=spool, data_dir=spool), ensure=False)
    claims: list[tuple[str, int, int, float]] = []
    try:
        await asyncio.sleep(max(0.0, start_at - time.time()))  # all claimers start together
        t0 = time.perf_counter()
        while True:
            c0 = time.perf_counter()
            claim = await fleet.runs.claim_next(runtime_id, lease_s=600)
            if claim is None:
                break
            claims.append((claim.run_id, claim.fence, claim.priority, time.perf_counter() - c0))
        elapsed = time.perf_counter() - t0
    finally:
        await fleet.close()
    c = fleet.runs.counters
    out.write_text(json.dumps({  # noqa: ASYNC240 - once, at exit
        "runtime_id": runtime_id, "claims": claims, "elapsed_s": elapsed,
        "cpu_s": time.process_time(), "conflicts": c.conflicts, "fetches": c.fetches,
        "stale_candidates": c.stale_candidates,
    }))


if __name__ == "__main__":
    start = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    asyncio.run(main(sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), start))
