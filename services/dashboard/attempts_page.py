"""The Attempts page: filters (agent, action, outcome, since), newest first with paging, a
chart of outcomes over time, and the stats table (count, mean, p95); a row opens its panes.

Rows come from `fleetlog.attempts.query`, the table from `fleetlog.attempts.stats`, the chart
from one `fleetlog.sql` count per (time bucket, outcome): all three the query service's."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from fleetlog.services.backbone.errors import FleetValidationError
from fleetlog.services.client.fleet import Fleet
from fleetlog.services.client.timeparse import parse_since
from fleetlog.services.dashboard.layout import esc, page, seconds

__all__ = ["PAGE_SIZE", "attempts_page", "outcomes_sql"]

PAGE_SIZE = 50
BUCKETS = 24
FILTERS = ("agent", "action", "outcome", "since")
COLOURS = {"success": "#2f9e44", "failure": "#e03131", "error": "#e03131", "timeout": "#f08c00"}


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def outcomes_sql(filters: dict[str, str], since_iso: str | None) -> str:
    """Counts per (bucket, outcome) over BUCKETS equal spans from the first match to the last."""
    where = [f"{k} = {_literal(filters[k])}" for k in ("agent", "action", "outcome") if filters.get(k)]
    if since_iso:
        where.append(f"ts_utc >= CAST({_literal(since_iso)} AS TIMESTAMPTZ)")
    cond = f"WHERE {' AND '.join(where)}" if where else ""
    return f"""
WITH f AS (SELECT epoch(ts_utc) AS t, outcome FROM attempts {cond}),
     b AS (SELECT min(t) AS lo, max(t) AS hi FROM f)
SELECT least({BUCKETS - 1}, CAST(floor((f.t - b.lo) / greatest(1e-9, (b.hi - b.lo) / {BUCKETS})) AS INTEGER)) AS k,
       f.outcome, count(*) AS n, any_value(b.lo) AS lo, any_value(b.hi) AS hi
