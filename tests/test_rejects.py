"""(c) Bad input on the wire: a raw NATS client, not our SDK, publishing garbage."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import msgspec
import nats
from fleetlog.schemas import AttemptRecorded, RunCreated, RunState, encode_event, new_event_id, now_iso
from fleetlog.services.backbone.guarded import Guarded
from fleetlog.services.client.rejects import reject_raw
from fleetlog.services.node.server import Server
from fleetlog.services.query.builtins import REJECT_PREVIEW_BYTES

from fleetlog import Fleet

from .helpers import cli_json, cli_runner, fleetlog_cmd, wait_until


def _valid(i: int) -> tuple[str, bytes]:
    e = AttemptRecorded(id=new_event_id(), ts=now_iso(), agent=f"raw{i % 3}", action="probe", outcome="success",
                        elapsed_s=i / 10)
    return e.subject(), encode_event(e)


def _garbage() -> list[tuple[str, bytes, str]]:
    """(subject, payload, a word the reject reason must contain)."""
    good = json.loads(_valid(0)[1])
    bad: list[tuple[str, bytes, str]] = [
        ("fleet.attempt.raw0.probe", b"{not json", "JSON"),
        ("fleet.attempt.raw0.probe", b"\xff\xfe\x00binary", "JSON"),
        ("fleet.attempt.raw0.probe", json.dumps({**good, "elapsed_s": "slow"}).encode(), "elapsed_s"),
        ("fleet.attempt.raw0.probe", json.dumps({**good, "elapsed_s": -1}).encode(), "elapsed_s"),
        ("fleet.attempt.raw0.probe", json.dumps({**good, "agent": 7}).encode(), "agent"),
        ("fleet.attempt.raw0.probe", json.dumps({**good, "type": "attempt.bogus"}).encode(), "type"),
        ("fleet.attempt.raw0.probe", json.dumps({k: v for k, v in good.items() if k != "id"}).encode(), "id"),
        ("fleet.attempt.raw0.probe", json.dumps({**good, "id": "not-a-uuid"}).encode(), "id"),
        ("fleet.attempt.raw0.probe", json.dumps({**good, "ts": "yesterday at noon"}).encode(), "ts"),
        ("fleet.attempt.intruder.probe", json.dumps(good).encode(), "subject mismatch"),
        ("fleet.attempt.raw0.probe", json.dumps({**good, "extras": {"blob": "x" * 600_000}}).encode(), "oversize"),
        (
            "fleet.attempt.raw0.probe",
            encode_event(RunCreated(id=new_event_id(), ts=now_iso(),
                                    state=RunState(run_id="r1", runner_id="x", status="queued", created_at=1))),
            "not folded",
        ),
    ]
    return bad


async def test_garbage_mixed_with_1000_valid_events(fleet: Fleet, server: Server) -> None:
    bad = _garbage()
    nc = await nats.connect(fleet.settings.nats_url)
    js = nc.jetstream()
    bad_seqs: dict[int, str] = {}
    try:
        for i in range(1000):
            subject, payload = _valid(i)
            await js.publish(subject, payload)
            if i % 80 == 0 and bad:
                subject, payload, word = bad.pop()
                ack = await js.publish(subject, payload)
                bad_seqs[ack.seq] = word
        for subject, payload, word in bad:
            ack = await js.publish(subject, payload)
            bad_seqs[ack.seq] = word
        last = (await js.stream_info("FLEET_ATTEMPTS")).state.last_seq
    finally:
        await nc.close()

    stats = await fleet.attempts.stats(min_seq={"FLEET_ATTEMPTS": last})
    assert sum(s.count for s in stats.items) == 1000

    rejects = await fleet.rejects("attempts", limit=100)
    by_seq = {r.seq: r for r in rejects.items}
    assert set(by_seq) == set(bad_seqs)
    for seq, word in bad_seqs.items():
        assert word.lower() in by_seq[seq].reason.lower(), (word, by_seq[seq].reason)
    print("\n[fault c] reasons:\n  " + "\n  ".join(f"{s}: {by_seq[s].reason[:110]}" for s in sorted(by_seq)))

    status = await fleet.status()
    assert status.rejects_total == len(bad_seqs)
    (proj,) = [p for p in status.projections if p.name == "attempts"]
    assert proj.rejects == len(bad_seqs)
    assert proj.rows["attempts"] == 1000

    # The rejects stream carries each one with its reason, original subject and exact bytes.
    async def stream_has_all() -> bool:
        st = next(s for s in (await fleet.status()).streams if s.name == "FLEET_REJECTS")
        return st.messages == len(bad_seqs)

    await wait_until(stream_has_all, timeout_s=20)
    nc = await nats.connect(fleet.settings.nats_url)
    try:
        sub = await nc.jetstream().subscribe("fleet.reject.attempts", ordered_consumer=True)
        seen = {}
        for _ in range(len(bad_seqs)):
            msg = await sub.next_msg(timeout=5)
            assert msg.headers is not None
            seen[int(msg.headers["Fleetlog-Seq"])] = msg
        await sub.unsubscribe()
    finally:
        await nc.close()
    assert set(seen) == set(bad_seqs)
    for msg in seen.values():
        assert msg.headers is not None
        assert msg.headers["Fleetlog-Reason"]
        assert msg.headers["Fleetlog-Stream"] == "FLEET_ATTEMPTS"
        assert msg.headers["Fleetlog-Subject"].startswith("fleet.attempt.")


async def test_rejects_do_not_stop_later_events(fleet: Fleet, server: Server) -> None:
    nc = await nats.connect(fleet.settings.nats_url)
    try:
        await nc.jetstream().publish("fleet.attempt.x.y", b"garbage")
    finally:
        await nc.close()
    r = fleet.attempts.record(agent="x", action="y", outcome="success", elapsed_s=0.5)
    token = await fleet.flush()
    page = await fleet.attempts.query(agent="x", min_seq=token)
    assert [row.id for row in page.items] == [r.id]


async def test_rejects_redrive_republishes_the_exact_bytes(fleet: Fleet, server: Server, tmp_path: Path) -> None:
    """`fleetlog rejects redrive` puts a rejected message back on its subject byte for byte
    (undecodable bytes included: the answer's `data` is only text), so a fixed rule can fold it."""
    payload = b"\xff\xfe{\"not\": utf8}\x00"
    nc = await nats.connect(fleet.settings.nats_url)
    try:
        first = await nc.jetstream().publish("fleet.attempt.redrive.probe", payload)
    finally:
        await nc.close()
    before = await fleet.rejects("attempts", 10, min_seq={"FLEET_ATTEMPTS": first.seq})
    assert [r.seq for r in before.items] == [first.seq]
    assert "\ufffd" in before.items[0].data
    cli = cli_runner(fleet.settings.nats_url, tmp_path)
    out = cli_json(await cli("rejects", "redrive", "--projection", "attempts", "--json"))
    assert out == {"redriven": 1, "gone": 0}
    guarded = Guarded(await fleet.nats())
    last = await guarded.last("FLEET_ATTEMPTS", "fleet.attempt.redrive.probe")
    assert last is not None and last.seq > first.seq and last.data == payload
    again = await fleet.rejects("attempts", 10, min_seq={"FLEET_ATTEMPTS": last.seq})
    assert [r.seq for r in again.items] == [last.seq, first.seq]  # refused again, nothing lost


async def _raw_cli(nats_url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """`fleetlog ...` with stdout as bytes (cli_runner decodes text)."""
    env = {**os.environ, "FLEETLOG_DATA_DIR": str(tmp_path / "cli-raw"), "NO_COLOR": "1"}
    env.pop("FLEETLOG_NATS_URL", None)
    cmd = [*fleetlog_cmd(), *args, "--nats", nats_url]
    return await asyncio.to_thread(subprocess.run, cmd, capture_output=True, env=env, timeout=120)


async def test_a_900kb_reject_is_answered_as_a_preview_and_shown_whole(fleet: Fleet, server: Server,
                                                                       tmp_path: Path) -> None:
    """One garbage message near the broker's max_payload: `rejects` (API and CLI, any limit)
    answers with a preview and a marker; `rejects show SEQ --raw` writes the exact bytes."""
    payload = b"\xff" + bytes(range(256)) * 3600  # 921,601 bytes, not UTF-8, not JSON
    nc = await nats.connect(fleet.settings.nats_url)
    try:
        ack = await nc.jetstream().publish("fleet.attempt.big.probe", payload)
        small = await nc.jetstream().publish("fleet.attempt.big.probe", b"{tiny")
    finally:
        await nc.close()
    token = {"FLEET_ATTEMPTS": small.seq}
    answer = await fleet.rejects("attempts", 10, min_seq=token)
    by_seq = {r.seq: r for r in answer.items}
    big = by_seq[ack.seq]
    assert big.data_truncated and big.data_bytes == len(payload)
    assert len(big.data.encode()) <= 3 * REJECT_PREVIEW_BYTES  # a preview (replacement chars are 3 bytes)
    assert "oversize" in big.reason.lower() or "json" in big.reason.lower()
    tiny = by_seq[small.seq]
    assert not tiny.data_truncated and tiny.data == "{tiny" and tiny.data_bytes == 5
    assert answer.as_of["FLEET_ATTEMPTS"] >= small.seq and not answer.has_more

    cli = cli_runner(fleet.settings.nats_url, tmp_path)
    listed = cli_json(await cli("rejects", "--limit", "1", "--json"))
    assert [r["seq"] for r in listed["items"]] == [small.seq]
    listed = cli_json(await cli("rejects", "--json"))
    assert {r["seq"] for r in listed["items"]} == {ack.seq, small.seq}

    raw = await _raw_cli(fleet.settings.nats_url, tmp_path, "rejects", "show", str(ack.seq), "--raw")
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout == payload
    shown = cli_json(await cli("rejects", "show", str(ack.seq), "--json"))
    assert shown["data_bytes"] == len(payload) and shown["source"] == "FLEET_ATTEMPTS"
    missing = await cli("rejects", "show", str(small.seq + 1000))
    assert missing.returncode == 3 and "no reject at seq" in missing.stderr  # Exit.NOT_FOUND

    got = await reject_raw(fleet, ack.seq)
    assert got.data == payload and got.row.seq == ack.seq


async def test_more_rejects_than_fit_a_reply_are_cut_with_has_more(fleet: Fleet, server: Server) -> None:
    """600 rejects with 3 kB payloads: even as previews they do not fit one reply, so the
    answer keeps the newest that fit and says there are more."""
    nc = await nats.connect(fleet.settings.nats_url)
    try:
        js = nc.jetstream()
        acks = await asyncio.gather(*(js.publish("fleet.attempt.many.probe", b"{" + b"x" * 3000 + str(i).encode())
                                      for i in range(600)))
        last = max(a.seq for a in acks)
        max_payload = nc.max_payload
    finally:
        await nc.close()
    answer = await fleet.rejects("attempts", 1000, min_seq={"FLEET_ATTEMPTS": last})
    assert answer.has_more and 0 < len(answer.items) < 600
    assert len(msgspec.json.encode(answer)) <= max_payload
    assert answer.items[0].seq == last  # newest first: what was left off is the oldest
    assert all(r.data_truncated and r.data_bytes > 3000 for r in answer.items)


async def test_rejects_of_every_view_come_newest_first(fleet: Fleet, server: Server) -> None:
    """Each view's rejects are merged by time: the views' lists used to be concatenated in
    projection order, so [:limit] hid a newer reject of a later view and has_more said False."""
    nc = await nats.connect(fleet.settings.nats_url)
    try:
        js = nc.jetstream()
        older = [(await js.publish("fleet.attempt.raw0.probe", b"{not json")).seq for _ in range(2)]
        last_attempt = older[-1]
        await fleet.attempts.stats(min_seq={"FLEET_ATTEMPTS": last_attempt})
        newer = (await js.publish("fleet.snapshot.h.a", b"{not json either")).seq
    finally:
        await nc.close()
    await fleet.snapshots.all_latest(min_seq={"FLEET_SNAPSHOTS": newer})
    top = await fleet.rejects(limit=1)
    assert [(r.projection, r.seq) for r in top.items] == [("snapshots", newer)] and top.has_more
    every = await fleet.rejects(limit=10)
    assert [(r.projection, r.seq) for r in every.items] == [("snapshots", newer), ("attempts", older[1]),
                                                          ("attempts", older[0])]
    assert not every.has_more


async def test_raw_bytes_gone_from_their_stream_come_from_the_rejects_copy(fleet: Fleet, server: Server) -> None:
    """The refused message was deleted from FLEET_ATTEMPTS: `reject_raw` finds its copy among
    other rejects on FLEET_REJECTS by the copy's headers, and returns its exact bytes."""
    payloads = [b"{bad " + bytes([i]) * (50_000 + i) for i in range(6)]
    nc = await nats.connect(fleet.settings.nats_url)
    try:
        js = nc.jetstream()
        acks = [await js.publish("fleet.attempt.copy.probe", p) for p in payloads]
        await fleet.rejects("attempts", 10, min_seq={"FLEET_ATTEMPTS": acks[-1].seq})

        async def copied() -> bool:
            info = await js.stream_info("FLEET_REJECTS")
            return info.state.messages == len(payloads)

        await wait_until(copied, timeout_s=20)
        target = acks[3]
        assert await js.delete_msg("FLEET_ATTEMPTS", target.seq)
    finally:
        await nc.close()
    got = await reject_raw(fleet, target.seq)
    assert got.source == "FLEET_REJECTS" and got.data == payloads[3] and got.row.seq == target.seq
