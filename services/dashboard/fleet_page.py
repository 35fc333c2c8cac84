"""The Fleet page: one row per agent, kept live by the facts as they are published.

Per agent: host, last action, its outcome and when, p95 elapsed per action over the agent's
last N attempts of it (the rows the dashboard keeps, fleet_summary.py: the house p95, the
sorted sample at max(0, floor(0.95·(n−1)))), and its latest snapshot's key figures with the
fields of its last diff highlighted (`fleetlog.snapshots.latest`, read at each load)."""

from __future__ import annotations

import asyncio
from typing import Any

from fleetlog.services.client.fleet import Fleet
from fleetlog.services.dashboard.fleet_summary import MAX_AGENTS, P95_LAST_N, STREAM, AgentSummary
from fleetlog.services.dashboard.layout import ago, esc, page
from fleetlog.services.dashboard.live import KEY_FIGURES
from nats.aio.client import Client

__all__ = ["fleet_page", "newest_facts"]

LATEST_PAGE = 500  # snapshots.latest's own limit
SNAPSHOTS = "FLEET_SNAPSHOTS"


def _figure(name: str, value: Any) -> str:
    if value is None:
        return ""
    if name.endswith("_bytes") and isinstance(value, int | float):
        return f"{value / 2**30:.1f} GiB"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


async def _snapshots(fleet: Fleet, min_seq: int = 0) -> dict[str, dict[str, Any]]:
    newest: dict[str, dict[str, Any]] = {}
    after: list[str] | None = None
    while len(newest) < MAX_AGENTS:
        got = await fleet.snapshots.all_latest(limit=LATEST_PAGE, after=after,
                                               min_seq={SNAPSHOTS: min_seq} if min_seq else None)
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


async def fleet_page(fleet: Fleet, summary: AgentSummary) -> bytes:
    agents, snapshots = await asyncio.gather(summary.current(), _snapshots(fleet))
    names = sorted(set(agents) | set(snapshots), key=lambda n: (agents.get(n, {}).get("last_ts") or "", n),
                   reverse=True)
    head = ("<tr><th>agent</th><th>host</th><th>last action</th><th>outcome</th><th>when</th>"
            f"<th>p95 per action (last {P95_LAST_N})</th>"
            + "".join(f"<th>{esc(k)}</th>" for k in KEY_FIGURES) + "<th>other changed</th></tr>")
    rows = "".join(_row(n, agents.get(n, {}), snapshots.get(n, {})) for n in names)
    body = (f"<p class=muted>{len(names)} agents; highlighted: the fields of each agent's last snapshot diff.</p>"
            f"<table id=agents><thead>{head}</thead><tbody>{rows}</tbody></table>")
    return page("Fleet", "/", body, SCRIPT, {"figures": list(KEY_FIGURES)})


async def newest_facts(fleet: Fleet, summary: AgentSummary, nc: Client) -> list[dict[str, Any]]:
    """Each agent's newest attempt and snapshot as the views hold them once they have folded
    up to the streams' ends as of now, in the live events' shapes: what the live view sends
    after it missed facts, so that an open page converges (live.py)."""
    js = nc.jetstream()
    ends = {name: (await js.stream_info(name)).state.last_seq for name in (STREAM, SNAPSHOTS)}
    rows, snaps = await asyncio.gather(summary.fresh(ends[STREAM]), _snapshots(fleet, ends[SNAPSHOTS]))
    facts: list[dict[str, Any]] = [
        {"kind": "attempt", "agent": agent, "action": r["last_action"], "outcome": r["last_outcome"],
         "ts": r["last_ts"]}
        for agent, r in rows.items() if r.get("last_action") is not None]
    facts += [{"kind": "snapshot", "ts": s["taken_at"], "host": s["host"], "agent": agent,
               "figures": {k: s["data"][k] for k in KEY_FIGURES if k in s["data"]},
               "diff_fields": list(s["diff_fields"])} for agent, s in snaps.items()]
    return facts
