"""How a request becomes a reply: its own task, errors mapped to codes, honest `$SRV.STATS`,
and a reply that always fits the connection's max_payload.

nats-py calls a subscription's callback for one message at a time, so each request is
handed to its own task (a slow query or a read-your-writes wait must not hold up the
next). `nats.micro` times and counts only its callback, which then returned at once and
never raised: `$SRV.STATS` said ~30 µs and 0 errors whatever happened. `HonestService`
reports what the tasks measured instead: every error (refused, stale, timed out,
oversize, failed) and the time from the request's arrival to its reply, and in each
endpoint's `data` a latency histogram per outcome (ok / stale / error) for /metrics.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
from fleetlog.services.backbone.errors import StaleError
from fleetlog.services.backbone.replies import GuardedService
from nats.aio.client import Client
from nats.micro.request import Request
from nats.micro.service import ServiceConfig, ServiceStats

__all__ = ["Dispatcher", "HonestService", "ReplyTooBig", "fit_reply", "note_lag"]

log = logging.getLogger("fleetlog.query")

_encode = msgspec.json.Encoder().encode
A = TypeVar("A")


class ReplyTooBig(Exception):
    """The answer cannot be cut to fit the connection's max_payload (a 413)."""


# Upper bounds (seconds) of the latency histogram's buckets; the last, +Inf, is implied.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
OUTCOMES = ("ok", "stale", "error")


@dataclass
class _Latency:
    """One outcome's histogram: requests per bucket (not cumulative; the last is +Inf), their sum."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    sum_s: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        self.sum_s += seconds


@dataclass
class _Counters:
    errors: int = 0
    last_error: str | None = None
    processing_ns: int = 0
    epoch: int = 0  # bumped by a reset: a request that arrived before it is not counted after
    latency: dict[str, _Latency] = field(default_factory=lambda: {o: _Latency() for o in OUTCOMES})
    # The lag (messages, seconds per stream) stamped on the endpoint's latest answer: how far
    # behind the streams the view was when it last answered here.
    lag: dict[str, int] = field(default_factory=dict)
    lag_s: dict[str, float] = field(default_factory=dict)

    def clear(self) -> None:
        self.errors, self.last_error, self.processing_ns = 0, None, 0
        self.latency = {o: _Latency() for o in OUTCOMES}
        self.epoch += 1

    def data(self) -> dict[str, Any]:
        """The endpoint's `data` in `$SRV.STATS`: what /metrics turns into a histogram."""
        return {"latency_buckets_s": list(LATENCY_BUCKETS_S),
                "latency": {o: {"counts": list(h.counts), "sum_s": h.sum_s} for o, h in self.latency.items()},
                "lag": dict(self.lag), "lag_s": dict(self.lag_s)}


# The counters of the endpoint whose request the current task answers (each request runs in
# its own task, so this is per request): lets `stamp` note the lag without knowing the endpoint.
_answering: ContextVar[_Counters | None] = ContextVar("fleetlog_answering", default=None)


def note_lag(lag: dict[str, int], lag_s: dict[str, float]) -> None:
    """Record an answer's lag in its endpoint's `$SRV.STATS` data (no-op outside a request)."""
    counters = _answering.get()
    if counters is not None:
        counters.lag, counters.lag_s = dict(lag), dict(lag_s)


class HonestService(GuardedService):
    """A `nats.micro` service whose STATS carry the counters the request tasks keep, and that
    answers only private replies (`GuardedService`)."""

    def __init__(self, client: Client, config: ServiceConfig) -> None:
        super().__init__(client, config)
        self.counters: dict[str, _Counters] = {}

    def stats(self) -> ServiceStats:
        stats = super().stats()
        for ep in stats.endpoints:
            mine = self.counters.get(ep.name)
            if mine is None:
                continue
            ep.num_errors += mine.errors
            ep.last_error = mine.last_error or ep.last_error
            ep.processing_time = mine.processing_ns
            ep.average_processing_time = mine.processing_ns // max(1, ep.num_requests)
            ep.data = mine.data()
        return stats

    async def reset(self) -> None:
        """Zero every endpoint's counters and ours (nats-py's reset only moved `started`, so
        requests counted before a reset stayed, and our errors could exceed them after)."""
        await super().reset()
        for ep in self._endpoints:
            ep._reset()
            ep._last_error = None
        for mine in self.counters.values():
            mine.clear()


