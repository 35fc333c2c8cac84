"""`GET /metrics`: this node's figures in the Prometheus text format (prometheus-client).

Nothing is counted twice: each scrape reads the counters that already exist, from where
they live — this node's status (`fleetlog.node.<id>.status`: stream heads, checkpoints,
lag in messages and seconds, rejects, rows), the query service's `$SRV.STATS` (requests,
errors and processing time per endpoint), and the in-process counters a `NodeProbe` hands
over (events folded, the projector's batch size / fold time histograms and rejects by kind,
leases swept, runtimes marked stale, the node's publishers); the query latency histograms
come in each endpoint's `data` of `$SRV.STATS`. Names are
listed in docs/operations.md ("Metrics")."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
from fleetlog.schemas.answers import StatusAnswer
from fleetlog.services.client import activity
from fleetlog.services.projector.fold_stats import FoldStats, Histogram
from fleetlog.services.writepath.receipt import PublisherStats
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "Local", "NodeProbe", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class NodeProbe:
    """What the node process counts in memory, read at each scrape (cheap: no locks, no I/O)."""

    node_id: Callable[[], str] = lambda: ""
    folded: Callable[[], int] = lambda: 0
    counters: Callable[[], dict[str, int]] = dict  # reactor counts: lease_sweeps, stale_marks, ...
    publishers: Callable[[], list[tuple[str, PublisherStats]]] = list
    fold_stats: Callable[[], FoldStats | None] = lambda: None  # the projector's batch/fold/reject counters
    # What this process's clients did (claims, lost races, diffs, hook runs): services/client/activity.py.
    activity: Callable[[], dict[tuple[str, tuple[str, ...]], int]] = activity.counts


@dataclass
class Local:
    """Figures of the dashboard itself, read by the scrape: the spool on disk, the live feed."""

    spool_bytes: int = 0
    live: dict[str, int] | None = None  # LiveFeed.figures()


REACTOR_COUNTERS = {
    "swept": ("fleetlog_lease_sweeps", "claimed runs whose lease had passed, released by the lease sweeper"),
    "marked": ("fleetlog_stale_marks", "runtimes marked stale by the supervisor"),
}


ACTIVITY = {
    activity.CLAIMS: ("fleetlog_claims", "runs claimed by this process's clients", ()),
    activity.LOST_RACES: ("fleetlog_lost_races", "guarded writes of this process's clients that lost to "
                          "another writer, per write (claim, snapshot)", ("write",)),
    activity.DIFFS: ("fleetlog_diffs_published", "snapshot diff records this process's clients published", ()),
    activity.HOOK_RUNS: ("fleetlog_hook_runs", "snapshot hook runs (on_diff, watch --exec/--post) in this "
                         "process, per hook and outcome (ok, failed, dropped)", ("hook", "outcome")),
}
LIVE = {
    "received": "facts the live view decoded",
    "sent": "coalesced updates queued to open pages",
    "dropped_page": "updates a page did not read in time (its queue was full)",
    "dropped_nats": "facts NATS dropped to the live view's subscription (slow consumer)",
    "resyncs": "times the live view re-read the newest per agent after NATS dropped facts",
    "refused": "facts the live view did not show: undecodable, or a payload that disagrees with its subject",
}


class _Scrape(Collector):
    def __init__(self, status: StatusAnswer | None, stats: dict[str, Any] | None, probe: NodeProbe,
                 publishers: list[tuple[str, PublisherStats]], local: Local) -> None:
        self.status, self.stats, self.probe, self.publishers, self.local = status, stats, probe, publishers, local

    def collect(self) -> Iterable[Metric]:
        yield from self._views()
        yield from self._queries()
        yield from self._node()

    def _views(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("fleetlog_node_serving", "1 when this node answers queries (caught up)")
        up.add_metric([], 1.0 if self.status is not None and self.status.node_state == "serving" else 0.0)
        yield up
        if self.status is None:
            return
        last = GaugeMetricFamily("fleetlog_stream_last_seq", "the stream's last sequence", labels=["stream"])
        msgs = GaugeMetricFamily("fleetlog_stream_messages", "messages the stream holds", labels=["stream"])
        size = GaugeMetricFamily("fleetlog_stream_bytes", "bytes the stream holds", labels=["stream"])
        for s in self.status.streams:
            last.add_metric([s.name], s.last_seq)
            msgs.add_metric([s.name], s.messages)
            size.add_metric([s.name], s.bytes)
        yield from (last, msgs, size)
        labels = ["projection", "stream"]
        cp = GaugeMetricFamily("fleetlog_projection_checkpoint", "last folded stream sequence", labels=labels)
        lag = GaugeMetricFamily("fleetlog_projection_lag_messages", "messages not folded yet", labels=labels)
        lag_s = GaugeMetricFamily("fleetlog_projection_lag_seconds", "age of the oldest unfolded message",
                                  labels=labels)
        rej = CounterMetricFamily("fleetlog_projection_rejects", "events the projection refused (see `fleetlog "
                                  "rejects` for reasons)", labels=["projection"])
        rows = GaugeMetricFamily("fleetlog_projection_rows", "rows per table of the live view",
                                 labels=["projection", "table"])
        for p in self.status.projections:
            if p.state != "live":
                continue
            for stream, seq in p.checkpoints.items():
                cp.add_metric([p.name, stream], seq)
            for stream, n in p.lag.items():
                lag.add_metric([p.name, stream], n)
            for stream, secs in p.lag_seconds.items():
                lag_s.add_metric([p.name, stream], secs)
            rej.add_metric([p.name], p.rejects)
            for table, n in p.rows.items():
                rows.add_metric([p.name, table], n)
        yield from (cp, lag, lag_s, rej, rows)

    def _queries(self) -> Iterator[Metric]:
        if not self.stats:
            return
        req = CounterMetricFamily("fleetlog_query_requests", "requests answered, per endpoint", labels=["endpoint"])
        err = CounterMetricFamily("fleetlog_query_errors", "requests answered with an error (stale included)",
                                  labels=["endpoint"])
        took = CounterMetricFamily("fleetlog_query_processing_seconds", "time spent answering, per endpoint",
                                   labels=["endpoint"])
        for ep in self.stats.get("endpoints") or ():
            name = str(ep.get("name", ""))
            req.add_metric([name], int(ep.get("num_requests", 0)))
            err.add_metric([name], int(ep.get("num_errors", 0)))
            took.add_metric([name], int(ep.get("processing_time", 0)) / 1e9)
        yield from (req, err, took)
        latency = HistogramMetricFamily("fleetlog_query_latency_seconds", "time from a request's arrival to its "
                                        "reply, per endpoint and outcome (ok, stale, error)",
                                        labels=["endpoint", "outcome"])
        for ep in self.stats.get("endpoints") or ():
            data = ep.get("data") or {}
            bounds = data.get("latency_buckets_s") or []
            for outcome, hist in sorted((data.get("latency") or {}).items()):
                latency.add_metric([str(ep.get("name", "")), outcome], _cumulative(bounds, hist["counts"]),
                                   float(hist["sum_s"]))
        yield latency

    def _node(self) -> Iterator[Metric]:
        folded = CounterMetricFamily("fleetlog_projector_events_folded", "events this node's projector folded")
        folded.add_metric([], self.probe.folded())
        yield folded
        counts = self.probe.counters()
        for key, (name, doc) in REACTOR_COUNTERS.items():
            fam = CounterMetricFamily(name, doc)
            fam.add_metric([], counts.get(key, 0))
            yield fam
        fams: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
            "accepted": CounterMetricFamily("fleetlog_publisher_enqueued", "events accepted by record()/emit()",
                                            labels=["client"]),
            "acked": CounterMetricFamily("fleetlog_publisher_acked", "events JetStream acknowledged",
                                         labels=["client"]),
            "retried": CounterMetricFamily("fleetlog_publisher_retried", "publishes sent again after a transient "
                                           "refusal", labels=["client"]),
            "spooled": CounterMetricFamily("fleetlog_publisher_spooled", "events written to the local spool",
                                           labels=["client"]),
            "dead_lettered": CounterMetricFamily("fleetlog_publisher_dead_lettered", "events set aside as "
                                                 "undeliverable", labels=["client"]),
            "inflight": GaugeMetricFamily("fleetlog_publisher_inflight", "publishes awaiting their ack",
                                          labels=["client"]),
            "queued": GaugeMetricFamily("fleetlog_publisher_queued", "events in memory, not yet sent",
                                        labels=["client"]),
            "spool_pending": GaugeMetricFamily("fleetlog_publisher_spool_pending", "events waiting in the spool",
                                               labels=["client"]),
        }
        for client, stats in [*self.probe.publishers(), *self.publishers]:
            for key, family in fams.items():
                family.add_metric([client], getattr(stats, key))
        yield from fams.values()
        spool = GaugeMetricFamily("fleetlog_publisher_spool_bytes", "bytes on disk in this node's spool "
                                  "directory: events not yet in JetStream, and the spool's bookkeeping")
        spool.add_metric([], self.local.spool_bytes)
        yield spool
        yield from self._folds()
        yield from self._activity()

    def _activity(self) -> Iterator[Metric]:
        got = self.probe.activity()
        for key, (name, doc, labels) in ACTIVITY.items():
            fam = CounterMetricFamily(name, doc, labels=list(labels))
            seen = sorted((values, n) for (k, values), n in got.items() if k == key)
            for values, n in seen or ([((), 0)] if not labels else []):
                fam.add_metric(list(values), n)
            yield fam
        for key, doc in LIVE.items():
            fam = CounterMetricFamily(f"fleetlog_dashboard_live_{key}", doc)
            fam.add_metric([], (self.local.live or {}).get(key, 0))
            yield fam

    def _folds(self) -> Iterator[Metric]:
        stats = self.probe.fold_stats()
        if stats is None:
            return
        size = HistogramMetricFamily("fleetlog_fold_batch_events", "events per folded batch, per projection",
                                     labels=["projection"])
        took = HistogramMetricFamily("fleetlog_fold_duration_seconds", "time to fold and commit one batch, "
                                     "per projection (a catch-up batch held for the next ones: until "
                                     "their common commit)", labels=["projection"])
        for fam, hists in ((size, stats.batch_events), (took, stats.duration_s)):
            for name, hist in sorted(hists.items()):
                fam.add_metric([name], _buckets(hist), hist.total)
        rej = CounterMetricFamily("fleetlog_rejects", "events a live view refused on this node, per projection "
                                  "and reason kind (`fleetlog rejects` gives the reasons)",
                                  labels=["projection", "reason"])
        for (name, kind), n in sorted(stats.rejects.items()):
            rej.add_metric([name, kind], n)
        again = CounterMetricFamily("fleetlog_fold_restarts", "times a view's fold loop failed and started again "
                                    "from its checkpoint, per projection and stream (the node logs each error)",
                                    labels=["projection", "stream"])
        for (name, stream), n in sorted(stats.restarts.items()):
            again.add_metric([name, stream], n)
        yield from (size, took, rej, again)


def _cumulative(bounds: list[float], counts: list[int]) -> list[tuple[str, float]]:
    """Per-bucket counts (the last is +Inf) as Prometheus' cumulative `le` buckets."""
    out: list[tuple[str, float]] = []
    total = 0
    for bound, n in zip([*map(str, bounds), "+Inf"], counts, strict=True):
        total += n
        out.append((bound, float(total)))
    return out


def _buckets(hist: Histogram) -> list[tuple[str, float]]:
    return _cumulative(list(hist.bounds), hist.counts)


def render(status: StatusAnswer | None, stats_reply: bytes | None, probe: NodeProbe,
           publishers: list[tuple[str, PublisherStats]], local: Local | None = None) -> bytes:
    """One scrape's text. `status` None: the node did not answer (fleetlog_node_serving 0)."""
    stats: dict[str, Any] | None = None
    if stats_reply:
        try:
            stats = msgspec.json.decode(stats_reply)
        except msgspec.DecodeError:
            stats = None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Scrape(status, stats, probe, publishers, local or Local()))
    return generate_latest(registry)
