"""The page shell every dashboard page shares: head, navigation, style, a little vanilla JS.

No front-end build and no vendored library: tables, a form and an inline SVG chart are all
these pages draw, and EventSource is in every browser."""

from __future__ import annotations

import html
import json
from datetime import UTC, datetime
from typing import Any

__all__ = ["ago", "esc", "page", "seconds"]

PAGES = (("/", "Fleet"), ("/attempts", "Attempts"), ("/runs", "Runs"), ("/runtimes", "Runtimes"),
         ("/processors", "Processors"), ("/system", "System"))

STYLE = """
body{font:14px system-ui,sans-serif;margin:0;color:#1d232a;background:#f6f7f9}
nav{background:#1d232a;padding:.6em 1em}nav a{color:#cfd6de;margin-right:1.2em;text-decoration:none}
nav a.on{color:#fff;font-weight:600}main{padding:1em}h2{font-size:1.05em;margin:1.4em 0 .5em}
table{border-collapse:collapse;background:#fff;width:100%;margin-bottom:1em}
th,td{border-bottom:1px solid #e3e6ea;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#eef1f4;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
.success,.ok{color:#17803d}.failure,.error,.stale{color:#b42318}
td.changed{background:#fff3bf;font-weight:600}tr.fresh{animation:fresh 2s}
@keyframes fresh{from{background:#d3f9d8}to{background:#fff}}
tr.pane{display:none}tr.pane.open{display:table-row}tr.pane pre{white-space:pre-wrap;max-height:20em;overflow:auto}
tr.row{cursor:pointer}form.filters input{width:9em;margin-right:.6em}.muted{color:#6b7480}
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}s"


def ago(ts: str | None, now: datetime | None = None) -> str:
    """'12s ago' from an ISO time (as published); the time itself when it does not parse."""
    if not ts:
        return ""
    try:
        when = datetime.fromisoformat(ts)
    except ValueError:
        return ts
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    left = ((now or datetime.now(UTC)) - when).total_seconds()
    if left < 120:
        return f"{max(0, int(left))}s ago"
    if left < 7200:
        return f"{int(left // 60)}m ago"
    if left < 172800:
        return f"{int(left // 3600)}h ago"
    return f"{int(left // 86400)}d ago"


def page(title: str, path: str, body: str, script: str = "", data: dict[str, Any] | None = None) -> bytes:
    nav = "".join(f'<a href="{href}"{" class=on" if href == path else ""}>{name}</a>' for href, name in PAGES)
    # `</` inside a script would end it: JSON allows `<\/` for the same text.
    payload = json.dumps(data or {}).replace("</", "<\\/")
    boot = f"<script>const PAGE={payload};</script>" if data else ""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{esc(title)} · fleetlog</title><style>{STYLE}</style></head>"
        f"<body><nav>{nav}<span class=muted id=live></span></nav><main><h1>{esc(title)}</h1>{body}</main>"
        f"{boot}{f'<script>{script}</script>' if script else ''}</body></html>"
    ).encode()