FROM f, b GROUP BY k, f.outcome ORDER BY k, f.outcome"""


def chart_svg(rows: list[list[Any]]) -> str:
    """Stacked bars, one per time bucket; plain SVG, no library."""
    if not rows:
        return "<p class=muted>no attempts match</p>"
    lo, hi = rows[0][3], rows[0][4]
    per: dict[int, dict[str, int]] = {}
    for k, outcome, n, *_ in rows:
        per.setdefault(int(k), {})[str(outcome)] = int(n)
    top = max(sum(v.values()) for v in per.values())
    width, height, bar = 720, 140, 720 / BUCKETS
    parts: list[str] = []
    outcomes = sorted({o for v in per.values() for o in v})
    for k, counts in per.items():
        y = float(height)
        for outcome in outcomes:
            n = counts.get(outcome, 0)
            if not n:
                continue
            h = height * n / top
            y -= h
            colour = COLOURS.get(outcome, "#868e96")
            parts.append(f'<rect x="{k * bar + 1:.1f}" y="{y:.1f}" width="{bar - 2:.1f}" height="{h:.1f}" '
                         f'fill="{colour}"><title>{esc(outcome)}: {n}</title></rect>')
    totals = {o: sum(v.get(o, 0) for v in per.values()) for o in outcomes}
    legend = " ".join(f'<span class=legend style="color:{COLOURS.get(o, "#868e96")}">■ {esc(o)} {totals[o]}</span>'
                      for o in outcomes)
    span = f"{datetime.fromtimestamp(lo).isoformat(timespec='seconds')} … " \
           f"{datetime.fromtimestamp(hi).isoformat(timespec='seconds')}"
    return (f'<svg id=chart viewBox="0 0 {width} {height}" width="{width}" height="{height}" role=img '
            f'aria-label="outcomes over time">{"".join(parts)}</svg><p class=muted>{legend} · {esc(span)}, '
            f"{BUCKETS} buckets, tallest {top}</p>")


def _pane(value: Any) -> str:
    if value is None:
        return "<span class=muted>none</span>"
    if isinstance(value, str):  # a pane given as text is shown as written
        return esc(value)
    return esc(json.dumps(value, indent=1, ensure_ascii=False))


async def attempts_page(fleet: Fleet, query: dict[str, str]) -> bytes:
    filters = {k: query[k].strip() for k in FILTERS if query.get(k, "").strip()}
    try:
        offset = max(0, int(query.get("offset", "0")))
    except ValueError:
        raise FleetValidationError("offset", f"must be a whole number, got {query.get('offset')!r}") from None
    since = parse_since(filters["since"]) if "since" in filters else None
    got = await fleet.attempts.query(agent=filters.get("agent"), action=filters.get("action"),
                                     outcome=filters.get("outcome"), since=since, limit=PAGE_SIZE + 1, offset=offset)
    # One more than shown says whether there is an older page; an answer cut to fit the
    # connection's max_payload says where its rest starts.
    items = got.items[:PAGE_SIZE]
    older = got.next_offset if got.has_more else (offset + PAGE_SIZE if len(got.items) > PAGE_SIZE else None)
    stats = await fleet.attempts.stats(agent=filters.get("agent"), since=since)
    chart = await fleet.sql(outcomes_sql(filters, since), max_rows=BUCKETS * 64)

    form = "".join(f'<label>{k} <input name={k} value="{esc(filters.get(k, ""))}"></label>' for k in FILTERS)
    rows = []
    for i, a in enumerate(items):
        rows.append(
            f'<tr class=row data-id="{esc(a.id)}" onclick="this.nextElementSibling.classList.toggle(\'open\')">'
            f"<td>{esc(a.ts)}</td><td class=agent>{esc(a.agent)}</td><td class=action>{esc(a.action)}</td>"
            f'<td class="outcome {esc(a.outcome)}">{esc(a.outcome)}</td><td class=num>{seconds(a.elapsed_s)}</td></tr>'
            f'<tr class=pane id="pane-{offset + i}"><td colspan=5><b>pane before</b><pre>{_pane(a.pane_before)}</pre>'
            f"<b>pane after</b><pre>{_pane(a.pane_after)}</pre><b>extras</b><pre>{_pane(a.extras)}</pre></td></tr>"
        )
    pager = []
    if offset > 0:
        pager.append(f'<a href="?{urlencode({**filters, "offset": max(0, offset - PAGE_SIZE)})}">newer</a>')
    if older is not None:
        pager.append(f'<a id=older href="?{urlencode({**filters, "offset": older})}">older</a>')
    stat_rows = "".join(
        f"<tr><td>{esc(s.action)}</td><td class='outcome {esc(s.outcome)}'>{esc(s.outcome)}</td>"
        f"<td class=num>{s.count}</td><td class=num>{seconds(s.mean_elapsed_s)}</td>"
        f"<td class=num>{seconds(s.p95_elapsed_s)}</td></tr>"
        for s in stats.items
    )
    body = (
        f"<form class=filters method=get>{form}<button>filter</button> <a href=/attempts>clear</a></form>"
        f"<h2>Outcomes over time</h2>{chart_svg(chart.rows)}"
        f"<h2>Attempts <span class=muted>{offset + 1 if items else 0}–{offset + len(items)}, newest first; "
        f"click a row for its panes</span></h2>"
        f"<table id=attempts><thead><tr><th>ts</th><th>agent</th><th>action</th><th>outcome</th><th>elapsed</th></tr>"
        f"</thead><tbody>{''.join(rows)}</tbody></table><p>{' · '.join(pager)}</p>"
        f"<h2>Stats</h2><table id=stats><thead><tr><th>action</th><th>outcome</th><th>count</th><th>mean</th>"
        f"<th>p95</th></tr></thead><tbody>{stat_rows}</tbody></table>"
    )
    return page("Attempts", "/attempts", body)
