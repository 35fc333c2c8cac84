"""Shared helpers for the fleetlog benches (not a bench itself).

Every bench is standalone: `python bench/<name>.py [--n N]`. Each starts its own
nats-server (JetStream, file store) in a temp dir on a free port, and removes it
at the end unless told to keep it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fleetlog.services.backbone.config import FleetSettings
from fleetlog.services.node.broker import EmbeddedBroker, free_port

ACTIONS = [f"action-{i:02d}" for i in range(20)]
OUTCOMES = ["success", "precondition_fail", "send_error", "completion_timeout", "skipped_by_policy"]
AGENTS = [f"agent-{i:02d}" for i in range(50)]
OUTCOME_WEIGHTS = [70, 10, 8, 7, 5]


def pane_text(n_bytes: int, seed: int = 0) -> str:
    """A terminal-ish pane: printable lines, n_bytes long."""
    rng = random.Random(seed)
    words = ["$", "ls", "-la", "git", "status", "ok", "error:", "nonce", "0x3f2a", "done", "retry", "=>", "[INFO]"]
    out: list[str] = []
    size = 0
    while size < n_bytes:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        out.append(line)
        size += len(line) + 1
    return "\n".join(out)[:n_bytes]


class AttemptFactory:
    """Realistic record() arguments: ~20 actions, 5 outcomes, 50 agents, a pane, small extras."""

    def __init__(self, pane_bytes: int = 2048, seed: int = 1, ts_spread_days: float | None = None) -> None:
        self.rng = random.Random(seed)
        self.pane_bytes = pane_bytes
        # Panes differ from event to event: windows into a 256 KB terminal-ish text.
        self.corpus = pane_text(256 * 1024 + pane_bytes, seed) if pane_bytes else ""
        self.ts_spread_days = ts_spread_days
        self.t0 = datetime.now(UTC) - timedelta(days=ts_spread_days or 0)

    def kwargs(self, i: int, n: int = 1) -> dict[str, Any]:
        rng = self.rng
        kw: dict[str, Any] = {
            "agent": AGENTS[i % len(AGENTS)],
            "action": ACTIONS[rng.randrange(len(ACTIONS))],
            "outcome": rng.choices(OUTCOMES, OUTCOME_WEIGHTS)[0],
            "elapsed_s": round(rng.expovariate(1 / 1.5), 4),
            "pane_before": self._pane(i),
            "pane_after": None,
            "extras": {"polls": rng.randrange(10), "model": "m-7", "retry": i % 3 == 0},
        }
        if self.ts_spread_days:
            # Event times spread over the last ts_spread_days, in arrival order with jitter.
            frac = i / max(1, n)
            ts = self.t0 + timedelta(days=self.ts_spread_days * frac, seconds=rng.uniform(-30, 0))
            kw["ts"] = ts.isoformat()
        return kw

    def _pane(self, i: int) -> str | None:
        if not self.pane_bytes:
            return None
        o = (i * 7919) % (len(self.corpus) - self.pane_bytes)
        return self.corpus[o : o + self.pane_bytes]

    def batch(self, start: int, count: int, n: int) -> list[dict[str, Any]]:
        return [self.kwargs(i, n) for i in range(start, start + count)]


def percentiles(samples_us: Sequence[float], ps: Iterable[float] = (50, 99, 99.9)) -> dict[str, float]:
    s = sorted(samples_us)
    out: dict[str, float] = {}
    for p in ps:
        k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
        out[f"p{p:g}"] = s[k]
    out["max"] = s[-1]
    out["mean"] = sum(s) / len(s)
    return out


def machine() -> dict[str, Any]:
    import duckdb

    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gib = 0.0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem_gib = int(line.split()[1]) / 1024 / 1024
                break
    try:
        nats_v = subprocess.run([_nats_server(), "--version"], capture_output=True, text=True).stdout.strip()
    except Exception:
        nats_v = "?"
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "mem_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "duckdb": duckdb.__version__,
        "nats_server": nats_v.replace("nats-server: ", ""),
    }


def _nats_server() -> str:
    from fleetlog.services.node.broker import find_nats_server

    return find_nats_server()


@contextlib.asynccontextmanager
async def broker(
    keep: Path | None = None, prefix: str = "fleetlog-bench-", *, secure: bool = False
) -> AsyncIterator[tuple[EmbeddedBroker, Path]]:
    """A private nats-server (`secure`: with accounts and identities, as `up --secure`); yields
    (broker, workdir). workdir is removed unless `keep` is given."""
    work = Path(keep) if keep is not None else Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    b = EmbeddedBroker(work / "broker", port=free_port(), secure=secure)
    await b.start()
    try:
        yield b, work
    finally:
        await b.stop()
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)


def settings_for(url: str, data_dir: Path, **kw: Any) -> FleetSettings:
    return FleetSettings(nats_url=url, data_dir=data_dir, spool_dir=data_dir / "spool", **kw)


def serve_subprocess(url: str, data_dir: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """`fleetlog serve --nats URL --data-dir D` as its own process."""
    exe = Path(sys.executable).with_name("fleetlog")
    cmd = [str(exe), "serve", "--nats", url, "--data-dir", str(data_dir)]
    if not exe.exists():
        cmd = [sys.executable, "-c", "from fleetlog.services.cli import main; main()", "serve",
               "--nats", url, "--data-dir", str(data_dir)]
    log = open(log_path, "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc


def stop_subprocess(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def emit_json(name: str, results: dict[str, Any]) -> None:
    print("JSON " + json.dumps({"bench": name, "machine": machine(), **results}, default=str))


def now_ns() -> int:
    return time.perf_counter_ns()


class CpuMonitor:
    """How busy the machine was during a measurement, and how much of it was not us.

    Reads /proc/stat (all CPUs) and psutil CPU times of this process and its
    children (the broker, a `fleetlog serve` subprocess) at start and stop.
    `foreign_cores` > ~0.1 means something else on the machine competed.
    """

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._t0 = 0.0
        self._stat0: list[int] = []
        self._ours0: dict[int, float] = {}
        self._load0 = 0.0

    @staticmethod
    def _stat() -> list[int]:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]

    def _ours(self) -> dict[int, float]:
        me = self._psutil.Process()
        out: dict[int, float] = {}
        for p in [me, *me.children(recursive=True)]:
            with contextlib.suppress(self._psutil.Error):
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
        return out

    def start(self) -> CpuMonitor:
        self._load0 = os.getloadavg()[0]
        self._t0 = time.perf_counter()
        self._stat0 = self._stat()
        self._ours0 = self._ours()
        return self

    def stop(self) -> dict[str, float]:
        dt = time.perf_counter() - self._t0
        s1 = self._stat()
        d = [b - a for a, b in zip(self._stat0, s1, strict=False)]
        hz = os.sysconf("SC_CLK_TCK")
        # user nice system idle iowait irq softirq steal
        busy = (d[0] + d[1] + d[2] + d[5] + d[6]) / hz
        steal = d[7] / hz if len(d) > 7 else 0.0
        ours1 = self._ours()
        ours = sum(v - self._ours0.get(pid, 0.0) for pid, v in ours1.items())
        return {
            "wall_s": round(dt, 2),
            "busy_cores": round(busy / dt, 2),
            "ours_cores": round(ours / dt, 2),
            "foreign_cores": round(max(0.0, busy - ours) / dt, 2),
            "steal_cores": round(steal / dt, 3),
            "loadavg_1m": os.getloadavg()[0],
            "loadavg_1m_at_start": round(self._load0, 2),
        }


def thread_cpu(labels: dict[int, str] | None = None) -> dict[str, float]:
    """CPU seconds (user + system) per thread of this process, summed by thread name
    (`/proc/self/task/*/stat`, `comm`), plus "children" (the broker, subprocesses).

    Python does not name OS threads, so `labels` maps native thread ids to names (e.g. the
    projector's fold thread); the main thread is the event loop; other threads (DuckDB's
    workers, pyarrow's) keep their OS name. Diff two calls to see where a run's CPU went.
    """
    import psutil

    hz = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    main_tid = os.getpid()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        key = "event loop (main thread)" if int(tid) == main_tid else (labels or {}).get(int(tid), name)
        out[key] = out.get(key, 0.0) + (int(fields[11]) + int(fields[12])) / hz  # utime + stime
        out[key + " (kernel)"] = out.get(key + " (kernel)", 0.0) + int(fields[12]) / hz
    children = 0.0
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            children += t.user + t.system
    out["children (nats-server)"] = children
    return out


def thread_cpu_per_event(before: dict[str, float], after: dict[str, float], events: int) -> dict[str, float]:
    """µs of CPU per event by thread name between two `thread_cpu()` readings (threads that
    ended in between are not counted)."""
    per = {k: (after[k] - before.get(k, 0.0)) * 1e6 / events for k in after}
    per = {k: round(v, 2) for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if v >= 0.05}
    per["total"] = round(sum(v for k, v in per.items() if not k.endswith("(kernel)")), 2)
    return per


def attempt_payloads(fac: AttemptFactory, start: int, count: int, n: int) -> list[tuple[str, str, bytes]]:
    """(event id, subject, payload) exactly as `fleet.attempts.record()` would publish them."""
    from fleetlog.schemas import AttemptRecorded, encode_event, new_event_id, now_iso
    from fleetlog.services.client.attempts.panes import normalize_pane

    out = []
    for i in range(start, start + count):
        kw = fac.kwargs(i, n)
        ev = AttemptRecorded(
            id=new_event_id(), ts=kw.get("ts") or now_iso(), agent=kw["agent"], action=kw["action"],
            outcome=kw["outcome"], elapsed_s=kw["elapsed_s"],
            pane_before=normalize_pane("pane_before", kw["pane_before"], 4096),
            pane_after=normalize_pane("pane_after", kw["pane_after"], 4096), extras=kw["extras"],
        )
        out.append((ev.id, ev.subject(), encode_event(ev)))
    return out


async def raw_publish_attempts(url: str, n: int, fac: AttemptFactory, window: int = 20_000,
                               chunk: int = 5_000) -> dict[str, Any]:
    """Load N attempts into FLEET_ATTEMPTS fast: a bare NATS protocol client.

    Same bytes as the SDK publishes (`Nats-Msg-Id` header, acked publish with a
    reply subject), but with none of nats-py's per-message objects: at most
    `window` publishes unacked; acks are counted, not decoded (errors are).
    The streams must exist (start a `Fleet` or the server first).
    """
    import asyncio
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 4222)
    await reader.readline()  # INFO
    writer.write(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true,'
                 b'"protocol":1,"echo":false}\r\nPING\r\nSUB _INBOX.bload.* 1\r\n')
    acked = 0
    errors = 0
    sent = 0
    progress = asyncio.Event()
    done = asyncio.Event()

    async def read_acks() -> None:
        nonlocal acked, errors
        tail = b""
        while True:
            data = await reader.read(1 << 20)
            if not data:
                return
            buf = tail + data
            acked += buf.count(b"MSG _INBOX.bload.")
            errors += buf.count(b'"error"')
            if b"PING\r\n" in buf:
                writer.write(b"PONG\r\n")
            tail = buf[-24:]
            # a token split across reads would be counted twice: strip a complete one from the tail
            if b"MSG _INBOX.bload." in tail:
                tail = tail[tail.rindex(b"MSG _INBOX.bload.") + 1:]
            progress.set()
            if acked >= n:
                done.set()

    task = asyncio.create_task(read_acks())
    t0 = time.perf_counter()
    gen_s = 0.0
    for base in range(0, n, chunk):
        g0 = time.perf_counter()
        items = attempt_payloads(fac, base, min(chunk, n - base), n)
        parts_out = []
        for eid, subj, payload in items:
            hdr = b"NATS/1.0\r\nNats-Msg-Id: %s\r\n\r\n" % eid.encode()
            parts_out.append(b"HPUB %s _INBOX.bload.x %d %d\r\n%s%s\r\n" % (
                subj.encode(), len(hdr), len(hdr) + len(payload), hdr, payload))
        gen_s += time.perf_counter() - g0
        while sent - acked > window:
            progress.clear()
            await progress.wait()
        writer.write(b"".join(parts_out))
        await writer.drain()
        sent += len(items)
    await asyncio.wait_for(done.wait(), 300)
    dt = time.perf_counter() - t0
    task.cancel()
    writer.close()
    if errors:
        raise RuntimeError(f"{errors} publishes refused by JetStream")
    return {"n": n, "seconds": round(dt, 2), "events_per_s": round(n / dt), "generate_s": round(gen_s, 2)}


async def wait_service(fleet: Any, timeout: float = 60.0) -> None:
    """Until the query service answers `fleetlog.status` (a `fleetlog serve` just started)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await fleet.status(timeout=2)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
