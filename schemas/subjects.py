"""Subject builders with reversible token escaping.

Subjects carry the identities that routing and permissions need. A token is
escaped so that no identity can break routing or reach another identity's
subjects: `.`, `*`, `>`, whitespace, `%` and non-printable characters become
`%XX` (one per UTF-8 byte). `%` itself is escaped, so escaping is reversible
and an escaped token never contains a lone `%` followed by something else.
"""

from __future__ import annotations

__all__ = [
    "attempt",
    "attempt_purge",
    "diff",
    "escape_token",
    "proc_lock",
    "proc_run",
    "proc_session",
    "reject",
    "run_event",
    "run_events",
    "run_state",
    "runtime",
    "sched_job",
    "snapshot",
    "state",
    "unescape_token",
]

_SAFE_ASCII = frozenset(
    chr(c) for c in range(0x21, 0x7F) if chr(c) not in ".*>%"
)


def _escape_char(ch: str) -> str:
    if ch in _SAFE_ASCII:
        return ch
    if ord(ch) > 0x7F and ch.isprintable() and not ch.isspace():
        return ch  # printable non-ASCII is fine in NATS subjects
    return "".join(f"%{b:02X}" for b in ch.encode("utf-8"))


_cache: dict[str, str] = {}


def escape_token(value: str) -> str:
    """Escape one identity into one subject token. Empty identities are refused."""
    cached = _cache.get(value)
    if cached is not None:
        return cached
    if not isinstance(value, str):
        raise TypeError(f"subject token must be a string, got {type(value).__name__}")
    if value == "":
        raise ValueError("subject token must not be empty")
    out = value if all(c in _SAFE_ASCII for c in value) else "".join(_escape_char(c) for c in value)
    if len(_cache) < 65_536:  # bounded: identities repeat (agents, actions), ids mostly don't
        _cache[value] = out
    return out


def unescape_token(token: str) -> str:
    """Inverse of escape_token."""
    if "%" not in token:
        return token
    out = bytearray()
    i = 0
    while i < len(token):
        ch = token[i]
        if ch == "%":
            out += bytes([int(token[i + 1 : i + 3], 16)])
            i += 3
        else:
            out += ch.encode("utf-8")
            i += 1
    return out.decode("utf-8")


def attempt(agent: str, action: str) -> str:
    return f"fleet.attempt.{escape_token(agent)}.{escape_token(action)}"


# Three tokens, never four: cannot collide with an agent/action attempt subject.
def attempt_purge() -> str:
    return "fleet.attempt.purge"


def run_state(run_id: str) -> str:
    return f"fleet.run.{escape_token(run_id)}.state"


def run_event(run_id: str, sequence: int) -> str:
    """One subject per (run, sequence): first write wins, forever, and is found by a direct get."""
    return f"fleet.run.{escape_token(run_id)}.event.{int(sequence)}"


def run_events(run_id: str) -> str:
    """Every result event of one run (wildcard)."""
    return f"fleet.run.{escape_token(run_id)}.event.*"


def runtime(runtime_id: str, kind: str) -> str:
    return f"fleet.runtime.{escape_token(runtime_id)}.{kind}"


def state(scope: str, scope_hash: str, key_hash: str) -> str:
    return f"fleet.state.{escape_token(scope)}.{escape_token(scope_hash)}.{escape_token(key_hash)}"


def snapshot(host: str, agent: str) -> str:
    return f"fleet.snapshot.{escape_token(host)}.{escape_token(agent)}"


def diff(host: str, agent: str) -> str:
    return f"fleet.diff.{escape_token(host)}.{escape_token(agent)}"


def proc_session(processor: str, session_file: str) -> str:
    return f"fleet.proc.{escape_token(processor)}.session.{escape_token(session_file)}"


def proc_run(processor: str, run_id: str) -> str:
    return f"fleet.proc.{escape_token(processor)}.run.{escape_token(run_id)}"


def proc_lock(processor: str) -> str:
    return f"fleet.proc.{escape_token(processor)}.lock"


def sched_job(job: str) -> str:
    """A scheduler job's state (FLEET_SCHEDULER; a guarded record, not an event)."""
    return f"fleet.sched.{escape_token(job)}.state"


def reject(projection: str) -> str:
    return f"fleet.reject.{escape_token(projection)}"
