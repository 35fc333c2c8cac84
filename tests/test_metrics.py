"""`GET /metrics`: this node's figures in the Prometheus text format, read from a real node."""

from __future__ import annotations

import nats
import pytest
from fleetlog.services.backbone.errors import FleetError, StaleError
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
