"""The System page: streams, projections with their lag (sequence and seconds), the newest
rejects with reasons, and the publisher spool of this node.

Streams and projections are this node's `fleetlog.node.<id>.status` (on a cluster every node
folds its own views, so "this node" is the one to show); rejects are `fleetlog.rejects`."""

from __future__ import annotations

from pathlib import Path

from fleetlog.schemas.answers import StatusAnswer
from fleetlog.services.client.fleet import Fleet
from fleetlog.services.dashboard.layout import esc, page

__all__ = ["spool_bytes", "system_page"]

REJECTS_SHOWN = 20


def spool_bytes(spool_dir: Path) -> int:
    """Bytes waiting in this node's spool directory (events not yet in JetStream)."""
    if not spool_dir.is_dir():
        return 0
    total = 0
    for f in spool_dir.rglob("*"):
        try:
            if f.is_file():
                total += f.stat().st_size
        except OSError:  # a segment removed while we looked: it was delivered
            continue
    return total


def _kv(d: dict[str, int] | dict[str, float], fmt: str = "{}") -> str:
    return "<br>".join(f"{esc(k)}: {fmt.format(v)}" for k, v in sorted(d.items()))


async def system_page(fleet: Fleet, status: StatusAnswer, spool_dir: Path) -> bytes:
    rejects = await fleet.rejects(limit=REJECTS_SHOWN)
    streams = "".join(
        f"<tr><td>{esc(s.name)}</td><td class=num>{s.messages}</td><td class=num>{s.bytes}</td>"
        f"<td class=num>{s.first_seq}</td><td class=num>{s.last_seq}</td></tr>" for s in status.streams
    )
    projections = "".join(
        f'<tr data-projection="{esc(p.name)}"><td>{esc(p.name)}</td><td class=num>{p.version}</td>'
        f"<td class=num>{p.generation}</td><td>{esc(p.state)}</td><td>{_kv(p.checkpoints)}</td>"
        f"<td class=lag>{_kv(p.lag)}</td><td>{_kv(p.lag_seconds, '{:.1f}s')}</td><td class=num>{p.rejects}</td>"
        f"<td>{_kv(p.rows)}</td></tr>" for p in status.projections
    )
    reject_rows = "".join(
        f"<tr><td>{esc(r.rejected_at)}</td><td>{esc(r.projection)}</td><td>{esc(r.stream)}</td>"
        f"<td class=num>{r.seq}</td><td>{esc(r.subject)}</td><td class=reason>{esc(r.reason)}</td></tr>"
        for r in rejects.items
    )
    pub = fleet.publisher_stats()
    body = (
        f"<p class=muted>node {esc(status.node)} · {esc(status.node_state)} · rejects in total "
        f"{status.rejects_total}</p>"
        "<h2>Streams</h2><table id=streams><thead><tr><th>stream</th><th>messages</th><th>bytes</th><th>first seq</th>"
        f"<th>last seq</th></tr></thead><tbody>{streams}</tbody></table>"
        "<h2>Projections</h2><table id=projections><thead><tr><th>projection</th><th>version</th><th>generation</th>"
        "<th>state</th><th>checkpoint</th><th>lag (messages)</th><th>lag (seconds)</th><th>rejects</th><th>rows</th>"
        f"</tr></thead><tbody>{projections}</tbody></table>"
        "<h2>Newest rejects</h2><table id=rejects><thead><tr><th>when</th><th>projection</th><th>stream</th>"
        f"<th>seq</th><th>subject</th><th>reason</th></tr></thead><tbody>{reject_rows}</tbody></table>"
        "<h2>Publisher spool of this node</h2><table id=spool><tbody>"
        f"<tr><td>spool directory</td><td>{esc(spool_dir)}</td></tr>"
        f"<tr><td>bytes waiting on disk</td><td class=num>{spool_bytes(spool_dir)}</td></tr>"
        f"<tr><td>dashboard client: queued / in flight / spooled</td><td class=num>{pub.queued} / {pub.inflight} / "
        f"{pub.spool_pending}</td></tr></tbody></table>"
    )
    return page("System", "/system", body)
