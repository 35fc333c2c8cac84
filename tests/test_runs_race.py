"""8 runtimes in separate processes race over 2,000 queued runs: each run claimed exactly once,
higher priority first. Correctness comes from JetStream's expected sequence, not from the view."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

from fleetlog.services.node.broker import die_with_parent

from fleetlog import Fleet

CLAIMERS = 8
RUNS = 2_000
PRIORITIES = (0, 1, 5, 9)


async def test_eight_processes_claim_every_run_exactly_once(fleet: Fleet, settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    priority = {f"run-{i:05d}": PRIORITIES[(i * 7) % len(PRIORITIES)] for i in range(RUNS)}
    ids = list(priority)
    for start in range(0, RUNS, 200):
        await asyncio.gather(*(
            fleet.runs.create(r, "runner", status="queued", priority=priority[r]) for r in ids[start:start + 200]
        ))
    start_at = time.time() + 3.0
    script = Path(__file__).with_name("run_claimer.py")
    argv = [[sys.executable, str(script), settings.nats_url, f"rt-{n}", str(tmp_path / f"c{n}.json"),
             str(tmp_path / f"spool{n}"), str(start_at)] for n in range(CLAIMERS)]
    procs = [subprocess.Popen(a, preexec_fn=die_with_parent())  # noqa: ASYNC220 - waited for in threads
             for a in argv]
    for p in procs:
        assert await asyncio.to_thread(p.wait, 240) == 0
    results = [json.loads((tmp_path / f"c{n}.json").read_text()) for n in range(CLAIMERS)]
    claims = [(run_id, fence, prio, r["runtime_id"]) for r in results for run_id, fence, prio, _ in r["claims"]]

    claimed_ids = [c[0] for c in claims]
    assert len(claimed_ids) == RUNS and set(claimed_ids) == set(ids)  # every run, exactly once
    fences = [c[1] for c in claims]
    assert len(set(fences)) == RUNS
    # Priority order: in stream (fence) order no lower-priority claim precedes a higher-priority one.
    # A claimer only reaches a lower priority after every higher one it was shown was claimed
    # (by it, or by a rival whose claim JetStream stored first).
    by_fence = sorted(claims, key=lambda c: c[1])
    inversions = sum(1 for a, b in itertools.pairwise(by_fence) if a[2] < b[2])
    conflicts = sum(r["conflicts"] for r in results)
    fetches = sum(r["fetches"] for r in results)
    per_runtime = sorted(len(r["claims"]) for r in results)
    rate = RUNS / max(r["elapsed_s"] for r in results)
    print(f"\n8-process claim race: {RUNS} runs at {rate:.0f} claims/s, conflicts {conflicts}, fetches {fetches}, "
          f"claims per runtime {per_runtime}, priority inversions {inversions}")
    assert inversions == 0
    assert min(per_runtime) > 0  # every process took part
    # The view agrees with the claimers' receipts.
    page = await fleet.runs.list(statuses=["queued"], min_seq={"FLEET_RUNS": max(fences)})
    assert page.total_count == 0
    claimed = await fleet.runs.list(statuses=["claimed"], min_seq={"FLEET_RUNS": max(fences)}, limit=100)
    assert claimed.total_count == RUNS
    owner = {c[0]: c[3] for c in claims}
    assert all(owner[r.run_id] == r.claimed_by_runtime_id for r in claimed.items)
