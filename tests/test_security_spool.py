"""A spool holds one identity's records: another identity on the same machine never drains them
(the broker would refuse them and they would be dead-lettered, not delivered); the identity
that spooled them delivers them when it comes back."""

from __future__ import annotations

from pathlib import Path

from fleetlog.schemas import AttemptRecorded, encode_event, new_event_id, now_iso
from fleetlog.services.backbone.nkeyauth import Identity, Servers
from fleetlog.services.writepath.publisher_spool import fleet_identity
from fleetlog.services.writepath.spool import Spool, SpoolRecord, survey

from fleetlog import Fleet

from .helpers import wait_until
from .security_helpers import identity, raw, secure_node


def attempt(agent: str, i: int) -> SpoolRecord:
    e = AttemptRecorded(id=new_event_id(), ts=now_iso(), agent=agent, action="spooled", outcome="success",
                        elapsed_s=float(i))
    return SpoolRecord(e.subject(), e.id, encode_event(e), 0)


async def test_another_identity_leaves_a_dead_agents_spool_to_it(tmp_path: Path) -> None:
    async with secure_node(tmp_path) as (broker, _server, _settings):
        alice, bob = await identity(broker, "agent", "alice"), await identity(broker, "agent", "bob")
        nc = await raw(broker, alice)
        fleet_id = await fleet_identity(nc)
        await nc.close()
        root = tmp_path / "machine-spool"
        # alice's process spooled three attempts and died (its directory unlocked, records left)
        dead = Spool(root, 1 << 30, Servers([broker.url], Identity.load(alice)))
        dead.stamp(fleet_id)
        assert dead.append([attempt("alice", i) for i in range(3)]) == 3
        dead.close()
        [orphan] = survey(root)
        assert (orphan.records, orphan.identity) == (3, Identity.load(alice).public_key)

        async with Fleet.connect(broker.url, credentials=bob, spool_dir=root, ensure=False) as as_bob:
            as_bob.attempts.record(agent="bob", action="own", outcome="success", elapsed_s=1.0)
            await as_bob.flush(timeout=60)
            stats = as_bob.publisher_stats()
            assert (stats.acked, stats.dead_lettered) == (1, 0)
            assert orphan.name in as_bob.foreign_spools
        assert [(d.name, d.records) for d in survey(root) if d.records] == [(orphan.name, 3)]
        assert not (root / "dead-letter.jsonl").exists()

        async with Fleet.connect(broker.url, credentials=alice, spool_dir=root, ensure=False) as as_alice:
            await as_alice.flush(timeout=60)
            assert as_alice.publisher_stats().dead_lettered == 0

            async def landed() -> bool:
                page = await as_alice.attempts.query(agent="alice", action="spooled")
                return sorted(a.elapsed_s for a in page.items) == [0.0, 1.0, 2.0]

            await wait_until(landed)
        assert [d for d in survey(root) if d.records] == []