Handler = Callable[[Request], Awaitable[None]]


class Dispatcher:
    """Wraps endpoint functions: a task per request, error replies, counters."""

    def __init__(self, service: HonestService) -> None:
        self.service = service
        self.tasks: set[asyncio.Task[None]] = set()

    def handler(self, endpoint: str, fn: Handler) -> Handler:
        counters = self.service.counters.setdefault(endpoint, _Counters())

        async def handle(req: Request) -> None:
            if self.service.refuse_reply(req._msg):
                return
            started = time.perf_counter_ns()
            task = asyncio.create_task(self._run(fn, req, counters, started))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

        return handle

    async def _run(self, fn: Handler, req: Request, counters: _Counters, started: int) -> None:
        failed: tuple[str, str] | None = None
        epoch = counters.epoch
        _answering.set(counters)
        try:
            await fn(req)
        except StaleError as exc:
            failed = ("stale", str(exc))
        except TimeoutError as exc:
            failed = ("408", str(exc))
        except ReplyTooBig as exc:
            failed = ("413", str(exc))
        except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
            failed = ("400", f"bad request: {exc}")
        except KeyError as exc:
            failed = ("404", str(exc.args[0]) if exc.args else "not found")
        except Exception as exc:
            log.exception("query %s failed", req.subject)
            failed = ("500", f"{type(exc).__name__}: {exc}")
        if failed is not None:
            await _error(req, *failed)
        if counters.epoch != epoch:
            return  # the counters were reset while this request ran: it belongs to before
        if failed is not None:
            counters.errors += 1
            counters.last_error = f"{failed[0]}: {failed[1]}"[:1000]
        took = time.perf_counter_ns() - started
        counters.processing_ns += took
        outcome = "ok" if failed is None else "stale" if failed[0] == "stale" else "error"
        counters.latency[outcome].observe(took / 1e9)

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Let the requests in hand finish, all within `timeout_s` (not that much each in
        turn), then cancel what is left."""
        tasks = list(self.tasks)
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=timeout_s)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late, timeout=1.0)


async def _error(req: Request, code: str, message: str) -> None:
    flat = " ".join(message.split())[:1000]
    body = _encode({"error": {"code": code, "message": message[:16_000]}})
    with contextlib.suppress(Exception):
        await req.respond_error(code, flat, data=body)


def fit_reply(answer: Any, limit: int, cut: Callable[[Any, int], Any] | None = None, *,
              items: str = "items", keep_at_least: int = 0, count: Callable[[Any], int] | None = None) -> bytes:
    """The encoded answer, within `limit` bytes (the connection's max_payload).

    Too big: with `cut(answer, n)` (the answer with only the first n of its `items`, saying
    there are more) the largest n (at least `keep_at_least`, at most `count(answer)`, by
    default the length of `items`) that fits, else ReplyTooBig naming the limit — never a
    MaxPayloadError on the way out.
    """
    data = _encode(answer)
    if len(data) <= limit:
        return data
    if cut is not None:
        total = count(answer) if count is not None else len(getattr(answer, items))
        lo, hi, best = keep_at_least, total - 1, None
        while lo <= hi:  # binary search on the item count: each try is one encode
            mid = (lo + hi) // 2
            tried = _encode(cut(answer, mid))
            if len(tried) <= limit:
                best, lo = tried, mid + 1
            else:
                hi = mid - 1
        if best is not None:
            return best
    raise ReplyTooBig(
        f"the reply is {len(data)} bytes, over the connection's max_payload of {limit} bytes; ask for fewer items"
    )
