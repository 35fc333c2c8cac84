"""The Runtimes page (online / stale, heartbeat age) and the Processors page (last runs with
their stats, lock holder): `fleetlog.runtimes.list` / `.counts` and
`fleetlog.processors.summary`, as `fleetlog runtimes` and `fleetlog processors` ask."""

from __future__ import annotations

import time

from fleetlog.services.client.fleet import Fleet
from fleetlog.services.dashboard.layout import esc, page

__all__ = ["processors_page", "runtimes_page"]

RUNTIMES_SHOWN = 500


async def runtimes_page(fleet: Fleet) -> bytes:
    now = time.time()
    got = await fleet.runtimes.list(limit=RUNTIMES_SHOWN)
    online = sum(1 for r in got.items if r.status != "stale")
    rows = "".join(
        f'<tr data-runtime="{esc(r.runtime_id)}"><td>{esc(r.runtime_id)}</td><td>{esc(r.display_name)}</td>'
        f'<td class="status {esc(r.status)}">{esc(r.status)}</td><td class="num age">{now - r.last_heartbeat_at:.0f}s'
        f"</td><td class=num>{r.heartbeat_deadline_s:g}s</td><td class=num>{esc(r.active_runs)}</td>"
        f"<td>{esc(r.status_reason)}</td></tr>" for r in got.items
    )
    body = (f"<p class=muted>{len(got.items)} shown: {online} not stale, {len(got.items) - online} stale</p>"
            "<table id=runtimes><thead><tr><th>runtime</th><th>name</th><th>status</th><th>heartbeat age</th>"
            f"<th>deadline</th><th>active runs</th><th>reason</th></tr></thead><tbody>{rows}</tbody></table>")
    return page("Runtimes", "/runtimes", body)


async def processors_page(fleet: Fleet) -> bytes:
    got = await fleet.processors.summary()
    rows = []
    for p in got.items:
        run = p.last_run
        stats = "" if run is None else (
            f"{'ok' if run.ok else 'failed'}: scanned {run.scanned}, processed {run.processed}, skipped {run.skipped}, "
            f"capped {run.capped}, errors {run.errors}, items {run.items_extracted}")
        rows.append(
            f'<tr data-processor="{esc(p.processor)}"><td>{esc(p.processor)}</td><td class=num>{p.sessions}</td>'
            f"<td class=num>{p.items_extracted}</td><td>{esc(p.last_processed_at)}</td><td class=num>{p.runs}</td>"
            f"<td class=run>{esc(stats)}</td><td class=lock>{esc(p.lock_holder or 'free')}</td></tr>"
        )
    body = ("<table id=processors><thead><tr><th>processor</th><th>sessions</th><th>items</th><th>last processed</th>"
            f"<th>runs</th><th>last run</th><th>lock</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")
    return page("Processors", "/processors", body)
