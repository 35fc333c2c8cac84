"""The attempts bulk fold (payloads decoded into columns, panes kept as bytes) against the decoder.

Why: the bulk path must never accept what the typed decoder rejects, and must store
exactly what `decode` + `fold` store. One stream holds a corpus of SDK events, valid
oddities a raw client may send, a purge in the middle and garbage; three projectors
fold it: bulk with big batches, bulk with batches of 7 (rows the bulk path cannot vouch for
then fall between bulk segments and at batch edges), and decode + fold only. Their
tables must be identical (row count and content hash per table) and their rejects
must be the same rows with the same reasons. The bulk path must also send to the
decoder exactly the rows expected, so a change that quietly stops vouching for
ordinary events (or starts vouching for odd ones) fails here.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import nats
import pyarrow as pa
import pytest
from fleetlog.projections import Projection, attempts_raw
from fleetlog.projections._base import RawBatch
from fleetlog.projections.attempts import AttemptsProjection
from fleetlog.projections.attempts_raw import prepare_attempts
from fleetlog.schemas import AttemptRecorded, AttemptsPurged, RunCreated, RunState, encode_event, new_event_id
from fleetlog.services.backbone.streams import ensure_streams
from fleetlog.services.client.attempts.panes import normalize_pane
from fleetlog.services.node.broker import EmbeddedBroker
from fleetlog.services.node.server import Server
from fleetlog.services.projector import stream_parse

from fleetlog import FleetSettings

STREAM = "FLEET_ATTEMPTS"


class DecodedAttempts(AttemptsProjection):
    """The same projection without its bulk path: every batch is decoded and folded."""

    fold_raw = Projection.fold_raw  # type: ignore[assignment]


def _event(agent: str = "alpha", action: str = "probe", **kw: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "id": new_event_id(), "ts": "2026-11-16T03:44:42.062811+00:00", "agent": agent, "action": action,
        "outcome": "success", "elapsed_s": 1.25, "pane_before": None, "pane_after": None, "extras": {},
    }
    fields.update(kw)
    for pane in ("pane_before", "pane_after"):
        fields[pane] = normalize_pane(pane, fields[pane], 64)
    return fields


def _sdk(**kw: Any) -> tuple[str, bytes]:
    """Exactly what `fleet.attempts.record()` publishes."""
    e = AttemptRecorded(**_event(**kw))
    return e.subject(), encode_event(e)


def _raw(
    doc: dict[str, Any] | list[Any], subject: str = "fleet.attempt.alpha.probe", **dumps: Any
) -> tuple[str, bytes]:
    return subject, json.dumps(doc, **dumps).encode()


def _valid_doc(**kw: Any) -> dict[str, Any]:
    return {"type": "attempt.recorded", "v": 1, **_event(**kw)}


def _corpus() -> tuple[list[tuple[str, bytes, bool]], int]:
    """[(subject, payload, expected to go through the decoder)] in publish order, and the number of rejects."""
    fast: list[tuple[str, bytes]] = [
        _sdk(),
        _sdk(agent="agent-07", action="nonce_probe:v2", outcome="precondition_fail", elapsed_s=0),
        _sdk(outcome="ok ✓ — fine", elapsed_s=3, extras={"polls": 4, "model": "m-7", "retry": True}),
        _sdk(pane_before="$ ls\n\x1b[1mbold\x1b[0m\ttab é 😀", pane_after={"format": "json-dump", "text": "[1, 2]"}),
        _sdk(pane_before="x" * 100),  # truncated to the last 64 characters
        _sdk(extras={"big": 1234567890123456789, "tiny": 1e-7, "neg": -2.5, "nested": {"a": [1, None, "s"]}}),
        _sdk(ts="2026-11-16T03:44:42Z"),
        _sdk(ts="2026-11-16T03:44:42"),
        _sdk(ts="2026-11-16T08:14:42.5+05:30"),
        _sdk(ts="1999-12-31T23:59:59-23:59"),
        _sdk(id=new_event_id().upper()),
        _sdk(elapsed_s=12345678901234567.0),
        _sdk(elapsed_s=1e-05),
        _raw(_valid_doc(), indent=2),  # whitespace outside the panes: read as well
        _raw(dict(reversed(list(_valid_doc().items())))),  # other key order
        _raw({**_valid_doc(), "unknown_field": [1, 2]}),  # ignored, like the decoder does
        _sdk(agent="a.b"),  # escaped in the subject
        _sdk(agent="with space", action="é"),
        _sdk(outcome='say "hi"'),
        _sdk(extras={"huge": 1.5e300}),
        _sdk(extras={"bigger than int64": 12345678901234567890123}),
        _sdk(ts="2026-11-16 03:44:42"),
        _sdk(ts="2026-11-16T03:44:42.1234567"),
        _sdk(elapsed_s=-0.0),
        _raw({k: v for k, v in _valid_doc().items() if k not in ("pane_after", "extras", "v")}),
        _raw({**_valid_doc(), "extras": {"b": 1, "a": [1.0, 2]}}),  # extras re-encoded: spaces go
        _sdk(pane_before="back\\slash \"quoted\" \x01\x7f\u2028 / end"),
        _sdk(pane_before={"format": "full", "text": "a", "truncated": False}),
    ]
    dup = _sdk(agent="dup")
    fast += [dup, dup]  # the same event twice (beyond the broker's dedupe window): one row

    def pane_doc(pane: str) -> tuple[str, bytes]:
        doc = json.dumps(_valid_doc(), separators=(",", ":")).replace('"pane_before":null', f'"pane_before":{pane}')
        return "fleet.attempt.alpha.probe", doc.encode()

    # The client's pane shape written otherwise: the bulk path keeps the text as it came
    # (same pane for every query; the stored text keeps its escapes, see `_fold`).
    fast_odd_panes = [
        _raw({**_valid_doc(), "pane_before": {"text": "t", "format": "full"}}),  # other order, spaces
        pane_doc('{"format":"full","text":"caf\\u00e9"}'),  # escapes msgspec does not write
        pane_doc('{"format":"full","text":"a\\/b"}'),
        pane_doc('{"format":"full","text":"\\ud83d\\ude00 \\u001B"}'),
        pane_doc('{"format":"full","text":"t\\",","truncated":true}'),
        pane_doc('{"format":"full","text":"a" }'),
        pane_doc('{"format":"full","text":"a","format":"b"}'),  # a key twice: the last one counts
    ]
    fast += fast_odd_panes
    # Valid panes of another shape (a pane is any object): the decoder folds them.
    decoded_valid: list[tuple[str, bytes]] = [
        _sdk(pane_before={"format": "tmux", "text": "t", "rows": 24}),  # another key
        pane_doc('{"format":"full","text":5}'),  # text not a string
        pane_doc('{"format":"full","text":"a","truncated":null}'),
        pane_doc('{"format":1,"text":"a"}'),
    ]
    rejected: list[tuple[str, bytes]] = [
        ("fleet.attempt.alpha.probe", b"{not json"),
        ("fleet.attempt.alpha.probe", b'{"type":"attempt.recorded","agent":"\xff\xfe"}'),
        _raw({**_valid_doc(), "extras": None}),
        _raw({**_valid_doc(), "v": 1.0}),
        _raw({**_valid_doc(), "elapsed_s": "1.5"}),
        _raw({**_valid_doc(), "elapsed_s": -1}),
        _raw({**_valid_doc(), "agent": 7}),
        _raw({**_valid_doc(), "type": "attempt.bogus"}),
        _raw({k: v for k, v in _valid_doc().items() if k != "type"}),  # the tag is required
        _raw({k: v for k, v in _valid_doc().items() if k != "id"}),
        _raw({**_valid_doc(), "id": "0197a1b2c3d4e5f60718293a4b5c6d7e"}),
        _raw({**_valid_doc(), "ts": "2026-02-30T00:00:00"}),
        _raw(_valid_doc(), subject="fleet.attempt.intruder.probe"),
        _raw([1, 2, 3]),
        _raw({**_valid_doc(), "pane_before": "just text"}),  # a pane is an object or null
        _raw({**_valid_doc(), "pane_after": [1]}),
        ("fleet.attempt.alpha.probe", json.dumps(_valid_doc(), separators=(",", ":")).replace(
            '"pane_before":null', '"pane_before":{"format":"full","text":"lone \\ud800"}').encode()),
        _raw({**_valid_doc(), "outcome": ""}),
        _raw({**_valid_doc(), "agent": "x" * 257}, subject=f"fleet.attempt.{'x' * 257}.probe"),
        ("fleet.attempt.alpha.probe", encode_event(RunCreated(
            id=new_event_id(), ts="2026-11-16T03:44:42Z",
            state=RunState(run_id="r1", runner_id="x", status="queued", created_at=1)))),
    ]
    # Numbers a double cannot hold: the decoder refuses them, so SQL must not vouch for them.
    huge = json.dumps(_valid_doc()).replace('"extras": {}', '"extras": {"x": 1e400}')
    pane_huge = json.dumps(_valid_doc(pane_before="t")).replace('"text": "t"}', '"text": "t", "n": 1e400}')
    dup_keys = json.dumps(_valid_doc()).replace('"agent": "alpha"', '"agent": "alpha", "agent": "other"')
    rejected += [("fleet.attempt.alpha.probe", doc.encode()) for doc in (huge, pane_huge, dup_keys)]
    out = [(s, p, False) for s, p in fast] + [(s, p, True) for s, p in decoded_valid + rejected]
    # Interleave so that decoded rows sit between bulk rows, and put a purge in the middle:
    # it removes the attempts before it with an older ts, not the ones after it.
    out.sort(key=lambda item: hash(item[1]))
    purge = AttemptsPurged(id=new_event_id(), ts="2026-11-20T00:00:00Z", before="2026-11-16T03:44:42.1+00:00")
    # One event with a copy on each side of the purge: the purge deletes it, and the copy
    # (same id) stays deleted on every path and with every batching.
    purged = _sdk(agent="purged-then-copied")
    middle = len(out) // 2
    out[middle:middle] = [(*purged, False), (purge.subject(), encode_event(purge), True), (*purged, False)]
    return out, len(rejected)


async def _fold(broker: EmbeddedBroker, data_dir: Path, last: int, projection: Projection,
                batch_max: int) -> tuple[dict[str, Any], dict[int, str], int]:
    """(table digests and the attempts rows as read, rejects, rows handed to the decoder)"""
    settings = FleetSettings(nats_url=broker.url, data_dir=data_dir, spool_dir=data_dir / "spool",
                             batch_wait_s=0.01, batch_max=batch_max, reactors=False)  # attempts only: no runs to sweep
    server = Server(settings, projections=(projection,))
    await server.start()
    try:
        feed = server.projector.live("attempts").feeds[STREAM]
        for _ in range(600):
            if feed.checkpoint >= last:
                break
            await asyncio.sleep(0.05)
        assert feed.checkpoint >= last
        schema = server.projector.live("attempts").gen.schema
        digest = server.store.table_digest(schema, projection.tables)
        cur = server.store.cursor(schema)
        try:
            rejects = dict(cur.execute("SELECT seq, reason FROM _rejects").fetchall())
            # Each row as queries see it (panes parsed): the decoded path writes the odd
            # panes as msgspec does, the bulk path keeps their text as it came.
            rows = cur.execute(
                "SELECT id, seq, ts, ts_utc, agent, action, outcome, elapsed_s, pane_before, pane_after, extras"
                " FROM attempts ORDER BY seq"
            ).fetchall()
            digest["rows"] = [(*r[:8], *(None if v is None else json.loads(v) for v in r[8:])) for r in rows]
        finally:
            cur.close()
        folder = server.projector.folder
        assert folder.bulk_fallbacks == 0
        return digest, rejects, folder.decoded_rows
    finally:
        await server.stop()


async def test_bulk_fold_equals_decode_and_fold(
    broker: EmbeddedBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus, n_rejected = _corpus()
    nc = await nats.connect(broker.url)
    try:
        await ensure_streams(nc, FleetSettings(nats_url=broker.url, data_dir=tmp_path / "x"))
        js = nc.jetstream()
        for subject, payload, _ in corpus:
            await js.publish(subject, payload)
        last = (await js.stream_info(STREAM)).state.last_seq
    finally:
        await nc.close()
    expected_decoded = sum(1 for *_, decoded in corpus if decoded)

    bulk = await _fold(broker, tmp_path / "bulk", last, AttemptsProjection(), 5000)
    small = await _fold(broker, tmp_path / "small", last, AttemptsProjection(), 7)
    decoded = await _fold(broker, tmp_path / "decoded", last, DecodedAttempts(), 5000)
    # The Arrow columns are built in slices (the GIL changes hands between them), and the
    # payloads come in one chunk per reader segment: with slices of a few rows and segments
    # of a few payloads, nothing stored, refused or handed to the decoder may change.
    monkeypatch.setattr(attempts_raw, "SLICE_ROWS", 5)
    monkeypatch.setattr(stream_parse, "_SEGMENT_BYTES", 4096)
    monkeypatch.setattr(stream_parse, "_MIN_READ", 1024)
    sliced = await _fold(broker, tmp_path / "sliced", last, AttemptsProjection(), 5000)
    assert sliced == bulk

    assert bulk[0] == small[0]  # byte for byte, however batched: a rebuild equals the live view
    assert {k: v for k, v in bulk[0].items() if k != "attempts"} == {
        k: v for k, v in decoded[0].items() if k != "attempts"
    }
    assert bulk[0]["attempts"][0] == decoded[0]["attempts"][0]
    assert bulk[1] == decoded[1] == small[1]
    assert bulk[2] == small[2] == expected_decoded
    assert decoded[2] == 0
    # Sanity: the purge removed some rows, and every garbage payload is a reject.
    assert bulk[0]["attempt_purged_ids"][0] > 0
    rows = bulk[0]["attempts"][0]
    assert 0 < rows < len(corpus) - len(bulk[1])
    assert len(bulk[1]) == n_rejected


@pytest.mark.parametrize("rows_per_chunk", [1, 4, 5])
def test_prepare_across_chunks(rows_per_chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The decode reads payloads chunk by chunk (a batch's Arrow is built in slices): with the
    corpus (odd panes, garbage, a purge, NULL payloads) cut into chunks of a few rows and the
    columns built in slices of a few rows, it makes what it makes of the batch in one piece."""
    corpus, _ = _corpus()
    seqs = list(range(1, len(corpus) + 1))
    subjects = [subject for subject, _, _ in corpus]
    # NULL where a payload is not UTF-8, as the runtime hands it over; and one oversize (NULL) too.
    texts: list[str | None] = [_utf8(payload) for _, payload, _ in corpus]
    texts[len(texts) // 3] = None

    def batch(n: int) -> RawBatch:
        cut = range(0, len(seqs), n)
        return RawBatch(STREAM, pa.table({
            "seq": pa.chunked_array([seqs[i : i + n] for i in cut], pa.int64()),
            "subject": pa.chunked_array([subjects[i : i + n] for i in cut], pa.string()),
            "data": pa.chunked_array([texts[i : i + n] for i in cut], pa.string()),
        }))

    whole = prepare_attempts(batch(len(seqs)))
    monkeypatch.setattr(attempts_raw, "SLICE_ROWS", rows_per_chunk + 1)
    sliced = prepare_attempts(batch(rows_per_chunk))
    assert sliced.rows.num_rows == whole.rows.num_rows > 0
    assert sliced.rows.equals(whole.rows)
    assert sliced.others == whole.others and len(whole.others) > 1
    assert sliced.repeats == whole.repeats


def _utf8(payload: bytes) -> str | None:
    try:
        return payload.decode()
    except UnicodeDecodeError:
        return None
