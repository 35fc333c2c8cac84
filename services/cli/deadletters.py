"""What `fleetlog status` says about events set aside on this machine (`<spool>/dead-letter.jsonl`).

Agents' publishers run in their own processes: their counters die with them, but every event
they set aside (refused by the broker, e.g. "permission denied", or unencodable) is a line in
the spool dir's dead-letter file, which the node's own publishers (the reactors') share when
they run on the same data dir. So `status` reads the file, not any process."""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path

import msgspec

__all__ = ["DeadLetters", "dead_letters"]

_NEWEST = 5


class DeadLetter(msgspec.Struct):
    subject: str
    reason: str


class DeadLetters(msgspec.Struct):
    file: str
    count: int = 0
    permission_denied: int = 0
    unreadable: int = 0  # lines that are not a dead letter (a torn last line after a crash)
    newest: list[DeadLetter] = msgspec.field(default_factory=list)  # newest last


def dead_letters(spool_dir: Path) -> DeadLetters:
    """Counts and the newest reasons of `<spool_dir>/dead-letter.jsonl` (zeros when there is none)."""
    path = Path(spool_dir) / "dead-letter.jsonl"
    out = DeadLetters(file=str(path))
    newest: deque[DeadLetter] = deque(maxlen=_NEWEST)
    try:
        f = open(path, encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return out
    with f:
        for line in f:  # streamed: the file grows without bound while nobody clears it
            try:
                body = json.loads(line)
                letter = DeadLetter(str(body["subject"]), str(body["reason"]))
            except (ValueError, KeyError, TypeError):
                out.unreadable += 1
                continue
            out.count += 1
            out.permission_denied += letter.reason.startswith("permission denied")
            newest.append(letter)
    out.newest = list(newest)
    return out
