"""The Fleet page: one row per agent, kept live by the facts as they are published.

Per agent: host, last action, its outcome and when, p95 elapsed per action over the agent's
last N attempts of it (one `fleetlog.sql` request: the house p95, the sorted sample at
max(0, floor(0.95·(n−1)))), and its latest snapshot's key figures with the fields of its
last diff highlighted (`fleetlog.snapshots.latest`)."""

from __future__ import annotations

from typing import Any

from fleetlog.services.client.fleet import Fleet
from fleetlog.services.dashboard.layout import ago, esc, page
from fleetlog.services.dashboard.live import KEY_FIGURES

__all__ = ["P95_LAST_N", "agents_sql", "fleet_page"]

P95_LAST_N = 100
MAX_AGENTS = 5000
LATEST_PAGE = 500  # snapshots.latest's own limit


def agents_sql(last_n: int = P95_LAST_N) -> str:
    """One row per agent (the sql endpoint caps rows: one per (agent, action) would not fit)."""
    n = int(last_n)
    return f"""
WITH r AS (
  SELECT agent, action, outcome, ts, elapsed_s,
         row_number() OVER (PARTITION BY agent ORDER BY ts_utc DESC, seq DESC) AS newest,
         row_number() OVER (PARTITION BY agent, action ORDER BY ts_utc DESC, seq DESC) AS nth
  FROM attempts
), per_action AS (
  SELECT agent, action,
         list_sort(list(elapsed_s))[CAST(greatest(0, floor(0.95 * (count(*) - 1))) AS BIGINT) + 1] AS p95,
         max(CASE WHEN newest = 1 THEN outcome END) AS last_outcome,
         max(CASE WHEN newest = 1 THEN ts END) AS last_ts
  FROM r WHERE nth <= {n} GROUP BY agent, action
)
SELECT agent,
       string_agg(action || ' ' || printf('%.2f', p95) || 's', ' · ' ORDER BY action) AS p95,
       max(CASE WHEN last_ts IS NOT NULL THEN action END) AS last_action,
       max(last_outcome) AS last_outcome, max(last_ts) AS last_ts
FROM per_action GROUP BY agent ORDER BY agent"""


def _figure(name: str, value: Any) -> str:
    if value is None:
        return ""
    if name.endswith("_bytes") and isinstance(value, int | float):
        return f"{value / 2**30:.1f} GiB"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


async def _agents(fleet: Fleet) -> dict[str, dict[str, Any]]:
    answer = await fleet.sql(agents_sql(), max_rows=MAX_AGENTS)
    return {agent: {"p95": p95, "last_action": action, "last_outcome": outcome, "last_ts": ts}
            for agent, p95, action, outcome, ts in answer.rows}


async def _snapshots(fleet: Fleet) -> dict[str, dict[str, Any]]:
    newest: dict[str, dict[str, Any]] = {}
    after: list[str] | None = None
    while len(newest) < MAX_AGENTS:
        got = await fleet.snapshots.all_latest(limit=LATEST_PAGE, after=after)
        for s in got.items:
            mine = newest.get(s.agent)
            if mine is None or s.taken_at >= mine["taken_at"]:  # an agent seen on two hosts: the newer
                newest[s.agent] = {"host": s.host, "taken_at": s.taken_at, "data": s.data,
                                   "diff_fields": s.diff_fields}
        if not got.next_after:
            break
        after = got.next_after
    return newest


def _row(agent: str, a: dict[str, Any], s: dict[str, Any]) -> str:
    changed = set(s.get("diff_fields", ()))
    data = s.get("data", {})
    figures = "".join(
        f'<td class="num{" changed" if k in changed else ""}" data-field="{k}">{esc(_figure(k, data.get(k)))}</td>'
        for k in KEY_FIGURES
    )
    other = ", ".join(sorted(changed - set(KEY_FIGURES)))
    p95 = esc(a.get("p95", ""))
    outcome = a.get("last_outcome") or ""
    return (
        f'<tr data-agent="{esc(agent)}"><td class=agent>{esc(agent)}</td><td class=host>{esc(s.get("host", ""))}</td>'
        f'<td class=action>{esc(a.get("last_action", ""))}</td><td class="outcome {esc(outcome)}">{esc(outcome)}</td>'
        f'<td class=when title="{esc(a.get("last_ts"))}">{esc(ago(a.get("last_ts")))}</td><td class=p95>{p95}</td>'
        f"{figures}<td class=diff>{esc(other)}</td></tr>"
    )


