"""`GET /metrics`: this node's figures in the Prometheus text format, read from a real node."""

from __future__ import annotations

import asyncio

import msgspec
import nats
import pytest
from fleetlog.services.backbone.errors import FleetError, StaleError
from fleetlog.services.client.snapshots.watch import diff_subject, serve_hooks
from fleetlog.services.node.broker import free_port
from fleetlog.services.node.server import Server
from prometheus_client.parser import text_string_to_metric_families

from fleetlog import Fleet, FleetSettings

from .dashboard_helpers import dashboard_of, get


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


async def test_metrics_carry_checkpoints_lag_queries_folds_and_publishers(server: Server, fleet: Fleet) -> None:
    for i in range(25):
        fleet.attempts.record(agent="m", action="probe", outcome="success", elapsed_s=float(i))
    token = await fleet.flush()
    await fleet.attempts.query(limit=5, min_seq=token)
    await fleet.attempts.stats()
    async with dashboard_of(server) as dash:
        status, ctype, text = await get(dash.url + "/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    got = _samples(text)
    attempts = (("projection", "attempts"), ("stream", "FLEET_ATTEMPTS"))
    assert got[("fleetlog_node_serving", ())] == 1
    assert got[("fleetlog_stream_last_seq", (("stream", "FLEET_ATTEMPTS"),))] == 25
    assert got[("fleetlog_projection_checkpoint", attempts)] == 25
    assert got[("fleetlog_projection_lag_messages", attempts)] == 0
    assert ("fleetlog_projection_lag_seconds", attempts) in got
    assert got[("fleetlog_projection_rejects_total", (("projection", "attempts"),))] == 0
    assert got[("fleetlog_projection_rows", (("projection", "attempts"), ("table", "attempts")))] == 25
    assert got[("fleetlog_query_requests_total", (("endpoint", "attempts-query"),))] >= 1
    assert got[("fleetlog_query_requests_total", (("endpoint", "attempts-stats"),))] >= 1
    assert ("fleetlog_query_processing_seconds_total", (("endpoint", "attempts-stats"),)) in got
    assert got[("fleetlog_projector_events_folded_total", ())] >= 25
    assert got[("fleetlog_lease_sweeps_total", ())] == 0  # the suite's nodes run no reactors
    assert ("fleetlog_publisher_acked_total", (("client", "dashboard"),)) in got
    for name in ("enqueued", "retried", "spooled", "dead_lettered"):
        assert (f"fleetlog_publisher_{name}_total", (("client", "dashboard"),)) in got
    assert ("fleetlog_publisher_inflight", (("client", "dashboard"),)) in got


async def test_metrics_say_when_the_node_does_not_answer(server: Server, fleet: Fleet) -> None:
    async with dashboard_of(server) as dash:
        await server.query.stop()  # the node's query service is gone; the scrape still answers
        status, _, text = await get(dash.url + "/metrics")
    got = _samples(text)
    assert status == 200 and got[("fleetlog_node_serving", ())] == 0
    assert not any(name == "fleetlog_projection_checkpoint" for name, _ in got)


async def test_query_latency_is_a_histogram_per_endpoint_and_outcome(server: Server, fleet: Fleet) -> None:
    fleet.attempts.record(agent="m", action="probe", outcome="success", elapsed_s=1.0)
    token = await fleet.flush()
    for _ in range(3):
        await fleet.attempts.query(limit=5, min_seq=token)
    with pytest.raises(FleetError, match=r"(?i)select"):
        await fleet.sql("DELETE FROM attempts")  # refused by the endpoint: an error outcome
    with pytest.raises(StaleError):  # a position the view never reaches: answered "stale"
        await fleet.attempts.query(limit=1, min_seq={"FLEET_ATTEMPTS": token["FLEET_ATTEMPTS"] + 1000})
    async with dashboard_of(server) as dash:
        _, _, text = await get(dash.url + "/metrics")
    got = _samples(text)
    ok = (("endpoint", "attempts-query"), ("outcome", "ok"))
    assert got[("fleetlog_query_latency_seconds_count", ok)] == 3
    assert got[("fleetlog_query_latency_seconds_bucket", (*ok[:1], ("le", "+Inf"), ok[1]))] == 3
    assert got[("fleetlog_query_latency_seconds_sum", ok)] > 0
    assert got[("fleetlog_query_latency_seconds_count", (("endpoint", "attempts-query"), ("outcome", "error")))] == 0
    assert got[("fleetlog_query_latency_seconds_count", (("endpoint", "attempts-query"), ("outcome", "stale")))] == 1
    err = (("endpoint", "sql"), ("outcome", "error"))
    assert got[("fleetlog_query_latency_seconds_count", err)] == 1
    assert got[("fleetlog_query_latency_seconds_count", (("endpoint", "sql"), ("outcome", "ok")))] == 0


async def test_fold_batches_durations_and_rejects_by_kind(
        server: Server, fleet: Fleet, settings: FleetSettings) -> None:
    for i in range(40):
        fleet.attempts.record(agent="m", action="fold", outcome="success", elapsed_s=float(i))
    await fleet.flush()
    nc = await nats.connect(settings.nats_url)
    try:
        js = nc.jetstream()
        await js.publish("fleet.attempt.m.a", b"not json")
        await js.publish("fleet.attempt.m.b", b"{also not json")
        last = (await js.publish("fleet.attempt.m.c", b"[]")).seq  # JSON, but no event
    finally:
        await nc.drain()
    await fleet.attempts.query(limit=1, min_seq={"FLEET_ATTEMPTS": last})  # folded up to the last reject
    async with dashboard_of(server) as dash:
        _, _, text = await get(dash.url + "/metrics")
    got = _samples(text)
    attempts = (("projection", "attempts"),)
    batches = got[("fleetlog_fold_batch_events_count", attempts)]
    assert batches >= 1
    assert got[("fleetlog_fold_batch_events_sum", attempts)] == 43  # every event, folded once, in some batches
    assert got[("fleetlog_fold_batch_events_bucket", (("le", "+Inf"), *attempts))] == batches
    assert got[("fleetlog_fold_duration_seconds_count", attempts)] == batches
    assert got[("fleetlog_fold_duration_seconds_sum", attempts)] > 0
    kinds = {dict(labels)["reason"]: v for (name, labels), v in got.items()
             if name == "fleetlog_rejects_total" and dict(labels)["projection"] == "attempts"}
    assert sum(kinds.values()) == 3 == got[("fleetlog_projection_rejects_total", attempts)]
    assert kinds["invalid_json"] == 2


def _delta(before: dict[tuple[str, tuple[tuple[str, str], ...]], float],
           after: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """How far a process-wide counter moved (the client activity counts are cumulative over
    the test process: other tests' claims and diffs count too)."""
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


async def test_claims_lost_races_diffs_and_hook_runs_move_when_they_happen(
        server: Server, fleet: Fleet, settings: FleetSettings) -> None:
    async with dashboard_of(server) as dash:
        before = _samples((await get(dash.url + "/metrics"))[2])
        await fleet.runs.create("r1", "runner", status="queued")
        await fleet.runs.create("r2", "runner", status="queued")
        await fleet.runs.list(min_seq=await fleet.flush())  # the view proposes both
        # A real race: with the fold held, the view still proposes r1 after `a` claimed it;
        # `b`'s guarded claim of r1 then loses to `a`'s, and `b` goes on to r2 once it folds.
        async with Fleet.connect(settings=settings) as a, Fleet.connect(settings=settings) as b:
            server.projector.pause()
            try:
                first = await a.runs.claim_next("rt-a")
                racing = asyncio.ensure_future(b.runs.claim_next("rt-b"))
                while b.runs.counters.conflicts == 0 and not racing.done():  # noqa: ASYNC110 (a counter, no event)
                    await asyncio.sleep(0.02)
            finally:
                server.projector.resume()
            second = await racing
        assert first is not None and second is not None and {first.run_id, second.run_id} == {"r1", "r2"}
        # A real diff, and hook runs on it through the watch path (`watch --exec`): one ok, one failed.
        await fleet.snapshots.take("m", {"load1": 1.0}, host="h")
        await fleet.snapshots.take("m", {"load1": 2.0}, host="h")
        await fleet.flush()
        nc = await fleet.nats()
        handled = await serve_hooks(nc, diff_subject("h", "m"), ["true", "false"], durable="metrics-test",
                                    after_seq=0, count=1)
        after = _samples((await get(dash.url + "/metrics"))[2])
    assert handled == 1
    assert _delta(before, after, "fleetlog_claims_total") == 2
    assert _delta(before, after, "fleetlog_lost_races_total", write="claim") >= 1
    assert _delta(before, after, "fleetlog_diffs_published_total") == 1
    assert _delta(before, after, "fleetlog_hook_runs_total", hook="on_diff", outcome="ok") == 1
    assert _delta(before, after, "fleetlog_hook_runs_total", hook="on_diff", outcome="failed") == 1


async def test_spool_bytes_and_the_lag_in_srv_stats(server: Server, fleet: Fleet, settings: FleetSettings) -> None:
    # A client of this node whose broker is away spools to the node's spool directory.
    away = settings.model_copy(update={"nats_url": f"nats://127.0.0.1:{free_port()}"})
    async with dashboard_of(server) as dash:
        empty = _samples((await get(dash.url + "/metrics"))[2])
        offline = await Fleet.connect(settings=away)
        try:
            for i in range(5):
                offline.attempts.record(agent="away", action="probe", outcome="success", elapsed_s=float(i))
            while offline.publisher_stats().spooled < 5:  # noqa: ASYNC110 (a counter, no event)
                await asyncio.sleep(0.02)
            spooled = _samples((await get(dash.url + "/metrics"))[2])
        finally:
            await offline.close(timeout=0.5)
    assert spooled[("fleetlog_publisher_spool_bytes", ())] > empty[("fleetlog_publisher_spool_bytes", ())]
    # $SRV.STATS: each endpoint's data carries the lag of its latest answer.
    server.projector.pause()
    try:
        for i in range(3):
            fleet.attempts.record(agent="lag", action="probe", outcome="success", elapsed_s=float(i))
        await fleet.flush()
        answer = await fleet.attempts.query(limit=1)
        nc = await fleet.nats()
        stats = msgspec.json.decode((await nc.request(f"$SRV.STATS.fleetlog.{server.query.node}", b"")).data)
    finally:
        server.projector.resume()
    [ep] = [e for e in stats["endpoints"] if e["name"] == "attempts-query"]
    assert answer.lag == {"FLEET_ATTEMPTS": 3}
    assert ep["data"]["lag"] == {"FLEET_ATTEMPTS": 3} and ep["data"]["lag_s"]["FLEET_ATTEMPTS"] > 0
