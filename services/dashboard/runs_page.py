"""The Runs page: queue depth by queue and priority, claimed runs with holder, lease left and
fence, recent finals; and one run's detail with its result events.

Depth is one `fleetlog.sql` count; the lists are `fleetlog.runs.list`, the detail
`fleetlog.runs.get` and `fleetlog.runs.events`: what `fleetlog runs` asks."""

from __future__ import annotations

import json
import time
from urllib.parse import quote

import msgspec
from fleetlog.schemas.runs import RunView
from fleetlog.services.client.fleet import Fleet
from fleetlog.services.dashboard.layout import esc, page

__all__ = ["DEPTH_SQL", "run_page", "runs_page"]

DEPTH_SQL = """SELECT coalesce(queue_name, '') AS queue, priority, count(*) AS depth
FROM runs WHERE status = 'queued' GROUP BY queue, priority ORDER BY queue, priority DESC"""
LISTED = 100
FINALS = 20


def _link(run_id: str) -> str:
    return f'<a href="/run?id={quote(run_id)}">{esc(run_id)}</a>'


def _when(epoch: int | None) -> str:
    return "" if epoch is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch))


def _claimed(r: RunView, now: float) -> str:
    left = "" if r.claim_lease_expires_at is None else f"{r.claim_lease_expires_at - now:.0f}s"
    return (f'<tr data-run="{esc(r.run_id)}"><td>{_link(r.run_id)}</td><td>{esc(r.status)}</td>'
            f"<td>{esc(r.queue_name)}</td><td class=num>{r.priority}</td><td class=holder>"
            f"{esc(r.claimed_by_runtime_id)}</td><td class='num lease'>{left}</td>"
            f"<td class='num fence'>{esc(r.fence)}</td></tr>")


async def runs_page(fleet: Fleet) -> bytes:
    now = time.time()
    depth = await fleet.sql(DEPTH_SQL, max_rows=1000)
    claimed = await fleet.runs.list(statuses=["claimed", "running"], limit=LISTED)
    finals = await fleet.runs.list(statuses=["completed", "failed", "cancelled", "timeout"], limit=FINALS)
    depth_rows = "".join(f"<tr><td>{esc(q or '(none)')}</td><td class=num>{p}</td><td class=num>{n}</td></tr>"
                         for q, p, n in depth.rows)
    final_rows = "".join(
        f'<tr data-run="{esc(r.run_id)}"><td>{_link(r.run_id)}</td><td class="outcome {esc(r.status)}">'
        f"{esc(r.status)}</td><td>{esc(r.status_reason)}</td><td>{_when(r.finished_at)}</td>"
        f"<td>{esc(r.claimed_by_runtime_id)}</td></tr>" for r in finals.items
    )
    body = (
        "<h2>Queue depth</h2><table id=depth><thead><tr><th>queue</th><th>priority</th><th>queued</th></tr></thead>"
        f"<tbody>{depth_rows}</tbody></table>"
        f"<h2>Claimed and running <span class=muted>{claimed.total_count} in all</span></h2><table id=claimed>"
        "<thead><tr><th>run</th><th>status</th><th>queue</th><th>priority</th><th>holder</th><th>lease left</th>"
        f"<th>fence</th></tr></thead><tbody>{''.join(_claimed(r, now) for r in claimed.items)}</tbody></table>"
        "<h2>Recent finals</h2><table id=finals><thead><tr><th>run</th><th>status</th><th>reason</th>"
        f"<th>finished</th><th>runtime</th></tr></thead><tbody>{final_rows}</tbody></table>"
    )
    return page("Runs", "/runs", body)


async def run_page(fleet: Fleet, run_id: str) -> bytes | None:
    """One run and its result events, oldest first; None when the view has no such run."""
    run = await fleet.runs.get(run_id)
    if run is None:
        return None
    events = await fleet.runs.events(run_id, limit=100)
    fields = "".join(f"<tr><th>{esc(k)}</th><td>{esc(json.dumps(v) if isinstance(v, dict | list) else v)}</td></tr>"
                     for k, v in sorted(_public(run).items()))
    rows = "".join(
        f"<tr><td class=num>{e.sequence}</td><td>{esc(e.type)}</td><td>{esc(e.source)}</td>"
        f"<td>{_when(e.created_at)}</td><td><pre>{esc(json.dumps(e.data, ensure_ascii=False))}</pre></td></tr>"
        for e in events.items
    )
    more = " <span class=muted>(first 100)</span>" if events.has_more else ""
    body = (f"<table id=run><tbody>{fields}</tbody></table><h2>Result events{more}</h2><table id=events><thead>"
            f"<tr><th>seq</th><th>type</th><th>source</th><th>at</th><th>data</th></tr></thead><tbody>{rows}</tbody>"
            "</table>")
    return page(f"Run {run_id}", "/runs", body)


def _public(run: RunView) -> dict[str, object]:
    out: dict[str, object] = msgspec.to_builtins(run)
    out.pop("authorization", None)  # read-only page: no credentials shown
    return out