SCRIPT = """
const body = document.querySelector('#agents tbody');
const esc = s => String(s ?? '').replace(/[&<>"]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));
const rows = new Map([...body.rows].map(r => [r.dataset.agent, r]));  // a thousand agents: no scans
function rowOf(agent) {
  let tr = rows.get(agent);
  if (!tr) {
    tr = document.createElement('tr');
    tr.dataset.agent = agent;
    tr.innerHTML = `<td class=agent>${esc(agent)}</td><td class=host></td><td class=action></td><td class=outcome></td>`
      + `<td class=when></td><td class=p95></td>`
      + PAGE.figures.map(f => `<td class=num data-field="${f}"></td>`).join('') + '<td class=diff></td>';
    body.prepend(tr);
    rows.set(agent, tr);
  }
  tr.classList.remove('fresh'); void tr.offsetWidth; tr.classList.add('fresh');
  return tr;
}
function highlight(tr, fields) {
  const other = [];
  tr.querySelectorAll('td[data-field]').forEach(
    td => td.classList.toggle('changed', fields.includes(td.dataset.field)));
  fields.forEach(f => { if (!PAGE.figures.includes(f)) other.push(f); });
  tr.querySelector('td.diff').textContent = other.sort().join(', ');
}
const live = new EventSource('/events');
const say = t => { document.getElementById('live').textContent = t; };
live.addEventListener('ready', () => { document.body.dataset.live = '1'; say(' live'); });
live.addEventListener('attempt', e => {
  const a = JSON.parse(e.data), tr = rowOf(a.agent);
  tr.querySelector('.action').textContent = a.action;
  const o = tr.querySelector('.outcome'); o.textContent = a.outcome; o.className = 'outcome ' + a.outcome;
  const w = tr.querySelector('.when'); w.textContent = 'just now'; w.title = a.ts;
});
live.addEventListener('snapshot', e => {
  const s = JSON.parse(e.data), tr = rowOf(s.agent);
  tr.querySelector('.host').textContent = s.host;
  tr.querySelectorAll('td[data-field]').forEach(td => {
    const v = s.figures[td.dataset.field];
    td.textContent = v == null ? '' : (td.dataset.field.endsWith('_bytes') ? (v / 2 ** 30).toFixed(1) + ' GiB'
      : (typeof v === 'number' && !Number.isInteger(v) ? v.toFixed(2) : String(v)));
  });
  highlight(tr, s.diff_fields);
});
live.addEventListener('diff', e => { const d = JSON.parse(e.data); highlight(rowOf(d.agent), d.diff_fields); });
live.onerror = () => { delete document.body.dataset.live; say(' reconnecting'); };
"""


async def fleet_page(fleet: Fleet) -> bytes:
    agents = await _agents(fleet)
    snapshots = await _snapshots(fleet)
    names = sorted(set(agents) | set(snapshots), key=lambda n: (agents.get(n, {}).get("last_ts") or "", n),
                   reverse=True)
    head = ("<tr><th>agent</th><th>host</th><th>last action</th><th>outcome</th><th>when</th>"
            f"<th>p95 per action (last {P95_LAST_N})</th>"
            + "".join(f"<th>{esc(k)}</th>" for k in KEY_FIGURES) + "<th>other changed</th></tr>")
    rows = "".join(_row(n, agents.get(n, {}), snapshots.get(n, {})) for n in names)
    body = (f"<p class=muted>{len(names)} agents; highlighted: the fields of each agent's last snapshot diff.</p>"
            f"<table id=agents><thead>{head}</thead><tbody>{rows}</tbody></table>")
    return page("Fleet", "/", body, SCRIPT, {"figures": list(KEY_FIGURES)})
